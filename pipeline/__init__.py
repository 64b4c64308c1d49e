"""The supervisor, config, control channel, metrics, reports and the command line."""
