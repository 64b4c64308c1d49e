"""Benchmarks behind `rtpipe bench ...`: each prints a table, and JSON with --json."""
