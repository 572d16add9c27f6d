"""The local ends of ``connect``: TCP, Unix-socket and UDP listeners over a tunnel that
may come and go (``connect --listen`` re-establishes it).

Each :class:`Listener` takes ``current()``, which returns the tunnel that is up now (or
None), so it keeps its socket across tunnel restarts. Given a :class:`TunnelSlot` (which
is such a callable), a connection that arrives while no tunnel is up (before the first
one, or while a lost one is being re-established) waits for the next tunnel, up to
``TunnelConfig.tunnel_wait`` seconds, instead of being closed at once; its first bytes
are kept meanwhile (at most 64 such connections per listener; more are closed at once).
Listeners bind before the first tunnel is built (a busy port is reported at once); when
the first tunnel cannot be opened, or the command stops, the connections still waiting
are closed (:meth:`Listener.drop_waiting`), with one log line.

A Unix listening socket is made the way a user expects (:func:`bind_unix`): it belongs
to the user, mode 0600 unless told otherwise, set before ``listen()`` so nobody can
connect in between; a path that exists and is not a socket is refused; an old socket
file is removed only when nobody listens on it; ours is removed when the listener
closes.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import socket
import stat
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from ..config import TunnelConfig
from ..errors import TunnelError, printable
from ..proto import control as ctl
from ..proto.limits import Quieter
from ..proto.services import ListenSpec
from .bridge import StreamBridge
from .datagrams import DatagramFlow, UdpListener

if TYPE_CHECKING:
    from .client import Tunnel

log = logging.getLogger("quictun")

CurrentTunnel = Callable[[], "Tunnel | None"]
REFUSAL_CODES = (ctl.ERR_TARGET_REFUSED, ctl.ERR_TARGET_TIMEOUT, ctl.ERR_TARGET_UNREACHABLE)


MAX_WAITING = 64  # stream connections per listener held while no tunnel is up


class _Refuse(asyncio.Protocol):
    """Closes a local connection at once: the tunnel is down (being re-established)."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport.close()


class TunnelSlot:
    """The tunnel that is up now, or None; call it for :data:`CurrentTunnel`.

    The owner calls :meth:`set` with each new tunnel (None when it died); listeners :meth:`wait`
    for one. ``on_wanted`` is called when someone starts waiting (the owner may retry at
    once instead of finishing its backoff)."""

    def __init__(self) -> None:
        self.tunnel: Tunnel | None = None
        self.on_wanted: Callable[[], None] | None = None
        self._waiters: set[asyncio.Future[None]] = set()

    def __call__(self) -> Tunnel | None:
        t = self.tunnel
        return t if t is not None and not t.closed else None

    def set(self, tunnel: Tunnel | None) -> None:
        self.tunnel = tunnel
        if tunnel is not None:
            for fut in self._waiters:
                if not fut.done():
                    fut.set_result(None)

    async def wait(self, timeout: float) -> Tunnel | None:
        """The tunnel that is up now or within ``timeout`` seconds, else None."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while (t := self()) is None:
            left = deadline - loop.time()
            if left <= 0:
                return None
            fut = loop.create_future()
            self._waiters.add(fut)
            if self.on_wanted is not None:
                self.on_wanted()
            try:
                await asyncio.wait_for(fut, left)
            except TimeoutError:
                return None
            finally:
                self._waiters.discard(fut)
        return t


class _Waiting(asyncio.Protocol):
    """A local connection that waits for a tunnel (see :class:`TunnelSlot`), reading
    nothing meanwhile; then it hands its transport to the new stream's bridge."""

    def __init__(self, listener: Listener, slot: TunnelSlot) -> None:
        self._listener = listener
        self._slot = slot
        self._transport: asyncio.Transport | None = None
        self._early: list[bytes] = []
        self._eof = False
        self._task: asyncio.Task[None] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]
        self._transport.pause_reading()  # type: ignore[union-attr]
        self._listener._waiting.add(self)
        self._task = asyncio.get_running_loop().create_task(self._wait())

    def drop(self) -> bool:
        """Close the connection: no tunnel will come. False if it was gone already."""
        if self._task is not None:
            self._task.cancel()
        t, self._transport = self._transport, None
        if t is None or t.is_closing():
            return False
        t.close()
        return True

    def data_received(self, data: bytes) -> None:
        self._early.append(data)

    def eof_received(self) -> bool:
        self._eof = True
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        if self._task is not None:
            self._task.cancel()
        self._transport = None
        self._listener._waiting.discard(self)

    async def _wait(self) -> None:
        wait = self._listener.config.tunnel_wait
        tunnel = await self._slot.wait(wait)
        self._listener._waiting.discard(self)
        transport = self._transport
        if transport is None or transport.is_closing():
            return
        if tunnel is None:
            log.warning("%s: no tunnel within %g s; closed a local connection",
                        self._listener.bound, wait)
            transport.abort()
            return
        bridge = self._listener.new_bridge(tunnel)
        transport.set_protocol(bridge)
        bridge.connection_made(transport)
        for chunk in self._early:
            bridge.data_received(chunk)
        if self._eof:
            bridge.eof_received()
        else:
            transport.resume_reading()


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
        self._waiting: set[_Waiting] = set()  # at most MAX_WAITING
        self._quieter = Quieter(10.0)

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

    def drop_waiting(self) -> None:
        """No tunnel will come (the first one could not be opened, or the command stops):
        close the connections that wait for one, with one log line."""
        waiting, self._waiting = self._waiting, set()
        closed = sum(conn.drop() for conn in waiting)
        if closed:
            log.info("%s: closed %d local connection(s) that waited for the tunnel",
                     self.bound, closed)

    def _protocol(self) -> asyncio.Protocol:
        t = self.current()
        if t is None or t.closed:
            if isinstance(self.current, TunnelSlot) and len(self._waiting) < MAX_WAITING:
                return _Waiting(self, self.current)
            return _Refuse()
        return self.new_bridge(t)

    def new_bridge(self, t: Tunnel) -> StreamBridge:
        """A new stream of ``t`` to this listener's service, for one local connection;
        a refusal (the serving side could not connect its target) is logged, one line
        every 10 s at most."""
        bridge = t.bridge(self.service)
        if self.service is not None:

            def refused(reply: ctl.OpenReply) -> None:
                if reply.status in ctl.TARGET_FAILURES:
                    self._refused(t.name, reply.status, printable(reply.text))
                elif not reply.ok:
                    log.warning("%s: %s", self.service, printable(reply.text))

            bridge.on_reply = refused
        handler_done = bridge.on_done

        def done(b: StreamBridge) -> None:
            if handler_done is not None:
                handler_done(b)
            if b.reset_code in REFUSAL_CODES:
                self._refused(t.name, b.reset_code, "")

        bridge.on_done = done
        return bridge

    def _refused(self, name: str, status: int, detail: str) -> None:
        left_out = self._quieter.allow(self.bound, time.monotonic())
        if left_out is not None:
            more = f" ({left_out} more since the last line)" if left_out else ""
            log.warning("%s: %s%s", self.bound, ctl.describe_refusal(
                name, self.service, status, detail=detail), more)

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
        self.drop_waiting()
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
