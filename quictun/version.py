"""The version of this quictun (the one number pyproject.toml reads too)."""

__version__ = "0.1.0"
