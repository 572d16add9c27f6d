"""The asyncio shell around :class:`~signal_server.matchmaker.Matchmaker`.

It owns the sockets: WebSocket listeners (``websockets.asyncio.server``) and two UDP
STUN Binding responders, one on the same port number as the WebSocket listener and one
on a second port. Every WebSocket frame is handed to the matchmaker with
``loop.time()``; its outputs are queued per connection and written by one writer task
per connection, so a slow reader never blocks anyone else (its relayed packets are
dropped when its queue is full; a full queue of control messages disconnects it).

With ``RelayConfig.redis_url`` the relay is one instance of a cluster: the matchmaker's
cluster effects are performed by :class:`signal_server.cluster.Cluster` (Redis and peer
links), whose answers come back through the ``ClusterFeed`` methods below. ``GET
/healthz`` then answers 503 while Redis is unreachable; ``GET /metrics`` serves
Prometheus text either way.

Use :class:`RelayServer` from code and tests, :func:`run_relay` to serve until
cancelled, or the ``quictun-signal`` command (:mod:`signal_server.cli`).
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import http
import itertools
import logging
import os
import socket
import ssl
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.datastructures import Headers
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response

from quictun.proto import signalling as sp
from quictun.proto import stun
from quictun.proto.addr import format_addr, unmap

from .matchmaker import CLOSE_POLICY, Disconnect, Matchmaker, MatchmakerConfig, Send
from .metrics import CONTENT_TYPE, render
from .registry import Registry
from .servermetrics import metric_families
from .types import Claim, ClaimResult, HeldName, Holder, Lookup, LostName

if TYPE_CHECKING:
    from .cluster import Cluster

__all__ = ["RelayConfig", "RelayServer", "run_relay"]

logger = logging.getLogger("quictun.signal")
ws_logger = logging.getLogger("quictun.signal.websockets")

#: Frames queued per connection before relayed packets are dropped.
SEND_QUEUE_LIMIT = 256


@dataclass
class RelayConfig:
    """Everything :class:`RelayServer` needs: the shell's own settings here, the
    matchmaker's (token, relaying, limits, timeouts) in ``matchmaker``. Times in seconds.

    ``host`` None (default) listens on all IPv4 and IPv6 addresses; a string or a list
    of IP addresses listens on those. ``port`` 0 picks a free port (the same number is
    used for TCP and the first STUN UDP socket). ``stun_port2`` 0 picks any free port.
    The shell fills in ``matchmaker.stun_ports`` and ``matchmaker.instance``.
    """

    host: str | Sequence[str] | None = None
    port: int = 8765
    ssl_context: ssl.SSLContext | None = None
    matchmaker: MatchmakerConfig = field(default_factory=MatchmakerConfig)
    stun_port2: int = 0
    max_per_ip: int = 64
    max_connections: int = 20000
    max_size: int = 64 * 1024
    max_queue: int = 4
    ping_interval: float | None = 20.0
    ping_timeout: float | None = 20.0
    registry: Registry | None = field(default=None, repr=False)
    #: ``redis://HOST:PORT/DB``: join the cluster sharing that Redis (None: standalone)
    redis_url: str | None = field(default=None, repr=False)
    #: peer links between instances: "auto", "off" (pub/sub only) or "HOST:PORT"
    peer_link: str = "auto"
    #: this instance's id in the cluster (None: a random one)
    instance: str | None = None
    cluster_heartbeat: float = 1.0
    instance_ttl: float = 6.0


class _StunResponder(asyncio.DatagramProtocol):
    """Answers STUN Binding requests with XOR-MAPPED-ADDRESS; ignores everything else."""

    def __init__(self) -> None:
        self.transport: asyncio.DatagramTransport | None = None
        self.answered = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: Any) -> None:
        if self.transport is None or not stun.is_stun(data):
            return
        try:
            msg = stun.decode(data)
            if msg.msg_type != stun.BINDING_REQUEST:
                return
            reply = stun.binding_success(msg.txid, (addr[0], addr[1]))
        except (stun.StunError, ValueError):
            return
        self.answered += 1
        self.transport.sendto(reply, addr)

    def error_received(self, exc: Exception) -> None:  # ICMP errors etc.
        logger.debug("stun socket error: %s", exc)


def _udp_socket(host: str, port: int) -> socket.socket:
    family, _, _, _, sockaddr = socket.getaddrinfo(
        host, port, type=socket.SOCK_DGRAM, flags=socket.AI_PASSIVE
    )[0]
    sock = socket.socket(family, socket.SOCK_DGRAM)
    try:
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind(sockaddr)
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return sock


@dataclass
class _Peer:
    ws: ServerConnection
    ip: str
    queue: asyncio.Queue[str | bytes | Disconnect]
    writer: asyncio.Task[None] | None = None
    dropped: int = 0


class RelayServer:
    """The signalling relay: WebSocket matchmaking, packet relaying and STUN.

    After :meth:`start`, :attr:`port`, :attr:`stun_ports` and :attr:`url` are set.
    """

    def __init__(self, config: RelayConfig | None = None) -> None:
        self.config = config or RelayConfig()
        self.port: int = 0
        self.stun_ports: tuple[int, int] = (0, 0)
        self.hosts: list[str] = []
        self._servers: list[Server] = []
        self._udp: list[asyncio.DatagramTransport] = []
        self._peers: dict[int, _Peer] = {}
        self._per_ip: collections.Counter[str] = collections.Counter()
        self._ids = itertools.count(1)
        self._mm: Matchmaker | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at: float | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self.cluster: Cluster | None = None
        self.instance: str | None = None
        #: shell-level problems by kind (send-queue-overflow, writer, ...), for metrics
        self.errors: collections.Counter[str] = collections.Counter()
        self.send_dropped_total = 0
        self.connections_total = 0

    # --- lifecycle --------------------------------------------------------------------

    async def start(self) -> None:
        """Bind the WebSocket and STUN sockets and start serving.

        Raises:
            OSError: a port could not be bound.
        """
        self._loop = asyncio.get_running_loop()
        cfg = self.config
        if cfg.redis_url:
            await self._join_cluster()
        if cfg.host is None or cfg.host == "":
            hosts, optional = ["0.0.0.0", "::"], {"::"}
        elif isinstance(cfg.host, str):
            hosts, optional = [cfg.host], set()
        else:
            hosts, optional = list(cfg.host), set()
        attempts = 20 if cfg.port == 0 else 1
        for attempt in range(attempts):
            try:
                await self._bind(hosts, optional)
                break
            except OSError:
                await self._unbind()
                if attempt == attempts - 1:
                    if self.cluster is not None:
                        await self.cluster.stop()
                    raise
        self._mm = Matchmaker(
            dataclasses.replace(cfg.matchmaker, stun_ports=self.stun_ports,
                                instance=self.instance),
            cfg.registry, random_bytes=os.urandom,
        )
        logger.info("relay started: %s", self.listen_line())

    async def _join_cluster(self) -> None:
        """Connect to Redis before listening (raises ClusterError with one line)."""
        from .cluster import Cluster, ClusterConfig, new_instance_id

        cfg = self.config
        assert cfg.redis_url is not None
        self.instance = cfg.instance or new_instance_id()
        self.cluster = Cluster(
            ClusterConfig(url=cfg.redis_url, instance=self.instance,
                          lease=cfg.matchmaker.name_grace, peer_link=cfg.peer_link,
                          heartbeat=cfg.cluster_heartbeat, instance_ttl=cfg.instance_ttl,
                          max_per_ip=cfg.max_per_ip),
            self,
        )
        await self.cluster.start()

    async def _bind(self, hosts: list[str], optional: set[str]) -> None:
        cfg = self.config
        port, port2 = cfg.port, cfg.stun_port2
        self.hosts = []
        for host in hosts:
            try:
                server = await serve(
                    self._handler,
                    host,
                    port,
                    ssl=cfg.ssl_context,
                    process_request=self._process_request,
                    compression=None,
                    max_size=cfg.max_size,
                    max_queue=cfg.max_queue,
                    ping_interval=cfg.ping_interval,
                    ping_timeout=cfg.ping_timeout,
                    logger=ws_logger,
                    server_header=None,
                )
            except OSError as exc:
                if host in optional and self._servers:
                    logger.warning("not listening on %s: %s", host, exc)
                    continue
                raise
            self._servers.append(server)
            if port == 0:
                port = server.sockets[0].getsockname()[1]
            loop = asyncio.get_running_loop()
            for udp_port in (port, port2):
                sock = _udp_socket(host, udp_port)
                transport, _ = await loop.create_datagram_endpoint(_StunResponder, sock=sock)
                self._udp.append(transport)  # type: ignore[arg-type]
                if udp_port == 0:
                    port2 = sock.getsockname()[1]
            self.hosts.append(host)
        self.port = port
        self.stun_ports = (port, port2)

    async def _unbind(self) -> None:
        for server in self._servers:
            server.close()
            await server.wait_closed()
        for transport in self._udp:
            transport.close()
        self._servers, self._udp = [], []

    async def stop(self) -> None:
        """Close all listeners and connections, then leave the cluster (its pending
        releases are flushed first). Safe to call twice."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        await self._unbind()
        for peer in list(self._peers.values()):
            if peer.writer is not None:
                peer.writer.cancel()
        if self.cluster is not None:
            cluster, self.cluster = self.cluster, None
            if self._mm is not None and self._loop is not None:
                for conn_id in list(self._peers):
                    self._mm.close(conn_id, self._loop.time())
                self._drain(cluster)
            await cluster.stop()

    async def __aenter__(self) -> RelayServer:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # --- introspection ----------------------------------------------------------------

    @property
    def url(self) -> str:
        """A URL clients on this machine can use, e.g. ``ws://127.0.0.1:8765/``."""
        host = self.hosts[0] if self.hosts else "127.0.0.1"
        if host in ("0.0.0.0", ""):
            host = "127.0.0.1"
        elif host == "::":
            host = "::1"
        scheme = "wss" if self.config.ssl_context else "ws"
        return f"{scheme}://{format_addr(host, self.port)}/"

    def listen_line(self) -> str:
        """``quictun-signal listening on ws://0.0.0.0:8765/ (stun udp 8765, 40123)``."""
        scheme = "wss" if self.config.ssl_context else "ws"
        urls = ", ".join(f"{scheme}://{format_addr(h, self.port)}/" for h in self.hosts)
        cluster = f", cluster instance {self.instance}" if self.instance else ""
        return (
            f"quictun-signal listening on {urls} "
            f"(stun udp {self.stun_ports[0]}, {self.stun_ports[1]}{cluster})"
        )

    @property
    def stats(self) -> dict[str, int]:
        """connections, sessions, names, relayed_bytes, dropped_bytes, sessions_total."""
        stats = dict(self._mm.stats) if self._mm else {}
        stats["connections"] = len(self._peers)
        stats["send_dropped"] = sum(p.dropped for p in self._peers.values())
        return stats

    @property
    def matchmaker(self) -> Matchmaker | None:
        """The matchmaker (None before :meth:`start`)."""
        return self._mm

    @property
    def healthy(self) -> bool:
        """False while this instance needs Redis and cannot reach it."""
        return self.cluster is None or self.cluster.up

    def metrics_text(self) -> str:
        """Prometheus text for ``GET /metrics``."""
        return render(metric_families(self))

    # --- WebSocket handling -----------------------------------------------------------

    def _process_request(self, connection: ServerConnection, request: Request) -> Response | None:
        path = request.path.split("?", 1)[0]
        if path == "/healthz":
            if not self.healthy:
                return _plain(http.HTTPStatus.SERVICE_UNAVAILABLE,
                              "Redis unreachable: this instance cannot reach the cluster.\n")
            return connection.respond(http.HTTPStatus.OK, "OK\n")
        if path == "/metrics":
            return _plain(http.HTTPStatus.OK, self.metrics_text(), CONTENT_TYPE)
        if "websocket" not in request.headers.get("Upgrade", "").lower():
            return connection.respond(
                http.HTTPStatus.UPGRADE_REQUIRED, "This is a quictun WebSocket relay.\n"
            )
        ip = self._remote(connection)[0]
        if self._per_ip[ip] >= self.config.max_per_ip:
            logger.info("refusing %s: more than %d connections", ip, self.config.max_per_ip)
            self.errors["too-many-per-ip"] += 1
            return _plain(http.HTTPStatus.TOO_MANY_REQUESTS, "Too many connections.\n")
        if len(self._peers) >= self.config.max_connections:
            self.errors["relay-full"] += 1
            return _plain(http.HTTPStatus.SERVICE_UNAVAILABLE, "Relay is full.\n")
        return None

    @staticmethod
    def _remote(ws: ServerConnection) -> tuple[str, int]:
        try:
            addr = ws.remote_address
            ip, port = str(addr[0]), int(addr[1])
        except (TypeError, IndexError, OSError):
            return "?", 0
        return unmap(ip), port

    async def _admit(self, ws: ServerConnection, ip: str) -> bool:
        """The per-address cap, here and (in a cluster) over every live instance."""
        local_ok = self._per_ip[ip] < self.config.max_per_ip
        if local_ok and self.cluster is not None and not await self.cluster.ip_acquire(ip):
            logger.info("refusing %s: more than %d connections across the cluster", ip,
                        self.config.max_per_ip)
            local_ok = False
        if not local_ok:  # lost a race in _process_request, or over the cluster-wide cap
            self.errors["too-many-per-ip"] += 1
            await ws.send(sp.encode(sp.Error(sp.E_TOO_MANY_CONNECTIONS, "too many connections")))
            await ws.close(CLOSE_POLICY, "too many connections")
        return local_ok

    async def _handler(self, ws: ServerConnection) -> None:
        assert self._mm is not None and self._loop is not None
        ip, port = self._remote(ws)
        if not await self._admit(ws, ip):
            return
        self._per_ip[ip] += 1
        self.connections_total += 1
        conn_id = next(self._ids)
        peer = _Peer(ws, ip, asyncio.Queue(SEND_QUEUE_LIMIT))
        peer.writer = asyncio.create_task(self._writer(conn_id, peer))
        self._peers[conn_id] = peer
        addr = format_addr(ip, port)
        logger.info("conn %d: open from %s", conn_id, addr)
        mm = self._mm
        try:
            mm.open(conn_id, addr, self._loop.time())
            self._pump()
            async for message in ws:
                if isinstance(message, str):
                    mm.receive_text(conn_id, message, self._loop.time())
                else:
                    mm.receive_binary(conn_id, message, self._loop.time())
                self._pump()
        except ConnectionClosed:
            pass
        finally:
            mm.close(conn_id, self._loop.time())
            self._pump()
            self._peers.pop(conn_id, None)
            self._per_ip[ip] -= 1
            if self._per_ip[ip] <= 0:
                del self._per_ip[ip]
            if self.cluster is not None:
                self.cluster.ip_release(ip)
            self.send_dropped_total += peer.dropped
            if peer.writer is not None:
                peer.writer.cancel()
            logger.info(
                "conn %d: closed (code %s %s)", conn_id, ws.close_code, ws.close_reason or ""
            )

    async def _writer(self, conn_id: int, peer: _Peer) -> None:
        try:
            while True:
                item = await peer.queue.get()
                if isinstance(item, Disconnect):
                    await peer.ws.close(item.code, item.reason)
                    return
                await peer.ws.send(item)
        except ConnectionClosed:
            return
        except asyncio.CancelledError:
            raise
        except Exception:
            logger.exception("conn %d: writer failed", conn_id)
            self.errors["writer"] += 1
            peer.ws.transport.abort()

    def _pump(self) -> None:
        """Deliver the matchmaker's outputs (cluster effects to the cluster shell) and
        re-arm its timer."""
        assert self._mm is not None
        mm = self._mm
        while (out := mm.next_output()) is not None:
            if not isinstance(out, (Send, Disconnect)):
                if self.cluster is not None:
                    self.cluster.perform(out)
                continue
            peer = self._peers.get(out.conn_id)
            if peer is None:
                continue
            item: str | bytes | Disconnect = out.data if isinstance(out, Send) else out
            try:
                peer.queue.put_nowait(item)
            except asyncio.QueueFull:
                if isinstance(item, bytes):
                    peer.dropped += 1
                    continue
                logger.info("conn %d: send queue overflow, disconnecting", out.conn_id)
                self.errors["send-queue-overflow"] += 1
                mm.close(out.conn_id, self._loop.time() if self._loop else 0.0)
                if peer.writer is not None:
                    peer.writer.cancel()
                peer.ws.transport.abort()
        self._arm_timer()

    def _drain(self, cluster: Cluster) -> None:
        """Hand the outputs still queued to ``cluster`` (shutdown)."""
        assert self._mm is not None
        while (out := self._mm.next_output()) is not None:
            if not isinstance(out, (Send, Disconnect)):
                cluster.perform(out)

    def _arm_timer(self) -> None:
        assert self._mm is not None and self._loop is not None
        when = self._mm.get_timer()
        if when == self._timer_at:
            return
        if self._timer is not None:
            self._timer.cancel()
        self._timer_at = when
        self._timer = None if when is None else self._loop.call_at(when, self._on_timer)

    def _on_timer(self) -> None:
        assert self._mm is not None and self._loop is not None
        when = self._timer_at or 0.0
        self._timer, self._timer_at = None, None
        self._mm.handle_timer(max(self._loop.time(), when))
        self._pump()

    # --- ClusterFeed: answers from the cluster shell ---------------------------------

    def _now(self) -> float:
        assert self._loop is not None
        return self._loop.time()

    def claim_result(self, claim: Claim, result: ClaimResult) -> None:
        if self._mm is not None:
            self._mm.claim_result(claim, result, self._now())
            self._pump()

    def lookup_result(self, lookup: Lookup, result: Holder | None | str) -> None:
        if self._mm is not None:
            self._mm.lookup_result(lookup, result, self._now())
            self._pump()

    def receive_peer(self, instance: str, data: bytes) -> None:
        if self._mm is not None:
            self._mm.receive_peer(instance, data, self._now())
            self._pump()

    def peer_down(self, instance: str) -> None:
        if self._mm is not None:
            self._mm.peer_down(instance, self._now())
            self._pump()

    def names_lost(self, lost: list[LostName]) -> None:
        if self._mm is not None:
            self._mm.names_lost(lost, self._now())
            self._pump()

    def held_names(self) -> list[HeldName]:
        return self._mm.held_names() if self._mm is not None else []

    def peer_instances(self) -> set[str]:
        return self._mm.peer_instances() if self._mm is not None else set()

    def ip_counts(self) -> dict[str, int]:
        return dict(self._per_ip)


