"""The one UDP socket of a tunnel session.

:class:`UdpEndpoint` owns the socket that is punched and that QUIC runs over. Every
datagram is classified by its first byte (RFC 7983 as updated by RFC 9443): STUN
(0–3, with the magic cookie) goes to ``on_stun``, QUIC (64–255) to ``on_quic``, anything
else is dropped. Answers to our own STUN queries to the relay's reflectors are taken
out first. Addresses are always plain ``(ip, port)`` pairs; IPv4 peers of a dual-stack
socket are mapped to and from ``::ffff:a.b.c.d`` here and nowhere else. The socket calls
themselves (GSO/GRO batching, don't-fragment) are :class:`quictun.aio.udpio.UdpIO`'s.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from collections.abc import Callable

from ..proto import stun
from ..proto.addr import Addr, unmap
from .udpio import Offload, UdpIO

log = logging.getLogger("quictun.endpoint")


def _plain(addr: tuple) -> Addr:
    return unmap(addr[0]), addr[1]


class UdpEndpoint:
    """A bound UDP socket with STUN/QUIC demultiplexing.

    The socket is read directly from the event loop's reader callback, draining every
    queued datagram per wake-up (up to ``READ_BATCH`` reads, each maybe a GRO buffer of
    several datagrams): QUIC then flushes once per batch instead of once per packet,
    which is most of the per-packet cost in Python. :meth:`send_many` sends a flush's
    datagrams with as few system calls as the kernel allows (GSO, see
    :meth:`set_offload`; off until asked for).
    """

    READ_BATCH = 64

    def __init__(self) -> None:
        self._sock: socket.socket | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self.dual_stack = False
        self.on_stun: Callable[[bytes, Addr], None] = lambda data, addr: None
        self.on_quic: Callable[[bytes, Addr], None] = lambda data, addr: None
        self.on_too_big: Callable[[Addr, int], None] = lambda addr, size: None
        """Called when the stack refused a datagram of that size to addr (EMSGSIZE)."""
        self.io: UdpIO | None = None
        self._queries: dict[bytes, asyncio.Future[Addr]] = {}
        self.port = 0
        self.closed = False

    @classmethod
    async def bind(cls, host: str | None = None, port: int = 0) -> UdpEndpoint:
        """Bind a socket: dual-stack ``::`` where IPv6 exists, else ``0.0.0.0``."""
        return cls.open(host, port)

    @classmethod
    def open(cls, host: str | None = None, port: int = 0) -> UdpEndpoint:
        """Like :meth:`bind`, synchronously (needs a running event loop)."""
        loop = asyncio.get_running_loop()
        ep = cls()
        sock = None
        if host is None and socket.has_ipv6:
            try:
                sock = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
                sock.bind(("::", port))
                ep.dual_stack = True
            except OSError:
                if sock is not None:
                    sock.close()
                sock = None
        if sock is None:
            sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            sock.bind((host or "0.0.0.0", port))
        for opt in (socket.SO_RCVBUF, socket.SO_SNDBUF):
            try:
                sock.setsockopt(socket.SOL_SOCKET, opt, 4 * 1024 * 1024)
            except OSError:
                pass
        sock.setblocking(False)
        ep.io = UdpIO(sock, on_too_big=lambda a, n: ep.on_too_big(_plain(a), n))
        ep._sock, ep._loop = sock, loop
        loop.add_reader(sock.fileno(), ep._readable)
        ep.port = sock.getsockname()[1]
        return ep

    def set_offload(self, offload: Offload) -> None:
        """Use these kernel offloads from now on, where the kernel has them (see
        :class:`~quictun.aio.udpio.UdpIO`)."""
        if self.io is not None:
            self.io.configure(offload)

    # -- input -----------------------------------------------------------------------
    def _readable(self) -> None:
        if self.io is not None and self._sock is not None:
            self.io.receive(self.datagram_received, self.READ_BATCH)

    def datagram_received(self, data: bytes, addr: tuple) -> None:
        if not data:
            return
        first = data[0]
        if first >= 64:
            self.on_quic(data, _plain(addr))
        elif first < 4 and stun.is_stun(data):
            fut = self._queries.get(data[8:20])
            if fut is not None:
                try:
                    msg = stun.decode(data)
                except stun.StunError:
                    return
                mapped = msg.xor_mapped_address
                if msg.msg_type == stun.BINDING_SUCCESS and mapped and not fut.done():
                    fut.set_result(mapped)
                return
            self.on_stun(data, _plain(addr))

    # -- sending -------------------------------------------------------------------
    def sendto(self, data: bytes, addr: Addr, ttl: int | None = None) -> None:
        """Send one datagram; ``ttl`` (if given) is its IP TTL / IPv6 hop limit only."""
        if self._sock is None or self.closed:
            return
        if ttl is not None:
            self._send_ttl(data, addr, ttl)
            return
        target = self._sockaddr(addr)
        if target is not None and self.io is not None:
            self.io.send_one(data, target)

    def send_many(self, datagrams: list[bytes], addr: Addr) -> None:
        """Send datagrams to one address, in order, in as few system calls as possible
        (a full socket buffer drops the rest: QUIC recovers)."""
        if self._sock is None or self.closed or self.io is None:
            return
        target = self._sockaddr(addr)
        if target is not None:
            self.io.send(datagrams, target)

    def _sockaddr(self, addr: Addr) -> tuple[str, int] | None:
        """The socket's form of ``addr`` (IPv4-mapped on a dual-stack socket), or None if
        this socket cannot reach it (IPv6 from an IPv4-only socket)."""
        host = addr[0]
        if self.dual_stack and ":" not in host:
            return ("::ffff:" + host, addr[1])
        if not self.dual_stack and ":" in host:
            return None
        return (host, addr[1])

    def _send_ttl(self, data: bytes, addr: Addr, ttl: int) -> None:
        sock = self._sock
        assert sock is not None
        v6 = ":" in addr[0]
        if v6:
            level, opt = socket.IPPROTO_IPV6, socket.IPV6_UNICAST_HOPS
        else:  # also right for an IPv4-mapped peer of a dual-stack socket
            level, opt = socket.IPPROTO_IP, socket.IP_TTL
        try:
            old = sock.getsockopt(level, opt)
            sock.setsockopt(level, opt, ttl)
        except OSError as exc:
            log.debug("cannot set ttl: %s", exc)
            self.sendto(data, addr)
            return
        try:
            self.sendto(data, addr)
        finally:
            sock.setsockopt(level, opt, old)

    def close(self) -> None:
        if self._sock is None:
            return
        self.closed = True
        if self._loop is not None and not self._loop.is_closed():
            self._loop.remove_reader(self._sock.fileno())
        self._sock.close()
        self._sock = None

    # -- STUN queries ----------------------------------------------------------------
    async def stun_query(self, server: Addr, timeout: float = 1.5) -> Addr | None:
        """Ask a STUN server for our mapped address; None if it does not answer."""
        txid = os.urandom(12)
        fut: asyncio.Future[Addr] = asyncio.get_running_loop().create_future()
        self._queries[txid] = fut
        req = stun.binding_request(txid)
        try:
            deadline = asyncio.get_running_loop().time() + timeout
            delay = 0.1
            while not fut.done():
                self.sendto(req, server)
                left = deadline - asyncio.get_running_loop().time()
                if left <= 0:
                    return None
                try:
                    return _plain(await asyncio.wait_for(asyncio.shield(fut), min(delay, left)))
                except TimeoutError:
                    delay = min(delay * 2, 0.5)
            return _plain(fut.result())
        finally:
            self._queries.pop(txid, None)


class SocketBudget:
    """How many extra sockets (birthday slots, see :mod:`quictun.punch.birthday`) this
    process may hold at once, over all sessions: a busy server must not run out of file
    descriptors because peers behind symmetric NATs ask for 256 sockets each."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.open = 0

    def take(self) -> bool:
        """Reserve one socket (True), or False when the budget is spent."""
        if self.open >= self.limit:
            return False
        self.open += 1
        return True

    def give(self) -> None:
        """Return one reserved socket."""
        self.open = max(0, self.open - 1)


AUX_SOCKETS = SocketBudget(1024)
"""The process's budget of extra sockets."""
