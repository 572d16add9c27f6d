"""Errors a user can act on. Their text is one line meant for a person."""

from __future__ import annotations


class TunnelError(Exception):
    """A failure with a one-line explanation (relay unreachable, wrong secret, ...)."""
