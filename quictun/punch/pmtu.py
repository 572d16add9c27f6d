"""Path MTU discovery for one direct path: DPLPMTUD (RFC 8899) at the path layer.

Theory of operation
-------------------
QUIC may always send 1200-byte UDP payloads (RFC 9000 §14); anything bigger must be
proven on the path that carries it, because a network that drops ICMP "packet too big"
silently eats every larger datagram (a *black hole*). quictun's QUIC talks to one virtual
peer while the path manager picks the physical path, so the proof is made here, per
direct path, below QUIC: a *probe* is a signed STUN Binding request padded (PADDING,
RFC 5780 §7.6) to exactly the size under test, sent on that path; the peer's signed,
small answer, matched by transaction id and source address, proves that a datagram of
that size got through in *our sending direction* (each side probes its own). Sizes are
UDP payload sizes, the unit of QUIC's max_datagram_size. The relay path needs none of
this: it is a WebSocket, bounded by the relay's frame limit, not by an MTU.

A :class:`Pmtu` is the state of one path. It never touches a socket or a clock: the
owner calls :meth:`Pmtu.poll` with the time (after every input and when
:meth:`Pmtu.next_time` comes), sends a probe of the size it returns, and reports what
happened: :meth:`acked` (a signed answer came), :meth:`too_big` (the local stack
refused the size, e.g. EMSGSIZE), :meth:`confirm_soon` (QUIC hints at a stall).
:attr:`size` is what QUIC may use on this path now; it only grows on proof.

States (RFC 8899 §5.2) are data: :data:`TRANSITIONS` maps (state, outcome of a probe
round) to the next state and the effect applied; :data:`PROBE_WAIT` says how long after
entering a state its next round starts::

    BASE       prove BASE (1200) itself        acked -> SEARCHING   failed -> ERROR
    SEARCHING  ceiling first, then bisect      acked/failed -> SEARCHING, which settles
               between the largest size acked  into COMPLETE once the sizes left to try
               (low) and the smallest failed   are closer than ``granularity``
               (high)
    COMPLETE   size = low; while traffic       acked -> COMPLETE    failed -> BASE (the
               flows, one confirmation probe   route changed: back to 1200, search again)
               at ``size`` per confirm_interval  timer (raise_interval) -> SEARCHING
    ERROR      even 1200 does not pass: the    timer (error_retry) -> BASE
               path must not carry QUIC

A *round* is up to ``max_probes`` probes of one size, one in flight at a time. A probe
is lost when its timeout passed **and** the path showed life after it was sent (the
owner passes ``alive_at``, the last time anything authenticated arrived on the path): a
silent path is the path manager's business (it dies and this state is discarded), not
evidence about size; :meth:`Pmtu.wants_liveness` asks the owner for a small probe to
tell the two apart. A round fails when all its probes are lost, or at once when the
local stack refuses the size (:meth:`too_big`). Probe sizes are multiples of 4 (a STUN
message always is).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

__all__ = [
    "BASE_SIZE",
    "Outcome",
    "PROBE_WAIT",
    "Pmtu",
    "PmtuConfig",
    "State",
    "STEP",
    "TRANSITIONS",
    "udp_payload_limit",
]

BASE_SIZE = 1200  # QUIC's guaranteed UDP payload (RFC 9000 §14), RFC 8899's BASE_PLPMTU
STEP = 4  # probe sizes are multiples of 4 bytes (STUN messages are)
_IPV4_OVERHEAD = 20 + 8  # IPv4 header without options + UDP header
_IPV6_OVERHEAD = 40 + 8


class State(enum.Enum):
    """Where the search is (RFC 8899 §5.2; DISABLED is the relay path, never a Pmtu)."""

    BASE = "base"
    SEARCHING = "searching"
    COMPLETE = "complete"
    ERROR = "error"


class Outcome(enum.Enum):
    """What ended a probe round, or a state's timer."""

    ACKED = "acked"
    FAILED = "failed"
    TIMER = "timer"


