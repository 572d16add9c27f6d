"""The relay's cluster shell: performs the matchmaker's cluster effects with Redis
(:mod:`signal_server.redis_registry`) and direct peer links (:mod:`signal_server.peerlink`),
and keeps this instance's standing in the cluster.

* **Effects**: ``Claim``/``Release``/``Lookup`` go to Redis, their answers back to the
  matchmaker through the :class:`ClusterFeed`; ``ToPeer`` goes over the peer link when
  the target instance advertises one (dialed on first use), else (or when the dial
  fails) through Redis pub/sub on the target's channel. A publish that reaches nobody
  means the target is gone: ``peer_down``.
* **Heartbeat** (every ``heartbeat`` s): this instance's record (link address, link
  token) with a short TTL; the round trip is the Redis RTT of the metrics. Every
  ``lease / 3`` s the leases of the names held here are refreshed (re-created if Redis
  lost them). Instances we share sessions with are checked for a live record.
* **Outage**: when Redis stops answering, this logs once and carries on: the peers held
  here keep their names and sessions (cross-instance sessions too, over their links);
  claims of unknown names and lookups answer ``unavailable``. When Redis answers again
  it logs once, re-publishes the record, reconciles every held name (a name another
  owner took meanwhile disconnects its holder here) and rewrites the per-address
  connection counts.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections.abc import Awaitable, Iterable
from dataclasses import dataclass
from typing import Any, Protocol

from redis.exceptions import RedisError

from . import peerwire as pw
from .peerlink import PeerLinks, split_hostport
from .redis_registry import RedisRegistry, RegistryUnavailable, connect_client, redact
from .types import (
    UNAVAILABLE,
    Claim,
    ClaimResult,
    ClusterError,
    Effect,
    HeldName,
    Holder,
    Lookup,
    LostName,
    Release,
    ToPeer,
)

__all__ = ["ClusterConfig", "ClusterFeed", "Cluster", "ClusterError", "new_instance_id"]

logger = logging.getLogger("quictun.signal.cluster")

#: operations queued for Redis above which relayed packets bound for pub/sub are dropped
PUBSUB_BACKLOG = 4096


async def _all(coros: Iterable[Awaitable[object]]) -> None:
    """Await them all (pipelined together); then raise the first failure, if any."""
    results = await asyncio.gather(*coros, return_exceptions=True)
    for result in results:
        if isinstance(result, BaseException):
            raise result


def new_instance_id() -> str:
    """A fresh random instance id (16 hex digits); one per process start."""
    return secrets.token_hex(8)


@dataclass
class ClusterConfig:
    """How this instance joins the cluster. ``peer_link``: ``"auto"`` (listen on the
    address this host uses to reach Redis, any port), ``"off"`` (pub/sub only), or
    ``HOST:PORT`` to listen on and advertise."""

    url: str
    instance: str
    lease: float = 60.0
    peer_link: str = "auto"
    heartbeat: float = 1.0
    instance_ttl: float = 6.0
    max_per_ip: int | None = None
    prefix: str = "quictun:"
    timeout: float = 3.0


class ClusterFeed(Protocol):
    """What the cluster shell calls back into (the relay server, which passes ``now``
    to the matchmaker and drains its outputs after each call)."""

    def claim_result(self, claim: Claim, result: ClaimResult) -> None: ...
    def lookup_result(self, lookup: Lookup, result: Holder | None | str) -> None: ...
    def receive_peer(self, instance: str, data: bytes) -> None: ...
    def peer_down(self, instance: str) -> None: ...
    def names_lost(self, lost: list[LostName]) -> None: ...
    def held_names(self) -> list[HeldName]: ...
    def peer_instances(self) -> set[str]: ...
    def ip_counts(self) -> dict[str, int]: ...


class Cluster:
    """One instance's membership of a cluster; :meth:`start`, then :meth:`stop`."""

    def __init__(self, config: ClusterConfig, feed: ClusterFeed) -> None:
        self.config = config
        self.feed = feed
        self.registry: RedisRegistry | None = None
        self.links: PeerLinks | None = None
        self.link_address = ""
        self._token = secrets.token_hex(16)
        self._records: dict[str, dict[str, Any]] = {}
        self._resolving: dict[str, list[tuple[bytes, bool]]] = {}
        self._pubsub_only: set[str] = set()
        self._down: set[str] = set()
        self._dirty_ips: set[str] = set()
        self._missed_releases: list[Release] = []
        self._tasks: list[asyncio.Task[None]] = []
        self.up = False
        self.down_since: float | None = None
        self.rtt: float | None = None
        self.counters: dict[str, int] = {"published": 0, "pubsub_received": 0,
                                         "pubsub_dropped": 0}
        self.error_kinds: dict[str, int] = {}

    # --- lifecycle --------------------------------------------------------------------

    async def start(self) -> None:
        """Connect to Redis, open the peer-link listener, publish this instance.

        Raises:
            ClusterError: a malformed URL, Redis unreachable, or the link address cannot
                be bound (one line, password redacted).
        """
        cfg = self.config
        where = redact(cfg.url)
        try:
            client = connect_client(cfg.url, cfg.timeout)
        except ValueError as exc:
            raise ClusterError(f"bad Redis URL {where!r} ({exc}); expected "
                               "redis://HOST:PORT/DB") from None
        try:
            await asyncio.wait_for(client.ping(), cfg.timeout)
        except (RedisError, OSError, TimeoutError) as exc:
            await client.aclose()
            raise ClusterError(f"cannot reach Redis at {where} ({exc or type(exc).__name__}); "
                               "check --redis / QUICTUN_SIGNAL_REDIS and that redis-server "
                               "is running") from None
        self.registry = RedisRegistry(client, cfg.instance, lease=cfg.lease, prefix=cfg.prefix)
        await self.registry.start()
        if cfg.peer_link != "off":
            await self._open_links()
        self.rtt = await self.registry.heartbeat(self._record(), cfg.instance_ttl)
        self.up = True
        self._tasks = [asyncio.create_task(self._supervise()),
                       asyncio.create_task(self._read_pubsub())]
        logger.info("joined the cluster at %s as instance %s (peer link %s)", where,
                    cfg.instance, self.link_address or "off: pub/sub only")

    async def _open_links(self) -> None:
        cfg = self.config
        try:
            if cfg.peer_link == "auto":
                host, port = await self._address_towards_redis(), 0
            else:
                host, port = split_hostport(cfg.peer_link)
        except (ValueError, OSError) as exc:
            raise ClusterError(f"bad --peer-link {cfg.peer_link!r} ({exc}); use auto, off "
                               "or HOST:PORT") from None
        self.links = PeerLinks(cfg.instance, self._token, on_frame=self.feed.receive_peer,
                               on_down=self._link_down, on_unreachable=self._link_unreachable)
        try:
            self.link_address = await self.links.listen(host, port)
        except OSError as exc:
            raise ClusterError(f"cannot listen for peer links on {host} port {port} "
                               f"({exc.strerror or exc}); set --peer-link HOST:PORT or off"
                               ) from None

    async def _address_towards_redis(self) -> str:
        """The local IP address of a TCP connection to Redis (so links use the network
        the instances share with Redis); 127.0.0.1 for a Unix socket."""
        from urllib.parse import urlsplit

        parts = urlsplit(self.config.url)
        if parts.scheme == "unix" or not parts.hostname:
            return "127.0.0.1"
        _, writer = await asyncio.wait_for(
            asyncio.open_connection(parts.hostname, parts.port or 6379), self.config.timeout)
        ip = str(writer.get_extra_info("sockname")[0])
        writer.close()
        return ip

    def _record(self) -> dict[str, Any]:
        return {"v": 1, "link": self.link_address, "token": self._token}

    async def stop(self) -> None:
        """Flush pending registry work, withdraw this instance, close everything."""
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            try:
                await task
            except (asyncio.CancelledError, Exception):
                pass
        self._tasks = []
        if self.links is not None:
            await self.links.close()
        if self.registry is not None:
            if self.up:
                try:
                    await asyncio.wait_for(self.registry.forget_instance(), 1.0)
                except (RegistryUnavailable, TimeoutError):
                    pass
            await self.registry.stop()
            await self.registry.client.aclose()

    # --- effects ----------------------------------------------------------------------

    def perform(self, effect: Effect) -> None:
        """Carry out one matchmaker effect (never blocks; answers come via the feed)."""
        if isinstance(effect, ToPeer):
            self._to_peer(effect.instance, effect.data, effect.droppable)
        elif isinstance(effect, Claim):
            asyncio.ensure_future(self._claim(effect))
        elif isinstance(effect, Lookup):
            asyncio.ensure_future(self._lookup(effect))
        elif isinstance(effect, Release):
            asyncio.ensure_future(self._release(effect))

    async def _claim(self, claim: Claim) -> None:
        assert self.registry is not None
        result = ClaimResult(UNAVAILABLE)
        if self.up:  # known down: answer at once, the heartbeat notices the return
            try:
                result = await self.registry.claim(claim.name, claim.owner, claim.conn_id)
            except RegistryUnavailable as exc:
                self._failed("claim", exc)
        self.feed.claim_result(claim, result)

    async def _lookup(self, lookup: Lookup) -> None:
        assert self.registry is not None
        result: Holder | None | str = UNAVAILABLE
        try:
            if not self.up:
                raise RegistryUnavailable("Redis is down")
            found = await self.registry.lookup_with_record(lookup.name)
        except RegistryUnavailable as exc:
            self._failed("lookup", exc)
        else:
            result = None
            if found is not None:
                result, record = found
                self._records[result.instance] = record
                self._down.discard(result.instance)
        self.feed.lookup_result(lookup, result)

    async def _release(self, release: Release) -> None:
        assert self.registry is not None
        try:
            if not self.up:
                raise RegistryUnavailable("Redis is down")
            await self.registry.release(release.name, release.owner, release.conn_id,
                                        release.grace)
        except RegistryUnavailable as exc:
            self._failed("release", exc)
            # replayed on reconciliation (else the lease would run out by itself)
            self._missed_releases.append(release)

    # --- messages to other instances --------------------------------------------------

    def _to_peer(self, instance: str, data: bytes, droppable: bool) -> None:
        links = self.links
        if links is not None and links.connected(instance):
            links.send(instance, data, droppable)
            return
        pending = self._resolving.get(instance)
        if pending is not None:
            pending.append((data, droppable))
            return
        record = self._records.get(instance)
        if record is None:
            self._resolving[instance] = [(data, droppable)]
            asyncio.ensure_future(self._resolve(instance))
            return
        address = record.get("link") if instance not in self._pubsub_only else None
        if links is not None and isinstance(address, str) and address:
            links.send(instance, data, droppable, address, str(record.get("token", "")))
        elif droppable and self.registry is not None and self.registry.backlog > PUBSUB_BACKLOG:
            self.counters["pubsub_dropped"] += 1  # Redis is behind: shed relayed packets
        else:
            self._publish(instance, data)

    async def _resolve(self, instance: str) -> None:
        """Fetch an instance's record, then send what waited for it."""
        assert self.registry is not None
        try:
            record = await self.registry.instance_record(instance)
        except RegistryUnavailable as exc:
            self._failed("resolve", exc)
            record = None
        queued = self._resolving.pop(instance, [])
        if record is None:
            self._report_down(instance)
            return
        self._records[instance] = record
        for data, droppable in queued:
            self._to_peer(instance, data, droppable)

    def _publish(self, instance: str, data: bytes) -> None:
        assert self.registry is not None
        self.counters["published"] += 1
        fut = asyncio.ensure_future(
            self.registry.publish(instance, pw.pack_pubsub(self.config.instance, data)))

        def done(f: asyncio.Future[int]) -> None:
            if f.cancelled():
                return
            exc = f.exception()
            if exc is not None:
                self._failed("publish", exc)
            elif f.result() == 0:
                self._report_down(instance)
            else:
                self._down.discard(instance)

        fut.add_done_callback(done)

    def _link_unreachable(self, instance: str, queued: list[tuple[bytes, bool]]) -> None:
        self._pubsub_only.add(instance)
        self.error_kinds["peer-link-dial"] = self.error_kinds.get("peer-link-dial", 0) + 1
        logger.warning("using Redis pub/sub for instance %s", instance)
        for data, _droppable in queued:
            self._publish(instance, data)

    def _link_down(self, instance: str) -> None:
        self.error_kinds["peer-link-lost"] = self.error_kinds.get("peer-link-lost", 0) + 1
        self._report_down(instance)

    def _report_down(self, instance: str) -> None:
        if instance not in self._down:
            self._down.add(instance)
            self._records.pop(instance, None)
            self.feed.peer_down(instance)

    # --- per-address connection counts ------------------------------------------------

    async def ip_acquire(self, ip: str) -> bool:
        """Whether one more connection from ``ip`` fits the cluster-wide cap (counted
        if so). While Redis is unreachable only the local cap applies."""
        cap = self.config.max_per_ip
        if cap is None or self.registry is None:
            return True
        if not self.up:
            self._dirty_ips.add(ip)
            return True
        try:
            return await self.registry.ip_acquire(ip, cap)
        except RegistryUnavailable as exc:
            self._failed("ip", exc)
            self._dirty_ips.add(ip)
            return True

    def ip_release(self, ip: str) -> None:
        if self.config.max_per_ip is None or self.registry is None:
            return
        if not self.up:
            self._dirty_ips.add(ip)
            return

        async def release() -> None:
            assert self.registry is not None
            try:
                await self.registry.ip_add(ip, -1)
            except RegistryUnavailable as exc:
                self._failed("ip", exc)
                self._dirty_ips.add(ip)

        asyncio.ensure_future(release())

    # --- supervision ------------------------------------------------------------------

    def _failed(self, kind: str, exc: BaseException) -> None:
        key = f"redis-{kind}"
        self.error_kinds[key] = self.error_kinds.get(key, 0) + 1
        logger.debug("Redis %s failed: %s", kind, exc)

    async def _supervise(self) -> None:
        cfg = self.config
        last_refresh = time.monotonic()
        while True:
            await asyncio.sleep(cfg.heartbeat)
            assert self.registry is not None
            try:
                self.rtt = await self.registry.heartbeat(self._record(), cfg.instance_ttl)
                if not self.up:
                    await self._reconcile()
                    last_refresh = time.monotonic()
                elif time.monotonic() - last_refresh >= cfg.lease / 3:
                    last_refresh = time.monotonic()
                    lost = await self.registry.refresh(self.feed.held_names())
                    if lost:
                        self.feed.names_lost(lost)
                # instances reached over a link are watched by the link itself (an
                # instance cut off from Redis, not from us, keeps its sessions)
                links = self.links
                watched = {i for i in self.feed.peer_instances()
                           if links is None or not links.connected(i)}
                if watched:
                    alive = await self.registry.alive(watched)
                    for instance in watched - alive:
                        self._report_down(instance)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # RegistryUnavailable, or a bug: keep supervising
                if not isinstance(exc, RegistryUnavailable):
                    logger.exception("cluster supervision failed")
                self._failed("heartbeat", exc)
                if self.up:
                    self.up = False
                    self.down_since = time.monotonic()
                    logger.warning(
                        "lost Redis at %s (%s): serving the peers connected here; new names "
                        "and names on other instances are unavailable until it returns",
                        redact(cfg.url), exc)

    async def _reconcile(self) -> None:
        """Redis answers again: re-assert everything this instance holds."""
        assert self.registry is not None
        reg = self.registry
        missed, self._missed_releases = self._missed_releases, []
        await _all(reg.release(r.name, r.owner, r.conn_id, r.grace) for r in missed)
        held = self.feed.held_names()
        lost = await reg.refresh(held)
        counts = self.feed.ip_counts()
        if self.config.max_per_ip is not None:
            await _all(reg.ip_set(ip, counts.get(ip, 0))
                       for ip in set(counts) | self._dirty_ips)
        self._dirty_ips.clear()
        self.up = True
        gone = time.monotonic() - (self.down_since or time.monotonic())
        self.down_since = None
        self._pubsub_only.clear()
        self._restart_pubsub()
        logger.warning("Redis at %s is back after %.1f s: reconciled %d names (%d held "
                       "elsewhere now)", redact(self.config.url), gone, len(held), len(lost))
        if lost:
            self.feed.names_lost(lost)

    def _restart_pubsub(self) -> None:
        for task in self._tasks[1:]:
            task.cancel()
        self._tasks[1:] = [asyncio.create_task(self._read_pubsub())]

    async def _read_pubsub(self) -> None:
        assert self.registry is not None
        channel = self.registry.channel(self.config.instance)
        while True:
            pubsub = self.registry.client.pubsub()
            try:
                await pubsub.subscribe(channel)
                async for message in pubsub.listen():
                    if message.get("type") != "message":
                        continue
                    try:
                        sender, data = pw.unpack_pubsub(message["data"])
                    except pw.PeerProtocolError as exc:
                        logger.warning("ignoring a pub/sub message: %s", exc)
                        continue
                    self.counters["pubsub_received"] += 1
                    self.feed.receive_peer(sender, data)
            except (RedisError, OSError) as exc:
                self._failed("pubsub", exc)
            finally:
                try:
                    await pubsub.aclose()
                except (RedisError, OSError):
                    pass
            await asyncio.sleep(1.0)
