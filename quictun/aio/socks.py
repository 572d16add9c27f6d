"""``connect --socks``: a local SOCKS5 (RFC 1928) and HTTP CONNECT entry into the tunnel.

Each local client is one :class:`SocksEntry`: it answers the SOCKS5 greeting, reads the
CONNECT request (:mod:`quictun.proto.socks`), opens a proxy-target stream
(``OP_TARGET``), and waits for the serving side's verdict, which is where the
``--allow`` rules and DNS live. The verdict becomes the SOCKS reply code (or HTTP
status); on success the local transport is handed to the stream's bridge, so from then
on bytes flow as for any forwarded connection.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

from ..proto import control as ctl
from ..proto import socks as sp
from .bridge import StreamBridge

if TYPE_CHECKING:
    from .local import CurrentTunnel

log = logging.getLogger("quictun")

HANDSHAKE_TIMEOUT = 30.0  # s a local client may take to send its request


class SocksEntry(asyncio.Protocol):
    """One local proxy client (see the module docstring)."""

    def __init__(self, current: CurrentTunnel) -> None:
        self._current = current
        self._buf = bytearray()
        self._greeted = False
        self._transport: asyncio.Transport | None = None
        self._request: sp.Request | None = None
        self._bridge: StreamBridge | None = None
        self._timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]
        self._timer = asyncio.get_running_loop().call_later(HANDSHAKE_TIMEOUT, self._close)

    def data_received(self, data: bytes) -> None:
        if self._request is not None:  # the verdict is pending: keep the early bytes
            self._buf.extend(data)
            return
        self._buf.extend(data)
        try:
            while self._request is None:
                step = sp.parse(bytes(self._buf), self._greeted)
                if step is None:
                    return
                del self._buf[:step.consumed]
                if isinstance(step, sp.Greeting):
                    self._greeted = True
                    self._write(step.reply)
                else:
                    self._open(step)
        except sp.SocksError as exc:
            log.info("socks: %s", exc)
            if exc.reply:
                self._write(exc.reply)
            self._close()

    def _open(self, request: sp.Request) -> None:
        self._request = request
        tunnel = self._current()
        if tunnel is None or tunnel.closed:
            self._answer(ctl.OpenReply(ctl.ST_NET_UNREACHABLE, "the tunnel is down"))
            return
        try:
            bridge = tunnel.bridge(host=request.host, port=request.port)
        except ValueError:  # a name that is not ASCII, or too long for a request
            self._answer(ctl.OpenReply(ctl.ST_BAD_ADDRESS, "unusable host name"))
            return
        assert self._transport is not None
        self._transport.pause_reading()
        self._bridge = bridge
        bridge.on_reply = self._answer

    def _answer(self, reply: ctl.OpenReply) -> None:
        request = self._request
        assert request is not None
        if self._timer is not None:
            self._timer.cancel()
        head = (sp.socks_reply(reply.status) if request.dialect == sp.SOCKS5
                else sp.http_reply(reply.status))
        t = self._transport
        if t is None or t.is_closing():
            return
        self._write(head)
        if not reply.ok:
            log.info("socks: %s:%d: %s", request.host[:100], request.port, reply.text)
            self._close()
            return
        bridge = self._bridge
        assert bridge is not None
        t.set_protocol(bridge)
        bridge.connection_made(t)
        if self._buf:
            early, self._buf = bytes(self._buf), bytearray()
            bridge.data_received(early)
        t.resume_reading()

    def eof_received(self) -> bool:
        if self._request is None:
            self._close()
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        if self._timer is not None:
            self._timer.cancel()
        if self._bridge is not None and self._bridge.reply is None:
            self._bridge.connection_lost(exc)  # gave up before the verdict: reset it

    def _write(self, data: bytes) -> None:
        if self._transport is not None and not self._transport.is_closing():
            self._transport.write(data)

    def _close(self) -> None:
        if self._transport is not None and not self._transport.is_closing():
            self._transport.close()


async def start_socks(host: str, port: int, current: CurrentTunnel) -> asyncio.AbstractServer:
    """Listen for local proxy clients on ``host:port`` (OSError if it cannot)."""
    loop = asyncio.get_running_loop()
    return await loop.create_server(lambda: SocksEntry(current), host, port)
