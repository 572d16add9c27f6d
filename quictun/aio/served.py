"""The clients one ``serve`` is serving: each session's record, its closing line, and
how they all end when ``serve`` stops.

Used by :class:`quictun.aio.server.Server`. A :class:`ServedSession` lives from the
client's confirmed hello until its QUIC connection ends; :func:`log_summary` writes the
one line (and JSON fields) a user reads about it afterwards; :func:`close_all` ends every
session at once so that each client learns it within a round trip rather than after an
idle timeout.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass

from ..errors import TunnelError, printable
from ..proto import signalling as sigproto
from ..proto.resume import ResumeKey
from .client import StatusCallback
from .handlers import ServerHandler
from .relay import SignalClient
from .session import PeerSession

__all__ = ["ServedSession", "close_all", "log_summary"]

log = logging.getLogger("quictun")


@dataclass
class ServedSession:
    """One client's session, as the server keeps it."""

    session: PeerSession
    started: float
    client_fp: str = ""
    relay_closed: bool = False  # the relay already ended this session (no Close needed)
    resume_key: ResumeKey | None = None  # given to the relay: the session may move links


async def close_all(sessions: Mapping[int, ServedSession], sc: SignalClient | None) -> None:
    """Close every session (CONNECTION_CLOSE, and ``close`` to the relay over ``sc`` while
    that link is up, so that each client knows at once, also over a relayed path), then
    wait for their port mappings to be deleted. Idempotent."""
    served = list(sessions.items())
    for _sid, s in served:
        s.session.close("server stopped")
    if sc is not None and sc.connected and served:
        await asyncio.sleep(0)  # the CONNECTION_CLOSEs leave first (the relay path too)
        for sid, s in served:
            if not s.relay_closed:
                s.relay_closed = True
                with contextlib.suppress(TunnelError):
                    await sc.send(sigproto.Close(session=sid, reason="server stopped"))
    await asyncio.gather(*(s.session.released() for _sid, s in served))


def log_summary(served: ServedSession, on_event: StatusCallback | None) -> None:
    """The per-client line: totals, then each service's connections and bytes (also as
    JSON fields with ``--log-format json``); to ``on_event`` when given, else the log."""
    drv = served.session.driver
    h = served.session.handler
    per = h.opener.totals() if isinstance(h, ServerHandler) else {}
    seconds = round(time.monotonic() - served.started, 1)
    closed = h.closed if h is not None else None
    why = printable(closed.result()) if closed is not None and closed.done() \
        and not closed.cancelled() else ""
    text = (f"client {served.client_fp[:16]} disconnected after {seconds:.1f} s"
            f"{f' ({why})' if why else ''}, "
            f"{getattr(h, 'connections', 0)} connections, "
            f"{drv.bytes_in if drv else 0} bytes in, {drv.bytes_out if drv else 0} out")
    if per:
        text += "; " + "; ".join(f"{k}: {v.text()}" for k, v in sorted(per.items()))
    fields = {"event": "client-disconnected", "client": served.client_fp,
              "seconds": seconds, "reason": why, "bytes_in": drv.bytes_in if drv else 0,
              "bytes_out": drv.bytes_out if drv else 0,
              "services": {k: v.as_dict() for k, v in sorted(per.items())}}
    if on_event is not None:
        on_event(text)
    else:
        log.info("%s", text, extra={"fields": fields})
