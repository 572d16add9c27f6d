r"""Bookkeeping for the path manager's probes (sans-I/O, used by :mod:`quictun.punch.manager`).

Nothing here touches a socket or a clock (the caller passes ``now``).

:class:`CandidateState` is one remote candidate's state. It has one probe timer (``next_probe``);
its interval (:meth:`CandidateState.interval`) depends on its role:

* selected direct path: ``heartbeat``; once *suspect* (no evidence for 1.5 heartbeats)
  ``probe_interval_slow``, so that one lost heartbeat cannot kill a path;
* in a burst (initial punching, triggered check, re-punch): ``probe_interval`` during the
  burst's fast phase, then ``probe_interval_slow`` until the burst ends;
* other validated candidates: ``5 * heartbeat`` (keeps alternates known and mapped);
* otherwise idle.

Two small bounded tables:

* :class:`TransactionTable`: the probes we sent and whose signed answer we still accept
  (one :class:`Txn` per transaction id, for ``TRANSACTION_LIFETIME`` seconds, at most
  ``MAX_TRANSACTIONS``; the oldest is evicted first).
* :func:`seen_requests`: the signed probe requests the peer sent us recently, by
  transaction id, with the source and socket each one first came from (a
  :class:`~quictun.proto.limits.ReplayWindow`). The real peer draws a fresh random id
  for every probe, so an id seen again is either a retransmission from the same source
  (answered again, nothing else) or a *replay* by someone who recorded it, typically
  with a spoofed source (dropped).

Rate limits (learning peer-reflexive candidates, triggered checks) are
:class:`~quictun.proto.limits.TokenBucket`\ s, so that even requests that pass every
other check cannot make us probe arbitrary addresses faster than a fixed rate.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from ..proto import stun
from ..proto.limits import ReplayWindow, Sighting
from .pmtu import Pmtu
from .types import Addr, NetPath, PathConfig

__all__ = [
    "ALTERNATE_FACTOR",
    "FAST_PHASE",
    "SUSPECT_FACTOR",
    "CandidateState",
    "MAX_SEEN_REQUESTS",
    "MAX_TRANSACTIONS",
    "REPLAY_WINDOW",
    "TRANSACTION_LIFETIME",
    "seen_requests",
    "Datagram",
    "Outbox",
    "TransactionTable",
    "Txn",
]

MAX_TRANSACTIONS = 1024  # outstanding probe transaction ids; the oldest is evicted
TRANSACTION_LIFETIME = 5.0  # seconds a probe's response is accepted
MAX_SEEN_REQUESTS = 1024  # remembered request ids; the oldest is forgotten first
REPLAY_WINDOW = 30.0  # seconds a request id is remembered (>= TRANSACTION_LIFETIME)

FAST_PHASE = 1.0  # seconds of probe_interval at the start of a punch / triggered burst
ALTERNATE_FACTOR = 5  # validated, unselected candidates are probed every 5 heartbeats
SUSPECT_FACTOR = 1.5  # selected path with no evidence for 1.5 heartbeats probes faster



@dataclass
class CandidateState:
    """Mutable per-candidate state and its probe schedule (see the module docstring)."""

    addr: Addr
    kind: str
    rank: int
    seq: int = 0  # when last signalled (prflx: learned); the lowest is evicted first
    validated: bool = False
    validation_rtt: float | None = None
    rtt: float | None = None
    local: Addr | None = None
    last_alive: float | None = None
    first_unanswered: float | None = None
    next_probe: float | None = None
    burst_until: float = float("-inf")
    fast_until: float = float("-inf")
    slot: int = 0
    probes: int = 0
    pmtu: Pmtu | None = None  # path MTU state, made when first selected; reset on death
    traffic_at: float | None = None  # last authenticated QUIC packet from this address
    # the data rules of quictun.punch.recovery: authenticated QUIC from this address
    # (traffic_at, above), when it was selected, its current quiet spell, and its distrust
    selected_at: float | None = None
    quiet_since: float | None = None
    distrusted_until: float | None = None
    distrusts: int = 0

    @property
    def usable(self) -> bool:
        """Validated, and not known unable to carry 1200-byte datagrams (path MTU)."""
        return self.validated and (self.pmtu is None or self.pmtu.usable)

    def path(self) -> NetPath:
        """This candidate as a direct :class:`~quictun.punch.types.Path`."""
        return NetPath("direct", self.addr, self.local, self.rtt, self.rank, self.slot)

    def burst(self, now: float, until: float, *, fast: bool) -> None:
        """Probe now and keep probing until ``until`` (fast for FAST_PHASE if ``fast``)."""
        self.burst_until = max(self.burst_until, until)
        if fast:
            self.fast_until = max(self.fast_until, min(until, now + FAST_PHASE))
        if self.next_probe is None or self.next_probe > now:
            self.next_probe = now

    def silent(self, cfg: PathConfig, now: float, extra: float = 0.0) -> bool:
        """No evidence for 1.5 heartbeats (the *suspect* threshold) + ``extra``."""
        return (self.last_alive is None
                or now - self.last_alive >= SUSPECT_FACTOR * cfg.heartbeat + extra)

    def expiry(self, cfg: PathConfig, selected: bool) -> float | None:
        """When a validated candidate counts as dead if nothing arrives, else None."""
        if not self.validated or self.first_unanswered is None or self.last_alive is None:
            return None
        grace = cfg.dead_after
        if not selected:
            grace += ALTERNATE_FACTOR * cfg.heartbeat
        return max(self.last_alive + grace, self.first_unanswered + cfg.heartbeat)

    def interval(self, cfg: PathConfig, selected: bool, now: float) -> float | None:
        """The delay to the next probe after one sent at ``now``; None: stop probing."""
        if selected:
            return cfg.probe_interval_slow if self.silent(cfg, now) else cfg.heartbeat
        if self.validated:
            return ALTERNATE_FACTOR * cfg.heartbeat
        if now < self.burst_until:
            return cfg.probe_interval if now < self.fast_until else cfg.probe_interval_slow
        return None


@dataclass
class Txn:
    """One outstanding probe: where it went, when, from which socket (slot)."""

    addr: Addr
    sent_at: float
    slot: int = 0
    learn: bool = False  # a birthday probe: a signed answer teaches a prflx candidate
    pmtu_size: int = 0  # a path MTU probe of this many bytes (its answer feeds .pmtu)


class TransactionTable:
    """Outstanding probe transactions, oldest first (bounded, see the module doc)."""

    def __init__(self) -> None:
        self._txns: dict[bytes, Txn] = {}

    def __len__(self) -> int:
        return len(self._txns)

    def add(self, txid: bytes, txn: Txn, now: float) -> None:
        """Record a probe sent at ``now``; expired and surplus entries are dropped."""
        self._txns[txid] = txn
        self.expire(now)

    def match(self, txid: bytes, src: Addr, slot: int, now: float) -> Txn | None:
        """Return the live transaction ``txid`` if it went to ``src`` from ``slot``, else
        None. Does not remove it (see :meth:`remove`): the caller still checks the
        response's signature."""
        self.expire(now)
        txn = self._txns.get(txid)
        if txn is None or txn.addr != src or txn.slot != slot:
            return None
        return txn

    def remove(self, txid: bytes) -> None:
        """Forget one transaction (its answer was accepted: a replay of it is invalid)."""
        self._txns.pop(txid, None)

    def forget(self, addr: Addr) -> None:
        """Forget every transaction sent to ``addr`` (its answers are no longer accepted)."""
        for txid in [t for t, txn in self._txns.items() if txn.addr == addr]:
            del self._txns[txid]

    def expire(self, now: float) -> None:
        """Drop transactions older than TRANSACTION_LIFETIME, and the oldest ones beyond
        MAX_TRANSACTIONS."""
        while self._txns:
            txid, txn = next(iter(self._txns.items()))
            if now - txn.sent_at < TRANSACTION_LIFETIME and len(self._txns) <= MAX_TRANSACTIONS:
                break
            del self._txns[txid]


