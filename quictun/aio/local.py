"""The local ends of ``connect``: TCP, Unix-socket and UDP listeners over a tunnel that
may come and go (``connect --listen`` re-establishes it).

Each :class:`Listener` takes ``current()``, which returns the tunnel that is up now (or
None), so it keeps its socket across tunnel restarts. A Unix listening socket is made
the way a user expects (:func:`bind_unix`): it belongs to the user, mode 0600 unless
told otherwise, set before ``listen()`` so nobody can connect in between; a path that
exists and is not a socket is refused; an old socket file is removed only when nobody
listens on it; ours is removed when the listener closes.

Listeners bind before the first tunnel is built (a busy port is reported at once), so a
stream connection can arrive before there is a tunnel: it waits, unread, and joins the
first tunnel once :meth:`Listener.first_tunnel` says it is up (or is closed if it could
not be opened). After that, a connection arriving while the tunnel is down is closed at
once (a restart may take long; the client should retry).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import socket
import stat
from collections.abc import Callable
from typing import TYPE_CHECKING

from ..config import TunnelConfig
from ..errors import TunnelError
from ..proto.services import ListenSpec
from .datagrams import DatagramFlow, UdpListener

if TYPE_CHECKING:
    from .client import Tunnel

log = logging.getLogger("quictun")

CurrentTunnel = Callable[[], "Tunnel | None"]


MAX_EARLY = 64  # stream connections per listener held until the first tunnel is up


class _Refuse(asyncio.Protocol):
    """Closes a local connection at once: the tunnel is down (being re-established)."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport.close()


class _Early(asyncio.Protocol):
    """A local connection that arrived before the first tunnel was up: not read until
    :meth:`join` hands it to the tunnel (or closes it: no tunnel)."""

    def __init__(self, waiting: list[_Early]) -> None:
        self.transport: asyncio.Transport | None = None
        self._data = bytearray()  # anything read before the pause took effect
        self._eof = False
        waiting.append(self)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        transport.pause_reading()  # type: ignore[attr-defined]

    def data_received(self, data: bytes) -> None:
        self._data += data

    def eof_received(self) -> bool:
        self._eof = True
        return True  # keep the transport: its reply may still come

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None

    def join(self, bridge: Callable[[], asyncio.Protocol] | None) -> bool:
        """Hand the connection to ``bridge()`` (None: close it). False if it was gone."""
        t = self.transport
        if t is None or t.is_closing():
            return False
        if bridge is None:
            t.close()
            return True
        protocol = bridge()
        t.set_protocol(protocol)
        protocol.connection_made(t)
        if self._data:
            protocol.data_received(bytes(self._data))
        if self._eof:
            protocol.eof_received()
        else:
            t.resume_reading()
        return True


