"""The TLS channel binding of a finished QUIC handshake, from aioquic or qh3.

Neither engine exposes a TLS exporter (RFC 8446 section 7.5: there is no
``export_keying_material`` in aioquic 1.7 or qh3 2.1), but both run TLS 1.3 in Python
and keep its key schedule on the connection's ``tls`` context: after the handshake,
``key_schedule.secret`` is the master secret and ``key_schedule.hash`` the transcript
hash through the client's Finished, on both ends (the server adds the client's Finished
it expects before it arrives). :func:`channel_binding` feeds those two values to
:func:`quictun.proto.pake.tls_channel_binding`, whose result is equal on both ends of
one connection, and unknown to anyone else (a relay that terminated QUIC on both sides
would hold two connections with two different bindings).

This reads engine internals; tests/quic/test_channel_binding.py checks every engine
pair, and :class:`BindingUnavailable` names the engine if a new version moves them.
"""

from __future__ import annotations

from typing import Any

from ..proto.pake import tls_channel_binding

__all__ = ["BindingUnavailable", "channel_binding"]


class BindingUnavailable(RuntimeError):
    """The connection's TLS state is not where this module expects (an engine version
    it does not know, or a handshake that has not finished)."""


def channel_binding(quic: Any) -> bytes:
    """32 bytes bound to this QUIC connection's TLS 1.3 handshake (see the module doc).

    Call it once the handshake completed (on ``HandshakeCompleted``).

    Raises:
        BindingUnavailable: the handshake is not complete, or the engine keeps its TLS
            state elsewhere.
    """
    tls = getattr(quic, "tls", None)
    ks = getattr(tls, "key_schedule", None)
    state = getattr(getattr(tls, "state", None), "name", "")
    if ks is None or not str(state).endswith("POST_HANDSHAKE"):
        raise BindingUnavailable(f"no finished TLS handshake on {type(quic).__module__}")
    try:
        secret = bytes(ks.secret)
        h = ks.hash.copy()
        digest = h.finalize() if hasattr(h, "finalize") else h.digest()
        alg = ks.algorithm
        name = alg.name if hasattr(alg, "name") else f"sha{int(alg)}"
    except (AttributeError, TypeError, ValueError) as exc:
        raise BindingUnavailable(f"cannot read the TLS key schedule of "
                                 f"{type(quic).__module__}: {exc}") from None
    return tls_channel_binding(secret, digest, name)
