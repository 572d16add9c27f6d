"""The asyncio binding: sockets, the relay client, sessions, client and server."""