def bind_unix(path: str, mode: int = 0o600) -> socket.socket:
    """A listening Unix socket at ``path`` with ``mode``. Raises TunnelError (one line)."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        st = None
    except OSError as exc:
        raise TunnelError(f"--listen unix:{path}: {exc.strerror}") from None
    if st is not None:
        if not stat.S_ISSOCK(st.st_mode):
            raise TunnelError(f"--listen unix:{path}: the path exists and is not a socket; "
                              "choose another path (nothing was removed)")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(path)
        except OSError as exc:
            if exc.errno not in (errno.ECONNREFUSED, errno.ENOENT):
                raise TunnelError(f"--listen unix:{path}: {exc.strerror}") from None
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)  # a stale socket: nobody listens on it
            log.info("removed the stale socket %s", path)
        else:
            raise TunnelError(f"--listen unix:{path}: another program listens on this "
                              "socket; choose another path")
        finally:
            probe.close()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(path)
        os.chmod(path, mode)  # before listen(): connecting is refused until then
        sock.listen(128)
    except OSError as exc:
        sock.close()
        raise TunnelError(f"--listen unix:{path}: {exc.strerror}") from None
    sock.setblocking(False)
    return sock


class Listener:
    """One ``--listen`` endpoint; :meth:`start` binds it (errors before any tunnel)."""

    def __init__(self, spec: ListenSpec, service: str | None, current: CurrentTunnel,
                 config: TunnelConfig, unix_mode: int = 0o600) -> None:
        self.spec = spec
        self.service = spec.service if spec.service is not None else service
        self.current = current
        self.config = config
        self.unix_mode = unix_mode
        self.server: asyncio.AbstractServer | None = None
        self.udp: UdpListener | None = None
        self.bound = ""
        self._unix_ino: int | None = None
        self._early: list[_Early] | None = []  # None once the first tunnel was settled

    async def start(self) -> str:
        """Bind; returns what is bound (``127.0.0.1:2222``, ``udp:…``, ``unix:…``)."""
        loop = asyncio.get_running_loop()
        spec = self.spec
        try:
            if spec.kind == "udp":
                self.udp = UdpListener(self._open_flow, self.config, spec.local_text())
                transport, _ = await loop.create_datagram_endpoint(
                    lambda: self.udp, local_addr=(spec.host, spec.port))  # type: ignore[arg-type, return-value]
                host, port = transport.get_extra_info("sockname")[:2]
                self.bound = f"udp:{_hostport(host, port)}"
            elif spec.kind == "unix":
                sock = bind_unix(spec.path, self.unix_mode)
                self._unix_ino = os.stat(spec.path).st_ino
                self.server = await loop.create_unix_server(self._protocol, sock=sock)
                self.bound = f"unix:{spec.path}"
            else:
                self.server = await loop.create_server(self._protocol, spec.host, spec.port)
                host, port = self.server.sockets[0].getsockname()[:2]
                self.bound = _hostport(host, port)
        except OSError as exc:
            raise TunnelError(f"cannot listen on {spec.local_text()}: "
                              f"{exc.strerror or exc}") from None
        return self.bound

    def first_tunnel(self, tunnel: Tunnel | None) -> None:
        """The first tunnel is up (None: it could not be opened, or the command stops):
        the connections that waited for it join it, or are closed."""
        waiting, self._early = self._early or [], None
        up = tunnel is not None and not tunnel.closed
        joined = sum(conn.join((lambda: self._bridge(tunnel)) if up else None)  # type: ignore[arg-type]
                     for conn in waiting)
        if joined and not up:
            log.info("%s: closed %d local connection(s) that waited for the tunnel",
                     self.bound, joined)

    def _protocol(self) -> asyncio.Protocol:
        t = self.current()
        if t is None or t.closed:
            if self._early is not None and len(self._early) < MAX_EARLY:
                return _Early(self._early)
            return _Refuse()
        return self._bridge(t)

    def _bridge(self, t: Tunnel) -> asyncio.Protocol:
        bridge = t.bridge(self.service)
        if self.service is not None:
            label = self.service

            def refused(reply: object) -> None:
                if not getattr(reply, "ok", True):
                    log.warning("%s: %s", label, getattr(reply, "text", reply))

            bridge.on_reply = refused
        return bridge

    def _open_flow(self) -> DatagramFlow | None:
        t = self.current()
        if t is None or t.closed:
            return None
        flow = t.handler.open_flow(self.service)
        label = self.service or "udp"

        def refused(reply_future: asyncio.Future[object]) -> None:
            reply = reply_future.result()
            if not getattr(reply, "ok", True):
                log.warning("%s: %s", label, getattr(reply, "text", reply))

        flow.opened.add_done_callback(refused)  # type: ignore[arg-type]
        return flow

    def stats_text(self) -> str | None:
        """A UDP listener's counters, for the log (None for stream listeners)."""
        if self.udp is None:
            return None
        u = self.udp.totals()
        return (f"udp {self.bound}: {self.udp.flows_opened} flows, {u.datagrams_in} "
                f"datagrams sent, {u.datagrams_out} received, {u.dropped_too_big} too big, "
                f"{u.dropped_queue + u.dropped_refused + self.udp.dropped_no_tunnel} dropped")

    def close(self) -> None:
        if self._early is not None:
            self.first_tunnel(None)
        if self.server is not None:
            self.server.close()
        if self.udp is not None:
            self.udp.close()
        if self.spec.kind == "unix" and self._unix_ino is not None:
            with contextlib.suppress(OSError):
                if os.stat(self.spec.path).st_ino == self._unix_ino:
                    os.unlink(self.spec.path)  # ours still: remove it


def _hostport(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
