"""Pure codecs and small pure helpers, shared with the relay (no I/O, no clock)."""
