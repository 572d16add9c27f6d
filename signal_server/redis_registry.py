"""The cluster's shared state in Redis (shell: all Redis I/O of the relay lives here).

Keys (``P`` is the prefix, ``quictun:`` by default; one cluster per Redis database)::

    P name:<name>   HASH owner (hex owner id), inst, conn   a claimed name
                    PX lease while live (refreshed by its instance), grace once released
    P inst:<id>     STRING {"v":1,"link":"ip:port"|"","token":...}   a live instance,
                    PX instance_ttl, refreshed every heartbeat
    P ip:<ip>       HASH <instance id> -> connections from <ip> at that instance
    P chan:<id>     pub/sub channel of instance <id> (peerwire messages, sender first)

Every change is one Lua script, so it is atomic: a claim is "HMGET, then HSET+PEXPIRE
unless another owner holds it", which two instances can never both win. Names of a dead
instance stop being found at once (a lookup checks the holder's ``inst`` key), stay
reserved for their owner until their lease runs out, then vanish: nobody cleans up.

Operations are queued and sent in pipelines by one worker task, in order: one round
trip per batch, and claims/releases/publishes for a name or an instance take effect in
the order they were asked for. Every method raises :class:`RegistryUnavailable` when
Redis cannot be reached (no retries here: the caller decides).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from dataclasses import dataclass, field
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import NoScriptError, RedisError, ResponseError

from .types import ClaimResult, HeldName, Holder, LostName

__all__ = ["RedisRegistry", "RegistryUnavailable", "redact", "connect_client"]

logger = logging.getLogger("quictun.signal.redis")

_CLAIM = """
local cur = redis.call('HMGET', KEYS[1], 'owner', 'inst', 'conn')
if cur[1] and cur[1] ~= ARGV[1] then return {'taken'} end
redis.call('HSET', KEYS[1], 'owner', ARGV[1], 'inst', ARGV[2], 'conn', ARGV[3])
redis.call('PEXPIRE', KEYS[1], ARGV[4])
if cur[2] and cur[2] ~= '' and redis.call('EXISTS', ARGV[5] .. cur[2]) == 1 then
  return {'ok', cur[2], cur[3]}
end
return {'ok'}
"""

_RELEASE = """
local cur = redis.call('HMGET', KEYS[1], 'inst', 'conn')
if cur[1] ~= ARGV[1] or cur[2] ~= ARGV[2] then return 0 end
if ARGV[3] == '' then
  redis.call('DEL', KEYS[1])
else
  redis.call('HSET', KEYS[1], 'inst', '', 'conn', '')
  redis.call('PEXPIRE', KEYS[1], ARGV[3])
end
return 1
"""

_LOOKUP = """
local cur = redis.call('HMGET', KEYS[1], 'inst', 'conn')
if not cur[1] or cur[1] == '' then return false end
local info = redis.call('GET', ARGV[1] .. cur[1])
if not info then return false end
return {cur[1], cur[2], info}
"""

_REFRESH = """
local cur = redis.call('HMGET', KEYS[1], 'owner', 'inst', 'conn')
if cur[1] and cur[1] ~= ARGV[1] then return -1 end
if cur[1] and cur[2] ~= ARGV[2] and cur[2] ~= '' then return 0 end
if cur[1] and cur[2] == ARGV[2] and cur[3] ~= ARGV[3] then return 0 end
redis.call('HSET', KEYS[1], 'owner', ARGV[1], 'inst', ARGV[2], 'conn', ARGV[3])
redis.call('PEXPIRE', KEYS[1], ARGV[4])
return 1
"""

_IP_ACQUIRE = """
local all = redis.call('HGETALL', KEYS[1])
local total = 0
for i = 1, #all, 2 do
  if all[i] == ARGV[1] or redis.call('EXISTS', ARGV[3] .. all[i]) == 1 then
    total = total + tonumber(all[i + 1])
  else
    redis.call('HDEL', KEYS[1], all[i])
  end
