"""Errors a user can act on. Their text is one line meant for a person."""

from __future__ import annotations


class TunnelError(Exception):
    """A failure with a one-line explanation (relay unreachable, wrong secret, ...).

    ``permanent`` is True when trying again cannot help (a wrong secret, an impostor):
    long-running commands stop instead of retrying.
    """

    permanent = False


class AuthError(TunnelError):
    """Authentication failed: wrong secret, or someone is impersonating the peer."""

    permanent = True


def printable(text: str, limit: int = 300) -> str:
    """Text from the network made safe for a terminal: no control characters, bounded."""
    clean = "".join(ch if ch.isprintable() else "?" for ch in text)
    return clean if len(clean) <= limit else clean[:limit] + "…"
