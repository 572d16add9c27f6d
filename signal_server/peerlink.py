"""Direct TCP links between relay instances (shell): the path that carries the messages
and relayed packets of sessions whose members sit on different instances.

A link is one TCP connection, framed by :mod:`signal_server.peerwire` (4-byte length),
opened by the dialer's hello carrying the token the listener published in Redis. Links
are bidirectional: whichever side dialed first, both send on it, so a reply never needs
an address. Frames to one instance keep their order: while a dial is in progress they
wait in a queue and go out before anything sent later.

Relayed packets (``droppable``) are dropped while a link's send buffer is over
:data:`LINK_BUFFER_LIMIT` (QUIC recovers, as for a slow client); control frames never
are. TCP keepalive notices a vanished machine within about 15 s; a closed link is
reported through ``on_down`` once the last link with that instance is gone. An accepted
connection that sends no valid hello within :data:`HELLO_TIMEOUT` is closed.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import socket
from collections.abc import Callable

from . import peerwire as pw

__all__ = ["PeerLinks", "LINK_BUFFER_LIMIT", "DIAL_TIMEOUT", "split_hostport"]

logger = logging.getLogger("quictun.signal.cluster")

LINK_BUFFER_LIMIT = 4 * 1024 * 1024
DIAL_TIMEOUT = 3.0
HELLO_TIMEOUT = 5.0


def split_hostport(text: str) -> tuple[str, int]:
    """``("::1", 80)`` from ``[::1]:80``, ``("10.0.0.5", 80)`` from ``10.0.0.5:80``.

    Raises:
        ValueError: no port, or a port outside 0..65535.
    """
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"{text!r} is not HOST:PORT")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return host, int(port)


def _keepalive(sock: socket.socket | None) -> None:
    if sock is None:
        return
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        for opt, value in (("TCP_KEEPIDLE", 5), ("TCP_KEEPINTVL", 3), ("TCP_KEEPCNT", 3)):
            if hasattr(socket, opt):
                sock.setsockopt(socket.IPPROTO_TCP, getattr(socket, opt), value)
    except OSError:
        pass


class _Link(asyncio.Protocol):
    def __init__(self, links: PeerLinks, peer: str | None) -> None:
        self.links = links
        self.peer = peer  # known when we dialed; learnt from the hello when accepted
        self.reader = pw.FrameReader()
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        _keepalive(transport.get_extra_info("socket"))
        if self.peer is None:  # accepted: the dialer must say who it is, and soon
            asyncio.get_running_loop().call_later(HELLO_TIMEOUT, self._hello_deadline)

    def _hello_deadline(self) -> None:
        if self.peer is None and self.transport is not None and not self.transport.is_closing():
            logger.warning("closing a peer link that sent no hello within %g s", HELLO_TIMEOUT)
            self.abort()

    def data_received(self, data: bytes) -> None:
        try:
            frames = self.reader.feed(data)
        except pw.PeerProtocolError as exc:
            logger.warning("closing a peer link (%s): %s", self.peer or "not identified", exc)
            self.abort()
            return
        links = self.links
        for f in frames:
            if self.peer is None:
                if not self._accept(f):
                    return
                continue
            links.bytes_in += len(f)
            links.frames_in += 1
            links.on_frame(self.peer, f)

    def _accept(self, first: bytes) -> bool:
        try:
            hello = pw.decode_hello(first)
        except pw.PeerProtocolError as exc:
            logger.warning("refused a peer link: %s", exc)
            self.abort()
            return False
        if not hmac.compare_digest(hello.token.encode(), self.links.token.encode()):
            logger.warning("refused a peer link from %r: wrong token (another cluster's "
                           "instance, or a stale record?)", hello.instance)
            self.abort()
            return False
        self.peer = hello.instance
        self.links.attach(self)
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        self.links.detach(self)

    def send(self, data: bytes, droppable: bool) -> None:
        t = self.transport
        if t is None or t.is_closing():
            return
        if droppable and t.get_write_buffer_size() > LINK_BUFFER_LIMIT:
            self.links.dropped += 1
            return
        t.write(pw.frame(data))
        self.links.bytes_out += len(data)
        self.links.frames_out += 1

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()


class PeerLinks:
    """This instance's links: a listener and the links to other instances.

    ``on_frame(instance, data)`` gets every frame from an identified instance,
    ``on_down(instance)`` runs when the last link with it closed, and
    ``on_unreachable(instance, queued)`` when a dial failed with no other link to
    that instance (``queued`` are the frames that were waiting for it).
    """

    def __init__(self, instance: str, token: str, *,
                 on_frame: Callable[[str, bytes], None],
                 on_down: Callable[[str], None],
                 on_unreachable: Callable[[str, list[tuple[bytes, bool]]], None]) -> None:
        self.instance = instance
        self.token = token
        self.on_frame = on_frame
        self.on_down = on_down
        self.on_unreachable = on_unreachable
        self._send_link: dict[str, _Link] = {}
        self._all: dict[str, set[_Link]] = {}
        self._dialing: dict[str, list[tuple[bytes, bool]]] = {}
        self._server: asyncio.Server | None = None
        self._closing = False
        self.bytes_in = self.bytes_out = self.frames_in = self.frames_out = 0
        self.dropped = 0

    async def listen(self, host: str, port: int) -> str:
        """Listen for links; returns the ``ip:port`` to advertise.

        Raises:
            OSError: the address cannot be bound.
        """
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(lambda: _Link(self, None), host, port)
        bound = self._server.sockets[0].getsockname()
        ip = str(bound[0])
        return f"[{ip}]:{bound[1]}" if ":" in ip else f"{ip}:{bound[1]}"

    @property
    def count(self) -> int:
        """Open, identified links."""
        return sum(len(s) for s in self._all.values())

    def connected(self, instance: str) -> bool:
        return instance in self._send_link or instance in self._dialing

    def send(self, instance: str, data: bytes, droppable: bool,
             address: str | None = None, token: str = "") -> bool:
        """Send on the link to ``instance``, dialing ``address`` (with the ``token`` that
        instance published) if there is none yet. False when there is no link and no
        address (the caller uses pub/sub)."""
        queue = self._dialing.get(instance)
        if queue is not None:
            queue.append((data, droppable))
            return True
        link = self._send_link.get(instance)
        if link is not None:
            link.send(data, droppable)
            return True
        if not address:
            return False
        self._dialing[instance] = [(data, droppable)]
        asyncio.ensure_future(self._dial(instance, address, token))
        return True

    async def _dial(self, instance: str, address: str, token: str) -> None:
        loop = asyncio.get_running_loop()
        try:
            host, port = split_hostport(address)
            _, link = await asyncio.wait_for(
                loop.create_connection(lambda: _Link(self, instance), host, port),
                DIAL_TIMEOUT)
        except (OSError, TimeoutError, ValueError) as exc:
            queued = self._dialing.pop(instance, [])
            existing = self._send_link.get(instance)
            if existing is not None:  # the other side dialed us meanwhile: use that
                for data, droppable in queued:
                    existing.send(data, droppable)
                return
            logger.warning("cannot open a peer link to instance %s at %s (%s)", instance,
                           address, exc or type(exc).__name__)
            self.on_unreachable(instance, queued)
            return
        assert link.transport is not None
        link.transport.write(pw.frame(pw.encode_hello(pw.LinkHello(self.instance, token))))
        self.attach(link)
        queued = self._dialing.get(instance, [])
        target = self._send_link.get(instance, link)
        for data, droppable in queued:
            target.send(data, droppable)
        self._dialing.pop(instance, None)

    def attach(self, link: _Link) -> None:
        assert link.peer is not None
        self._all.setdefault(link.peer, set()).add(link)
        self._send_link.setdefault(link.peer, link)

    def detach(self, link: _Link) -> None:
        peer = link.peer
        if peer is None:
            return
        links = self._all.get(peer, set())
        links.discard(link)
        if self._send_link.get(peer) is link:
            del self._send_link[peer]
            if links:
                self._send_link[peer] = next(iter(links))
        if not links and peer in self._all:
            del self._all[peer]
            if not self._closing:
                logger.info("peer link with instance %s closed", peer)
                self.on_down(peer)

    async def close(self) -> None:
        """Stop listening and close every link (no ``on_down`` calls)."""
        self._closing = True
        if self._server is not None:
            self._server.close()
        for links in list(self._all.values()):
            for link in list(links):
                link.abort()
        if self._server is not None:
            await self._server.wait_closed()
