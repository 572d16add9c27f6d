"""The quictun signalling relay (``quictun-signal``)."""
