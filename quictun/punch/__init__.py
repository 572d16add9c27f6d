"""The sans-I/O path manager: punching, validation, path choice."""