# (state, outcome) -> (next state, effect). The effect names a method of Pmtu, applied
# before entering the next state. A state with no entry for an outcome never sees it.
TRANSITIONS: dict[tuple[State, Outcome], tuple[State, str]] = {
    (State.BASE, Outcome.ACKED): (State.SEARCHING, "_start_search"),
    (State.BASE, Outcome.FAILED): (State.ERROR, "_at_base"),
    (State.SEARCHING, Outcome.ACKED): (State.SEARCHING, "_raise_low"),
    (State.SEARCHING, Outcome.FAILED): (State.SEARCHING, "_lower_high"),
    (State.COMPLETE, Outcome.ACKED): (State.COMPLETE, "_confirmed"),
    (State.COMPLETE, Outcome.FAILED): (State.BASE, "_at_base"),
    (State.COMPLETE, Outcome.TIMER): (State.SEARCHING, "_start_search"),
    (State.ERROR, Outcome.TIMER): (State.BASE, "_at_base"),
}

PROBE_WAIT: dict[State, str] = {
    State.BASE: "",  # at once
    State.SEARCHING: "",  # at once
    State.COMPLETE: "confirm_interval",  # and only while traffic flows
    State.ERROR: "error_retry",  # then the TIMER outcome: back to BASE
}
"""The PmtuConfig field giving the delay from entering a state to its next round ("" =
none). COMPLETE also has a second timer, ``raise_interval``, for its TIMER outcome."""


@dataclass(frozen=True)
class PmtuConfig:
    """Knobs of the search (seconds unless stated)."""

    base: int = BASE_SIZE
    """The size assumed before any proof and fallen back to (bytes, multiple of 4)."""
    max_size: int = 16380
    """The largest size ever probed (bytes). Loopback would carry 65507, but aioquic
    writes frame lengths as 2-byte varints (< 16384), and past a few KB bigger datagrams
    save little."""
    max_probes: int = 3
    """Probes of one size before it counts as too big (RFC 8899 MAX_PROBES)."""
    timeout_rtts: float = 4.0
    """A probe is lost this many path RTTs after it was sent ..."""
    timeout_min: float = 0.4
    """... but never sooner than this (a busy peer answers late) ..."""
    timeout_max: float = 3.0
    """... nor later than this (also the timeout while the RTT is unknown)."""
    granularity: int = 16
    """The search stops when the sizes left to try span fewer bytes than this."""
    confirm_interval: float = 10.0
    """COMPLETE with a size above base: one confirmation probe this often while traffic
    flows (black-hole detection; RFC 8899 §4.3). 0 disables confirmations."""
    raise_interval: float = 600.0
    """COMPLETE: search again above the current size this long after completing
    (RFC 8899 PMTU_RAISE_TIMER): the path may have grown."""
    error_retry: float = 30.0
    """ERROR: try BASE again after this long."""


def udp_payload_limit(link_mtu: int | None, ipv6: bool, config: PmtuConfig) -> int:
    """The largest UDP payload worth probing on a path whose IP MTU (as the local stack
    reports it for the route, e.g. Linux ``IP_MTU``) is ``link_mtu``; without one, what
    fits an Ethernet MTU of 1500. Clamped to [base, max_size], a multiple of 4."""
    mtu = link_mtu if link_mtu is not None and link_mtu > 0 else 1500
    payload = mtu - (_IPV6_OVERHEAD if ipv6 else _IPV4_OVERHEAD)
    payload = min(payload, config.max_size)
    return max(config.base, payload - payload % STEP)


@dataclass
class _Probe:
    size: int
    sent_at: float
    deadline: float
    expired: bool = False  # deadline passed with no sign of life on the path yet
    asked: bool = False  # wants_liveness() said so once for this probe


