"""The network edge (`network.edge`): Kyutai's /api/chat websocket protocol in front of the pipeline."""