def _plain(status: http.HTTPStatus, body: str,
           content_type: str = "text/plain; charset=utf-8") -> Response:
    data = body.encode()
    headers = Headers([("Content-Type", content_type), ("Content-Length", str(len(data)))])
    return Response(status.value, status.phrase, headers, data)


async def run_relay(config: RelayConfig) -> None:
    """Start a relay, print its listening line to stdout, and serve until cancelled or
    until SIGTERM / SIGHUP (``systemctl stop``, a closed terminal). Either way it stops
    cleanly: every client gets a WebSocket close (1001, going away) at once, so a
    ``serve`` re-registers without waiting for a ping timeout, and a cluster instance
    releases its names in Redis and withdraws its record before it exits."""
    import signal

    server = RelayServer(config)
    await server.start()
    print(server.listen_line(), flush=True)
    loop = asyncio.get_running_loop()
    stop = loop.create_future()
    for signum in (signal.SIGTERM, signal.SIGHUP):
        try:
            loop.add_signal_handler(signum, lambda s=signum: stop.done() or stop.set_result(s))
        except (NotImplementedError, RuntimeError, ValueError):  # not the main thread
            pass
    try:
        signum = await stop
        logger.info("stopping on %s: closing %d connections", signal.Signals(signum).name,
                    len(server._peers))
    finally:
        await server.stop()
        logger.info("relay stopped")
