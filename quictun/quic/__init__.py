"""The QUIC engines (aioquic, qh3) and quictun's flow-control overrides."""