class Pmtu:
    """The path MTU state of one direct path (see the module docstring).

    Args:
        ceiling: the largest size to probe (see :func:`udp_payload_limit`); a multiple
            of 4, at least ``config.base``.
        now: the time the path was selected.
        config: the search knobs.
    """

    def __init__(self, ceiling: int, now: float, config: PmtuConfig | None = None) -> None:
        self.cfg = config if config is not None else PmtuConfig()
        base = self.cfg.base
        if base % STEP or base < BASE_SIZE:
            raise ValueError(f"base size must be a multiple of {STEP}, >= {BASE_SIZE}")
        self.ceiling = max(base, ceiling - ceiling % STEP)
        self.state = State.BASE
        self.size = base  # what QUIC may use on this path now
        self._low = base  # largest size acked in this search
        self._high = self.ceiling  # largest size still worth trying
        self._high_untested = True  # the first SEARCHING probe tries the ceiling itself
        self._round_size = 0  # size of the round in progress (0: none)
        self._round_sent = 0
        self._inflight: _Probe | None = None
        self._next_round: float | None = now  # BASE: at once
        self._raise_at: float | None = None
        self._confirm_now = False
        self.probes_sent = 0
        self.probes_lost = 0
        self.black_holes = 0

    # ------------------------------------------------------------------ queries
    @property
    def usable(self) -> bool:
        """False while the path cannot carry even ``base`` (ERROR): QUIC must not use it."""
        return self.state is not State.ERROR

    def wants_liveness(self) -> bool:
        """True (once per probe) when a probe timed out with no sign of life on the path
        since it was sent: a small liveness probe now would tell loss from silence."""
        probe = self._inflight
        if probe is None or not probe.expired or probe.asked:
            return False
        probe.asked = True
        return True

    def next_time(self) -> float | None:
        """When :meth:`poll` must run next (None: only after new input).

        While a timed-out probe waits for a sign of life on the path, this is None: the
        owner calls :meth:`poll` again after the next input anyway.
        """
        times = []
        if self._inflight is not None:
            if not self._inflight.expired:
                times.append(self._inflight.deadline)
        elif self._next_round is not None:
            times.append(self._next_round)
        if self._raise_at is not None:
            times.append(self._raise_at)
        return min(times) if times else None

    # ------------------------------------------------------------------ input
    def poll(self, now: float, *, rtt: float | None, alive_at: float | None,
             active: bool) -> int | None:
        """Run what is due at ``now``; return the size of a probe to send now, or None.

        The returned probe counts as sent at ``now``: the owner must send it (a padded,
        signed request of exactly that many bytes) and later report its answer to
        :meth:`acked`. ``rtt``: the path's latest round-trip time (None if unknown);
        ``alive_at``: the last time anything authenticated arrived on the path;
        ``active``: QUIC traffic flows on the path (recently: the path manager says
        within ``confirm_interval``); confirmations are only worth sending then.
        """
        probe = self._inflight
        if probe is not None and now >= probe.deadline:
            if alive_at is None or alive_at <= probe.sent_at:
                probe.expired = True  # next_time() stops returning its deadline
                return None  # no sign of life since: no evidence about the size
            self._inflight = None
            self.probes_lost += 1
            if self._round_sent >= self.cfg.max_probes:
                self._finish(Outcome.FAILED, now)
        if self._raise_at is not None and now >= self._raise_at:
            self._inflight = None  # a confirmation in flight no longer matters
            self._finish(Outcome.TIMER, now)
        if self._inflight is not None:
            return None
        size = self._due_size(now, active)
        if size is None:
            return None
        if size != self._round_size:
            self._round_size, self._round_sent = size, 0
        self._round_sent += 1
        self.probes_sent += 1
        self._inflight = _Probe(size, now, now + self._timeout(rtt))
        return size

    def acked(self, size: int, now: float) -> None:
        """A signed answer to a probe of ``size`` came back: that size passes the path.

        Any probe of the round in progress counts (a late answer to an earlier one too);
        answers for other sizes (an earlier round) are ignored.
        """
        if size != self._round_size or self._round_size == 0:
            return
        self._inflight = None
        self._finish(Outcome.ACKED, now)

    def too_big(self, size: int, now: float) -> None:
        """The local stack refused to send ``size`` bytes on this path (EMSGSIZE): it can
        never pass. Lowers the ceiling below it; a round at that size or above fails at
        once; if QUIC's current size is refused, falls back to base and searches again."""
        limit = max(self.cfg.base, size - STEP - (size - STEP) % STEP)
        if limit >= self.ceiling and size > self.ceiling:
            return  # above anything we would try anyway
        self.ceiling = min(self.ceiling, limit)
        self._high = min(self._high, self.ceiling)
        if self.size >= size:
            self.size = self._low = self.cfg.base
            self._inflight = None
            self._round_size = self._round_sent = 0
            self._enter(State.BASE, now)
            return
        if self._round_size >= size:
            self._inflight = None
            self._finish(Outcome.FAILED, now)

    def pause(self, now: float) -> None:
        """The path stops being used (another was selected): forget the probe in flight
        and the round in progress, keep what was proven. The next :meth:`poll` starts a
        fresh round (a confirmation at once, in COMPLETE above base)."""
        self._inflight = None
        self._round_size = self._round_sent = 0
        if self.state is State.COMPLETE:
            self._confirm_now = self.size > self.cfg.base
        elif self.state is not State.ERROR:
            self._next_round = now

    def confirm_soon(self) -> None:
        """QUIC's loss recovery stalled: confirm the current size with the next poll
        (COMPLETE above base only), instead of at the next confirm_interval."""
        if self.state is State.COMPLETE and self.size > self.cfg.base:
            self._confirm_now = True

    # ------------------------------------------------------------------ machinery
    def _timeout(self, rtt: float | None) -> float:
        cfg = self.cfg
        if rtt is None:
            return cfg.timeout_max
        return min(cfg.timeout_max, max(cfg.timeout_min, cfg.timeout_rtts * rtt))

    def _due_size(self, now: float, active: bool) -> int | None:
        """The size of the probe due at ``now`` (after the round in progress), or None."""
        if 0 < self._round_sent < self.cfg.max_probes:
            return self._round_size  # the next probe of a round that lost one
        if self.state is State.COMPLETE and self._confirm_now:
            self._confirm_now = False
            return self.size
        if self._next_round is None or now < self._next_round:
            return None
        state = self.state
        if state is State.ERROR:
            self._finish(Outcome.TIMER, now)  # error_retry passed: back to BASE
            return self._due_size(now, active)
        if state is State.BASE:
            return self.cfg.base
        if state is State.SEARCHING:
            return self._search_size()
        # COMPLETE: a confirmation, only above base and while traffic flows
        if self.cfg.confirm_interval <= 0 or self.size <= self.cfg.base:
            self._next_round = None
            return None
        if not active:
            self._next_round = now + self.cfg.confirm_interval
            return None
        return self.size

    def _search_size(self) -> int | None:
        """The next size to try in SEARCHING, or None when the search is done."""
        if self._high - self._low < max(self.cfg.granularity, STEP):
            return None
        if self._high_untested:
            return self._high
        mid = (self._low + self._high + STEP) // 2
        return max(self._low + STEP, mid - mid % STEP)

    def _finish(self, outcome: Outcome, now: float) -> None:
        """End the round (or a timer) with ``outcome``: apply the transition's effect to
        the round's size (0 for a timer) and enter the next state."""
        size = self._round_size
        self._round_size = self._round_sent = 0
        nxt, effect = TRANSITIONS[(self.state, outcome)]
        getattr(self, effect)(outcome, size)
        self._enter(nxt, now)

    def _enter(self, state: State, now: float) -> None:
        if state is State.SEARCHING and self._search_size() is None:
            state = State.COMPLETE  # nothing left to try: the search settles
        entering_complete = state is State.COMPLETE and self.state is not State.COMPLETE
        self.state = state
        wait = PROBE_WAIT[state]
        self._next_round = now + (getattr(self.cfg, wait) if wait else 0.0)
        if state is State.COMPLETE:
            if entering_complete:
                self._raise_at = now + self.cfg.raise_interval
        else:
            self._raise_at = None
            self._confirm_now = False

    # effects named in TRANSITIONS: (outcome, size of the round that ended)
    def _start_search(self, outcome: Outcome, size: int) -> None:
        """Search from the current size up to the ceiling, ceiling first."""
        self._low = self.size
        self._high = self.ceiling
        self._high_untested = True

    def _raise_low(self, outcome: Outcome, size: int) -> None:
        """The size tried passed: QUIC may use it at once."""
        self._low = self.size = max(self.size, size)
        if self._low >= self._high:
            self._high_untested = False

    def _lower_high(self, outcome: Outcome, size: int) -> None:
        """The size tried failed: only smaller sizes are left."""
        self._high = max(self._low, min(self._high, size - STEP))
        self._high_untested = False

    def _confirmed(self, outcome: Outcome, size: int) -> None:
        """A confirmation passed: nothing changes."""

    def _at_base(self, outcome: Outcome, size: int) -> None:
        """Back to base (a black hole, base itself failing, or a retry after ERROR)."""
        if self.state is State.COMPLETE and outcome is Outcome.FAILED:
            self.black_holes += 1
        self.size = self._low = self.cfg.base
        self._high = self.ceiling
        self._high_untested = True