def seen_requests() -> ReplayWindow:
    """The memory of the peer's signed request ids: REPLAY_WINDOW seconds, at most
    MAX_SEEN_REQUESTS (the oldest is forgotten first), origin ``(source, slot)``.

    Only requests whose signature was verified may be recorded (an attacker without the
    key cannot fill it). The window is longer than TRANSACTION_LIFETIME so that a recorded
    probe cannot be re-armed every few seconds; past it (or after eviction from a full
    table), the rate limits in :mod:`quictun.punch.manager` bound what a replay can do.
    """
    return ReplayWindow(REPLAY_WINDOW, MAX_SEEN_REQUESTS, evict_when_full=True)


Datagram = tuple[bytes, Addr, "int | None", int]
"""``(data, addr, ttl, slot)``: see :meth:`PathManager.datagrams_to_send_slots`."""


class Outbox:
    """The signed probe exchange with the peer: every datagram the path manager sends,
    the transactions its requests open (only answers to our own probes can validate a
    path), and the memory of the peer's requests (replays get nothing).

    ``remote_key`` signs our requests and verifies the peer's answers; ``local_key``
    verifies the peer's requests and signs our answers. ``random_bytes`` draws
    transaction ids.
    """

    def __init__(self, *, local_key: bytes, remote_key: bytes,
                 random_bytes: Callable[[int], bytes]) -> None:
        self._local_key = local_key
        self._remote_key = remote_key
        self._random_bytes = random_bytes
        self.txns = TransactionTable()
        self._seen = seen_requests()
        self._queue: list[Datagram] = []

    def check_request(self, data: bytes, txid: bytes, src: Addr, slot: int,
                      now: float) -> Sighting | None:
        """Verify the peer's Binding request and answer it unless it is a replay.

        Returns None (wrongly signed: dropped), :attr:`Sighting.REPLAY` (dropped
        unanswered), :attr:`Sighting.REPEAT` (a retransmission: answered, nothing more)
        or :attr:`Sighting.NEW` (answered).
        """
        if not stun.verify_integrity(data, self._local_key):
            return None
        seen = self._seen.check(txid, now, origin=(src, slot))
        if seen is not Sighting.REPLAY:
            self.answer(txid, src, slot)
        return seen

    def match_response(self, data: bytes, txid: bytes, src: Addr, slot: int,
                       now: float) -> Txn | None:
        """The transaction a signed Binding success answers (and forget it), or None: not
        ours, expired, from another address or socket, or wrongly signed."""
        txn = self.txns.match(txid, src, slot, now)
        if txn is None or not stun.verify_integrity(data, self._remote_key):
            return None
        self.txns.remove(txid)
        return txn

    def request(self, addr: Addr, slot: int, now: float, ttl: int | None = None, *,
                learn: bool = False, pad_to: int = 0) -> None:
        """Queue a signed Binding request to ``addr`` from socket ``slot``; ``learn``: an
        answer from ``addr`` may create a candidate (a birthday probe); ``pad_to``: a path
        MTU probe of exactly that many bytes (PADDING; its Txn remembers the size)."""
        txid = self._random_bytes(12)
        self.txns.add(txid, Txn(addr=addr, sent_at=now, slot=slot, learn=learn,
                                pmtu_size=pad_to), now)
        request = stun.binding_request(txid, key=self._remote_key, pad_to=pad_to or None)
        self._queue.append((request, addr, ttl, slot))

    def answer(self, txid: bytes, src: Addr, slot: int) -> None:
        """Queue a signed Binding success for the peer's request ``txid`` from ``src``."""
        self._queue.append((stun.binding_success(txid, src, key=self._local_key), src, None,
                            slot))

    def take(self) -> list[Datagram]:
        """Return and forget everything queued."""
        out, self._queue = self._queue, []
        return out