end
if total >= tonumber(ARGV[2]) then return 0 end
redis.call('HINCRBY', KEYS[1], ARGV[1], 1)
redis.call('PEXPIRE', KEYS[1], ARGV[4])
return 1
"""

_IP_SET = """
local n = tonumber(ARGV[2])
if ARGV[3] == 'add' then n = redis.call('HINCRBY', KEYS[1], ARGV[1], n) end
if n <= 0 then redis.call('HDEL', KEYS[1], ARGV[1]) return 0 end
redis.call('HSET', KEYS[1], ARGV[1], n)
redis.call('PEXPIRE', KEYS[1], ARGV[4])
return n
"""

_SCRIPTS = {"claim": _CLAIM, "release": _RELEASE, "lookup": _LOOKUP, "refresh": _REFRESH,
            "ip_acquire": _IP_ACQUIRE, "ip_set": _IP_SET}

#: how long a per-address connection count survives without any change
_IP_TTL_MS = 24 * 3600 * 1000
_BATCH = 512


class RegistryUnavailable(ConnectionError):
    """Redis could not be reached (or answered with an error) for this operation."""


def redact(url: str) -> str:
    """``url`` with any password replaced by ``***`` (for logs and messages)."""
    from urllib.parse import urlsplit, urlunsplit

    try:
        parts = urlsplit(url)
    except ValueError:
        return "<unparseable URL>"
    if parts.password is None:
        return url
    user = parts.username or ""
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    netloc = f"{user}:***@{host}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


def connect_client(url: str, timeout: float = 3.0) -> aioredis.Redis:
    """A redis-py asyncio client for ``url`` that fails fast (no retries, ``timeout``
    seconds per operation). Raises ValueError for a malformed URL."""
    return aioredis.from_url(url, socket_timeout=timeout, socket_connect_timeout=timeout,
                             retry=Retry(NoBackoff(), 0), health_check_interval=0,
                             decode_responses=False)


@dataclass
class _Op:
    script: str | None  # a script name, or None for a raw command
    args: tuple[Any, ...]
    fut: asyncio.Future[Any] = field(repr=False)


class RedisRegistry:
    """:class:`~signal_server.registry.SharedRegistry` on Redis, plus the instance
    records, per-address connection counts and pub/sub publishing of one instance.

    Call :meth:`start` before use and :meth:`stop` at the end (it flushes the queue).
    """

    def __init__(self, client: aioredis.Redis, instance: str, *, lease: float,
                 prefix: str = "quictun:") -> None:
        self.client = client
        self.instance = instance
        self.lease_ms = max(1, int(lease * 1000))
        self.prefix = prefix
        self.inst_prefix = f"{prefix}inst:"
        self._shas: dict[str, str] = {}
        self._queue: asyncio.Queue[_Op] = asyncio.Queue()
        self._worker: asyncio.Task[None] | None = None
        #: round trips, and the seconds they took (for metrics)
        self.batches = 0
        self.ops = 0
        self.batch_seconds = 0.0
        self.failures = 0

    @property
    def backlog(self) -> int:
        """Operations waiting for the next round trip."""
        return self._queue.qsize()

    # --- lifecycle --------------------------------------------------------------------

    async def start(self) -> None:
        """Start the pipeline worker (does not contact Redis)."""
        if self._worker is None:
            self._worker = asyncio.create_task(self._run())

    async def stop(self, flush_timeout: float = 2.0) -> None:
        """Send what is queued (waiting at most ``flush_timeout``), then stop."""
        if self._worker is None:
            return
        deadline = time.monotonic() + flush_timeout
        while not self._queue.empty() and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        self._worker.cancel()
        try:
            await self._worker
        except asyncio.CancelledError:
            pass
        self._worker = None
        while not self._queue.empty():
            op = self._queue.get_nowait()
            if not op.fut.done():
                op.fut.set_exception(RegistryUnavailable("relay stopping"))

    # --- SharedRegistry ---------------------------------------------------------------

    def _name_key(self, name: str) -> str:
        return f"{self.prefix}name:{name}"

    async def claim(self, name: str, owner: bytes, conn_id: int) -> ClaimResult:
        reply = await self._call("claim", self._name_key(name), owner.hex(), self.instance,
                                 str(conn_id), self.lease_ms, self.inst_prefix)
        if reply[0] == b"taken":
            return ClaimResult("taken")
        if len(reply) >= 3:
            return ClaimResult("ok", Holder(reply[1].decode(), int(reply[2])))
        return ClaimResult("ok")

    async def release(self, name: str, owner: bytes, conn_id: int,
                      grace: float | None) -> None:
        grace_ms = "" if grace is None else str(max(1, int(grace * 1000)))
        await self._call("release", self._name_key(name), self.instance, str(conn_id),
                         grace_ms)

    async def lookup(self, name: str) -> Holder | None:
        reply = await self.lookup_with_record(name)
        return None if reply is None else reply[0]

    async def lookup_with_record(self, name: str) -> tuple[Holder, dict[str, Any]] | None:
        """As :meth:`lookup`, with the holder instance's record (its link address)."""
        reply = await self._call("lookup", self._name_key(name), self.inst_prefix)
        if not reply:
            return None
        try:
            record = json.loads(reply[2])
            return Holder(reply[0].decode(), int(reply[1])), (
                record if isinstance(record, dict) else {})
        except (ValueError, UnicodeDecodeError):
            return None

    async def refresh(self, held: list[HeldName]) -> list[LostName]:
        futs = [self._submit("refresh", self._name_key(h.name), h.owner.hex(), self.instance,
                             str(h.conn_id), self.lease_ms) for h in held]
        lost = []
        for h, fut in zip(held, futs, strict=True):
            code = await fut
            if code == 0:
                lost.append(LostName(h.name, h.conn_id, "moved"))
            elif code == -1:
                lost.append(LostName(h.name, h.conn_id, "taken"))
        return lost

    # --- instances, addresses, pub/sub ------------------------------------------------

    async def heartbeat(self, record: dict[str, Any], ttl: float) -> float:
        """Publish this instance's record for ``ttl`` seconds; returns the round-trip
        time in seconds."""
        t0 = time.perf_counter()
        await self._raw("SET", f"{self.inst_prefix}{self.instance}", json.dumps(record),
                        "PX", max(1, int(ttl * 1000)))
        return time.perf_counter() - t0

    async def forget_instance(self) -> None:
        """Delete this instance's record (a clean shutdown: others see it gone now)."""
        await self._raw("DEL", f"{self.inst_prefix}{self.instance}")

    async def instance_record(self, instance: str) -> dict[str, Any] | None:
        """Another instance's record, or None if it is not alive."""
        raw = await self._raw("GET", f"{self.inst_prefix}{instance}")
        if raw is None:
            return None
        try:
            record = json.loads(raw)
        except ValueError:
            return None
        return record if isinstance(record, dict) else None

    async def alive(self, instances: set[str]) -> set[str]:
        """The subset of ``instances`` whose record exists."""
        ids = sorted(instances)
        futs = [self._submit(None, "EXISTS", f"{self.inst_prefix}{i}") for i in ids]
        return {i for i, fut in zip(ids, futs, strict=True) if await fut}

    def channel(self, instance: str) -> str:
        return f"{self.prefix}chan:{instance}"

    async def publish(self, instance: str, payload: bytes) -> int:
        """PUBLISH ``payload`` to ``instance``'s channel; returns the receiver count."""
        return int(await self._raw("PUBLISH", self.channel(instance), payload))

    async def ip_acquire(self, ip: str, cap: int) -> bool:
        """Count one more connection from ``ip`` here unless the cluster-wide count
        (over live instances) is already ``cap``."""
        return bool(await self._call("ip_acquire", f"{self.prefix}ip:{ip}", self.instance,
                                     cap, self.inst_prefix, _IP_TTL_MS))

    async def ip_add(self, ip: str, delta: int) -> None:
        await self._call("ip_set", f"{self.prefix}ip:{ip}", self.instance, delta, "add",
                         _IP_TTL_MS)

    async def ip_set(self, ip: str, count: int) -> None:
        """Overwrite this instance's count for ``ip`` (reconciliation)."""
        await self._call("ip_set", f"{self.prefix}ip:{ip}", self.instance, count, "set",
                         _IP_TTL_MS)

    async def memory_bytes(self) -> int | None:
        """Redis ``used_memory`` (for benchmarks)."""
        info = await self.client.info("memory")
        value = info.get("used_memory")
        return int(value) if value is not None else None

    # --- the pipeline worker ----------------------------------------------------------

    def _submit(self, script: str | None, *args: Any) -> asyncio.Future[Any]:
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._queue.put_nowait(_Op(script, args, fut))
        return fut

    async def _call(self, script: str, key: str, *args: Any) -> Any:
        return await self._submit(script, key, *args)

    async def _raw(self, *command: Any) -> Any:
        return await self._submit(None, *command)

    async def _run(self) -> None:
        while True:
            batch = [await self._queue.get()]
            while not self._queue.empty() and len(batch) < _BATCH:
                batch.append(self._queue.get_nowait())
            try:
                await self._execute(batch)
            except asyncio.CancelledError:
                for op in batch:
                    if not op.fut.done():
                        op.fut.set_exception(RegistryUnavailable("relay stopping"))
                raise
            except (RedisError, OSError) as exc:
                self.failures += 1
                err = RegistryUnavailable(f"{type(exc).__name__}: {exc}")
                for op in batch:
                    if not op.fut.done():
                        op.fut.set_exception(err)

    async def _execute(self, batch: list[_Op], retried: bool = False) -> None:
        if not self._shas or retried:
            await self._load_scripts()
        t0 = time.perf_counter()
        async with self.client.pipeline(transaction=False) as pipe:
            for op in batch:
                if op.script is None:
                    pipe.execute_command(*op.args)
                else:
                    pipe.execute_command("EVALSHA", self._shas[op.script], 1, *op.args)
            results = await pipe.execute(raise_on_error=False)
        self.batches += 1
        self.ops += len(batch)
        self.batch_seconds += time.perf_counter() - t0
        again = []
        for op, result in zip(batch, results, strict=True):
            if isinstance(result, NoScriptError) and not retried:
                again.append(op)  # Redis restarted and forgot our scripts
            elif isinstance(result, ResponseError):
                if not op.fut.done():
                    op.fut.set_exception(RegistryUnavailable(f"Redis error: {result}"))
            elif not op.fut.done():
                op.fut.set_result(result)
        if again:
            await self._execute(again, retried=True)

    async def _load_scripts(self) -> None:
        for name, body in _SCRIPTS.items():
            sha = await self.client.script_load(body)
            self._shas[name] = sha.decode() if isinstance(sha, bytes) else str(sha)
