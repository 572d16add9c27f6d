"""Sans-I/O path manager: punch, validate and pick the UDP path under one QUIC peer.

Theory of operation
-------------------
QUIC talks to one fixed virtual peer address; this machine decides where each datagram
really goes: a *direct* path (a remote candidate address on our one UDP socket) or the
*relay* (the signalling WebSocket). It never touches a socket or a clock: the shell feeds
it datagrams and the time, and calls, after every input::

    datagrams_to_send(now)   # send each (data, addr) on the UDP socket
    next_event()             # until None: PathChanged, SuspectChanged, GatherWanted,
                             # DatagramSizeChanged, PunchFailed
    get_timer()              # re-arm; call handle_timer(now) when it fires

It also decides when the shell must re-learn our own candidates and tell the peer
(:class:`GatherWanted`, scheduled by :mod:`quictun.punch.gather`); the shell reports the
end of each gathering with :meth:`PathManager.gathered`. The size QUIC may use on the
current path (path MTU discovery) is :attr:`PathManager.mtu`'s (:mod:`quictun.punch.pathmtu`).

Probes are STUN Binding requests signed (MESSAGE-INTEGRITY-SHA256) with ``remote_key``;
the peer answers with a Binding success carrying XOR-MAPPED-ADDRESS, signed with its
local key (our ``remote_key``). A remote candidate is *validated* when a signed response
arrives, from the address we sent it to, for a transaction id we issued. Requests signed
with ``local_key`` are answered; one from an unknown source adds a ``prflx`` candidate
(peer-reflexive: how a symmetric NAT's per-destination port is learned) and starts a
*triggered check* (an immediate probe plus a one-second burst).

Each candidate's probe timer, and how replayed requests are told from retransmissions
and rate-limited, are :mod:`quictun.punch.probes`'s.

Selection (which candidate, and when to switch) is :mod:`quictun.punch.selection`'s.
The selected path is *dead* when nothing (signed response or
:meth:`note_direct_traffic`) came for ``dead_after`` while probes went unanswered for at
least one heartbeat; it is then un-validated (its pending transactions are forgotten, so
coming back needs a response to a probe sent after the fallback), and we fall back to
the best other validated path, else the relay (auto mode), else nothing, and start
re-punch bursts every ``repunch_interval`` while not direct (every ``upgrade_interval``,
only toward better-ranked candidates, while on a direct path that is not the best rank).
Probe answers are not data: a path that answers them but carries no authenticated QUIC
is distrusted, and a dead path may start a new birthday attempt (:mod:`.recovery`).

Addresses are normalised on the way in (IPv4-mapped IPv6 -> IPv4, ``(host, port)``) and
handed back so; a shell with a dual-stack socket maps IPv4 back to ``::ffff:a.b.c.d``.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from ..proto import stun
from ..proto.limits import Sighting, TokenBucket
from .birthday import Birthday
from .gather import FIRST_DELAY, GatherSchedule
from .pathmtu import PathMtu
from .probes import ALTERNATE_FACTOR, CandidateState, Datagram, Outbox
from .recovery import BirthdayRetry, birthday_toward, check_data, distrust, quiet, release_distrust
from .selection import MAX_CANDIDATES, MAX_PRFLX, CandidateTable, repunch_targets, target
from .types import (
    RELAY_PATH,
    Addr,
    Candidate,
    Event,
    GatherWanted,
    IPNetwork,
    NetPath,
    PathChanged,
    PathConfig,
    PunchFailed,
    SuspectChanged,
    normalize_addr,
)

__all__ = ["MAX_CANDIDATES", "MAX_PRFLX", "PathManager"]

PRFLX_RATE, PRFLX_BURST = 4.0, 4  # new prflx candidates: per second, at once
TRIGGER_RATE, TRIGGER_BURST = 4.0, 8  # triggered checks: per second, at once
TRIGGERED_BURST = 2.0  # seconds a triggered check keeps probing a candidate


class PathManager:
    """The path state machine for one peer connection (see the module docstring).

    Args:
        local_key: verifies incoming probe requests and signs our responses.
        remote_key: signs our probe requests and verifies the peer's responses.
        local_networks: our own subnets; a peer address inside one ranks as LAN (0).
        mode: ``"auto"`` (direct, relay as fallback), ``"direct"`` (never the relay) or
            ``"relay"`` (never any UDP: no probes and no answers).
        relay_available: whether the relay can carry datagrams now.
        config: timing; defaults to :class:`PathConfig()`.
        random_bytes: ``random_bytes(n)`` returns n random bytes (transaction ids,
            birthday ports).
        multi_socket: the shell sends :meth:`datagrams_to_send_slots` from extra sockets
            (slots) on request, so this side may take the birthday *hard* role.
        regather: the shell can re-learn our candidates on request
            (:class:`GatherWanted`); off, none is ever asked for.
        mtu: path MTU discovery (default: none; every path at 1200 bytes, no events).
    """

    def __init__(
        self,
        *,
        local_key: bytes,
        remote_key: bytes,
        local_networks: Sequence[IPNetwork],
        mode: str = "auto",
        relay_available: bool = True,
        config: PathConfig | None = None,
        random_bytes: Callable[[int], bytes],
        multi_socket: bool = False,
        regather: bool = False,
        mtu: PathMtu | None = None,
    ) -> None:
        if mode not in ("auto", "direct", "relay"):
            raise ValueError(f"unknown mode: {mode!r}")
        self._mode = mode
        self._relay_available = relay_available
        self._cfg = config if config is not None else PathConfig()
        self._random_bytes = random_bytes
        self._multi_socket = multi_socket
        self._local_cands: list[Candidate] | None = None
        self._bday: Birthday | None = None
        self._bday_decided, self._bday_at = False, 0.0  # (next) attempt decided; due at
        self._bday_retry = BirthdayRetry()  # more attempts after a death (recovery.py)
        self._cands = CandidateTable(local_networks)
        self._outbox = Outbox(local_key=local_key, remote_key=remote_key,
                              random_bytes=random_bytes)
        self._txns = self._outbox.txns
        self._prflx_bucket = TokenBucket(PRFLX_RATE, PRFLX_BURST)
        self._trigger_bucket = TokenBucket(TRIGGER_RATE, TRIGGER_BURST)
        self._events: deque[Event] = deque()
        self._regather = regather and mode != "relay"
        self._gather = GatherSchedule()
        # the last PathChanged was direct; a PathChanged was emitted; the last
        # SuspectChanged said suspect
        self._was_direct = self._path_seen = self._suspect = False
        self.mtu = (mtu or PathMtu()).bind(self._cands, self._outbox, self._events,
                                           lambda: (self._selected, self._on_relay))
        self._started, self._start_time, self._punch_deadline_done = False, 0.0, False
        self._next_repunch: float | None = None
        self._selected: CandidateState | None = None
        self._on_relay = False
        self._stats = dict.fromkeys((
            "probes_sent", "responses_received", "requests_received", "responses_sent",
            "invalid_dropped", "replays_dropped", "retransmissions", "rate_limited",
            "triggered_checks", "prflx_learned", "validations", "paths_died", "switches",
            "relay_traffic", "birthday_probes", "low_ttl_probes", "paths_distrusted"), 0)
        self.birthday_role: str | None = None
        """``"easy"`` / ``"hard"`` once a birthday attempt started (diagnostics)."""

    # ------------------------------------------------------------------ public API
    @property
    def current(self) -> NetPath | None:
        """Where to send QUIC datagrams now: a direct path, the relay, or None (nowhere)."""
        if self._selected is not None:
            return self._selected.path()
        return RELAY_PATH if self._on_relay else None

    def add_remote_candidates(self, cands: Iterable[Candidate], now: float) -> None:
        """Learn the peer's candidates (from signalling; may be called repeatedly).

        After start(), a new or not-yet-validated candidate gets a punch burst right away
        (so re-sent candidates re-punch). At most ``MAX_CANDIDATES`` signalled candidates
        are kept: beyond that, the one signalled longest ago (re-signalling refreshes) that
        is neither validated nor selected is forgotten; if there is none, the new one is
        ignored. So a peer that roams for hours (a new reflexive address after every NAT
        rebinding) can always go direct again.
        """
        for cand in cands:
            existing, forgot = self._cands.signalled(cand, self._selected)
            if forgot is not None:
                self._txns.forget(forgot)
            if existing is None:
                continue
            if self._started and self._mode != "relay" and not existing.validated:
                existing.burst(now, now + self._cfg.punch_timeout, fast=True)
        self._reselect(now)

    def set_local_candidates(self, cands: Iterable[Candidate]) -> None:
        """Tell the manager our own signalled candidates (optional; improves the birthday
        role decision: two reflexive ports on one IP mean our NAT is endpoint-dependent)."""
        self._local_cands = list(cands)

    def start(self, now: float) -> None:
        """Begin punching (the relay said go). Idempotent."""
        if self._started:
            return
        self._started = True
        self._start_time = now
        self._bday_at = now + self._cfg.birthday_after
        self._next_repunch = now + self._cfg.repunch_interval
        if self._mode != "relay":
            for c in self._cands.values():
                if not c.validated:
                    c.burst(now, now + self._cfg.punch_timeout, fast=True)
        self._reselect(now)

    def receive_stun(self, data: bytes, addr: Addr, now: float, slot: int = 0) -> None:
        """Handle any STUN datagram that arrived on the UDP socket from ``addr``.

        ``slot`` is the socket it arrived on (0: the main socket; see
        :meth:`datagrams_to_send_slots`).

        Anything invalid is silently dropped (counted in ``stats()["invalid_dropped"]``):
        malformed, unsigned or wrongly signed, an unknown or expired transaction id, a
        response from another address than the one the request went to, or a request
        whose transaction id recently came from another source (a replay).
        """
        if self._mode == "relay":
            return
        try:
            src = normalize_addr(addr)
            msg = stun.decode(data)
        except ValueError:  # StunError is a ValueError
            self._stats["invalid_dropped"] += 1
            return
        if msg.msg_type == stun.BINDING_REQUEST:
            self._handle_request(data, msg, src, now, slot)
        elif msg.msg_type == stun.BINDING_SUCCESS:
            self._handle_response(data, msg, src, now, slot)
        else:
            self._stats["invalid_dropped"] += 1

    def note_direct_traffic(self, addr: Addr, now: float) -> None:
        """An authenticated QUIC packet came from ``addr``: that path is alive.

        Ignored unless ``addr`` is a validated candidate. Queues no datagram and emits
        no event, so the shell need not drain outputs after it (hot path: called per
        received datagram); the timer may only move later, and an early fire re-arms.
        """
        c = self._cands.get(addr)  # fast path: the shell already hands plain (ip, port)
        if c is None:
            try:
                c = self._cands.get(normalize_addr(addr))
            except ValueError:
                return
        if c is not None and c.validated:
            c.last_alive = c.traffic_at = now
            c.first_unanswered = None

    def note_relay_traffic(self, now: float) -> None:
        """A datagram came through the relay (statistics only)."""
        self._stats["relay_traffic"] += 1

    def uncertain(self, now: float) -> bool:
        """True while the selected direct path shows no sign of life (it is *suspect*:
        nothing for 1.5 heartbeats) and the relay could carry datagrams (auto mode). The
        shell may then send each QUIC datagram over the relay as well (duplicates are
        harmless to QUIC): after a NAT rebinding data keeps flowing, not stalling."""
        c = self._selected
        if c is None or self._mode != "auto" or not self._relay_available:
            return False
        return quiet(c, self._cfg, now)

    def set_relay_available(self, available: bool, now: float) -> None:
        """The relay connection was lost (False) or restored (True)."""
        self._relay_available = available
        self._reselect(now)

    def datagrams_to_send(self, now: float) -> list[tuple[bytes, Addr]]:
        """Run due timers, then return and forget the UDP datagrams to send now (from the
        main socket; a shell without slots never gets the others)."""
        return [(data, addr) for data, addr, _ttl, slot in self.datagrams_to_send_slots(now)
                if slot == 0]

    def datagrams_to_send_slots(self, now: float) -> list[Datagram]:
        """Like :meth:`datagrams_to_send`, as ``(data, addr, ttl, slot)`` for every socket.

        ``ttl`` is an int to send that one datagram with that IP TTL / hop limit (a
        candidate's first probes, see ``PathConfig.low_ttl``), None for the socket default.
        ``slot`` is the socket: 0 the main one, k > 0 the shell's extra socket k (opened on
        first use, any free port). Only a manager created with ``multi_socket=True`` uses
        slots other than 0; the shell closes the extra sockets not in :meth:`aux_slots`."""
        self._service(now)
        return self._outbox.take()

    def aux_slots(self) -> set[int]:
        """The extra sockets (slots > 0) that must stay open now; close all others."""
        wanted = {c.slot for c in self._cands.values() if c.slot}
        if self._bday is not None:
            wanted.update(self._bday.slots())
        return wanted

    def get_timer(self) -> float | None:
        """Return the time at which :meth:`handle_timer` must be called, or None."""
        times: list[float] = []
        for c in self._cands.values():
            if c.next_probe is not None:
                times.append(c.next_probe)
            expiry = c.expiry(self._cfg, c is self._selected)
            if expiry is not None:
                times.append(expiry)
        if self._started and self._mode != "relay":
            if not self._punch_deadline_done:
                times.append(self._punch_deadline())
            if not self._bday_decided and self._cfg.birthday_duration > 0:
                times.append(self._bday_at)
            if self._bday is not None and (t := self._bday.next_time()) is not None:
                times.append(t)
            if self._selected is None and not self._on_relay and self._relay_wanted():
                times.append(self._start_time + self._cfg.relay_after)
            if self._next_repunch is not None and self._repunch_targets():
                times.append(self._next_repunch)
        elif self._started and not self._punch_deadline_done:
            times.append(self._start_time + self._cfg.punch_timeout)
        if (t := self._gather.next_time) is not None:
            times.append(t)
        times += self.mtu.timers()
        return min(times) if times else None

    def handle_timer(self, now: float) -> None:
        """Run everything due at ``now`` (probes are queued for :meth:`datagrams_to_send`)."""
        self._service(now)

    def gathered(self, now: float) -> None:
        """The gathering asked for by :class:`GatherWanted` ended (whatever it found:
        send the candidates to the peer; a failure counts too)."""
        self._gather.done(now)

    def next_event(self) -> Event | None:
        """Pop the next event, or None."""
        return self._events.popleft() if self._events else None

    def stats(self) -> dict[str, Any]:
        """Counters: probes sent, requests/responses received, validations, switches..."""
        return {**self._stats, **self.mtu.report(), "candidates": len(self._cands),
                "pending_transactions": len(self._txns),
                "validated": sorted(c.addr for c in self._cands.values() if c.validated)}

    # ------------------------------------------------------------------ candidates
    def _learn_prflx(self, addr: Addr) -> CandidateState | None:
        c, forgot = self._cands.learn_prflx(addr, self._selected)
        if forgot is not None:
            self._txns.forget(forgot)
        if c is not None:
            self._stats["prflx_learned"] += 1
        return c

    def _invalidate(self, c: CandidateState) -> None:
        """Require a fresh validation (a response to a probe sent from now on)."""
        c.validated, c.first_unanswered = False, None
        self._txns.forget(c.addr)
        self.mtu.forget(c)

    # ------------------------------------------------------------------ STUN input
    def _handle_request(
        self, data: bytes, msg: stun.StunMessage, src: Addr, now: float, slot: int
    ) -> None:
        """A signed request: answer it, maybe learn a prflx candidate and check it.

        Replays (the id came from another source or socket) get nothing; retransmissions
        (same id, source and socket) get the same answer and nothing more; new prflx
        candidates and triggered checks spend a token of their rate limit.
        """
        seen = self._outbox.check_request(data, msg.txid, src, slot, now)
        if seen is None or seen is Sighting.REPLAY:
            self._stats["invalid_dropped"] += 1
            self._stats["replays_dropped"] += seen is Sighting.REPLAY
            return
        self._stats["requests_received"] += 1
        self._stats["responses_sent"] += 1
        if seen is Sighting.REPEAT:
            self._stats["retransmissions"] += 1
            return
        c = self._cands.get(src)
        if c is None:
            if not self._prflx_bucket.take(now):
                self._stats["rate_limited"] += 1
                return
            c = self._learn_prflx(src)
            if c is None:
                return
            c.slot = slot
        elif c.validated:
            return
        elif slot and c.slot != slot:
            # A birthday hit: the peer reached our extra socket ``slot``; probe from there.
            self._txns.forget(c.addr)
            c.slot = slot
        # Triggered check: the peer reaches us from src, so src may now reach back.
        if c.next_probe is None or c.next_probe > now + self._cfg.probe_interval:
            if not self._trigger_bucket.take(now):
                self._stats["rate_limited"] += 1
                return
            self._stats["triggered_checks"] += 1
            c.burst(now, now + TRIGGERED_BURST, fast=True)
        else:
            c.burst_until = max(c.burst_until, now + TRIGGERED_BURST)

    def _handle_response(
        self, data: bytes, msg: stun.StunMessage, src: Addr, now: float, slot: int
    ) -> None:
        txn = self._outbox.match_response(data, msg.txid, src, slot, now)
        if txn is None:
            self._stats["invalid_dropped"] += 1
            return
        c = self._cands.get(src)
        self.mtu.answered(c, txn, now)
        if c is None and txn.learn:  # a birthday probe hit: the peer answered a random port
            c = self._learn_prflx(src)
            if c is not None:
                c.slot = slot
        if c is None:
            return
        if not c.validated and c.slot != slot:
            # the pair works through the socket this answer came in on (a birthday slot):
            # keep sending there, or the path would leave by another NAT mapping
            c.slot = slot
        self._stats["responses_received"] += 1
        rtt = max(0.0, now - txn.sent_at)
        c.rtt = rtt
        mapped = msg.xor_mapped_address
        if mapped is not None:
            try:
                c.local = normalize_addr(mapped)
            except ValueError:
                pass
        c.last_alive = now
        c.first_unanswered = None
        if not c.validated:
            c.validated = True
            c.validation_rtt = rtt
            self._stats["validations"] += 1
            if self._bday is not None:
                self._bday.stop()
            c.next_probe = now + ALTERNATE_FACTOR * self._cfg.heartbeat  # unless selected
            self._reselect(now)

    # ------------------------------------------------------------------ timers
    def _service(self, now: float) -> None:
        """Apply every deadline due at ``now``, then queue due probes."""
        if self._mode == "relay":
            self._check_punch_deadline(now)
            return
        self._txns.expire(now)
        release_distrust(self._cands.values(), now)
        sel = self._selected  # probes answered but no QUIC: not trusted (recovery.py)
        if sel is not None and check_data(sel, self._cfg, now):
            self._stats["paths_distrusted"] += 1
            distrust(sel, self._cfg, now)
            self._path_died(sel, now)
        for c in list(self._cands.values()):
            expiry = c.expiry(self._cfg, c is self._selected)
            if expiry is not None and now >= expiry:
                self._path_died(c, now)
        if self._started:
            if self._next_repunch is not None and now >= self._next_repunch:
                self._repunch(now)
            self._reselect(now)
            self._birthday(now)
            self._check_punch_deadline(now)
        for c in self._cands.values():
            if c.next_probe is not None and c.next_probe <= now:
                self._send_probe(c, now)
        if self.mtu.service(now):
            self._reselect(now)  # a path cannot carry 1200 bytes (or can again)
        self._check_suspect(now)

    def _check_suspect(self, now: float) -> None:
        """Emit SuspectChanged on every change of :meth:`uncertain`; a path that just
        went quiet also starts a re-gathering (our NAT may have moved us), and a due
        gathering is asked for unless the path is direct and fine again."""
        suspect = self.uncertain(now)
        if suspect != self._suspect:
            self._suspect = suspect
            self._events.append(SuspectChanged(suspect))
            if suspect and self._regather:
                self._gather.trigger(now)
        cur = self.current
        satisfied = cur is not None and cur.kind == "direct" and not suspect
        if self._gather.due(now, satisfied):
            self._events.append(GatherWanted())

    def _birthday(self, now: float) -> None:
        """Start the birthday attempt when due (see :mod:`quictun.punch.birthday`), send its
        probes. One at the start, at most ``BirthdayRetry.left`` more after deaths of the
        selected path, each at most ``birthday_rate * birthday_duration`` probes."""
        cfg = self._cfg
        if not self._bday_decided and now >= self._bday_at:
            self._bday_decided = True
            self._bday = birthday_toward(self._cands.values(), self._local_cands, now, cfg,
                                         multi_socket=self._multi_socket,
                                         random_bytes=self._random_bytes)
            if self._bday is not None:
                self.birthday_role = self._bday.role
                self._bday_retry.started(now)
        bday = self._bday
        if bday is None:
            return
        ttl = cfg.low_ttl if bday.role == "hard" and cfg.low_ttl_probes > 0 else None
        for slot, addr in bday.due(now):
            self._outbox.request(addr, slot, now, ttl, learn=True)
            self._stats["birthday_probes"] += 1
        if bday.next_time() is None:
            self._bday = None  # over: aux_slots() keeps only the slots candidates use

    def _send_probe(self, c: CandidateState, now: float) -> None:
        ttl = None
        if c.kind != "prflx" and not c.validated and c.probes < self._cfg.low_ttl_probes:
            ttl = self._cfg.low_ttl  # opens our NAT, dies before the far one (module doc)
            self._stats["low_ttl_probes"] += 1
        c.probes += 1
        self._outbox.request(c.addr, c.slot, now, ttl)
        self._stats["probes_sent"] += 1
        if c.validated and c.first_unanswered is None:
            c.first_unanswered = now
        interval = c.interval(self._cfg, c is self._selected, now)
        c.next_probe = None if interval is None else now + interval

    def _path_died(self, c: CandidateState, now: float) -> None:
        was_selected = c is self._selected
        self._invalidate(c)
        c.next_probe = None
        if not was_selected:
            return
        self._stats["paths_died"] += 1
        at = self._bday_retry.next_attempt(now, self._cfg.birthday_after)
        if at is not None:  # a NAT reset may need birthday probing again (recovery.py)
            self._bday_decided, self._bday_at = False, at
        self._selected = None  # _reselect emits the single PathChanged below
        self._repunch(now, previous=c)

    def _repunch_targets(self) -> list[CandidateState]:
        return repunch_targets(self._cands.values(), self._selected)

    def _repunch(self, now: float, previous: CandidateState | None = None) -> None:
        """One re-punch burst; repeats every repunch_interval while on relay or pathless,
        every upgrade_interval while on a direct path that a candidate could beat."""
        until = now + self._cfg.repunch_burst
        for c in self._repunch_targets():
            c.burst(now, until, fast=False)
        if previous is not None:
            self._reselect(now, previous_direct=previous)
        self._next_repunch = now + (
            self._cfg.repunch_interval if self._selected is None else self._cfg.upgrade_interval
        )

    def _punch_deadline(self) -> float:
        """start + punch_timeout, or the end of a running birthday attempt if later."""
        deadline = self._start_time + self._cfg.punch_timeout
        if self._bday is not None and self._bday.next_time() is not None:
            deadline = max(deadline, self._bday.until)
        return deadline

    def _check_punch_deadline(self, now: float) -> None:
        if not self._started or self._punch_deadline_done or now < self._punch_deadline():
            return
        self._punch_deadline_done = True
        if self.current is None and not self._relay_wanted():
            self._events.append(PunchFailed.at_deadline(self._mode, self._cfg.punch_timeout))

    # ------------------------------------------------------------------ selection
    def _relay_wanted(self) -> bool:
        return self._mode != "direct" and self._relay_available

    def _target(self, now: float) -> tuple[CandidateState | None, bool]:
        """Return (direct candidate, use relay) that should be current now."""
        return target(
            self._cands.values(), self._selected, self._cfg, now,
            relay_only=self._mode == "relay", relay_usable=self._relay_available,
            relay_wanted=self._relay_wanted() and now >= self._start_time + self._cfg.relay_after)

    def _reselect(self, now: float, previous_direct: CandidateState | None = None) -> None:
        """Move ``current`` to the target, emitting one PathChanged if it changed."""
        if not self._started:
            return
        before = previous_direct if previous_direct is not None else self._selected
        before_relay = self._on_relay if previous_direct is None else False
        target, relay = self._target(now)
        self._selected, self._on_relay = target, relay
        if target is before and relay == before_relay:
            return
        if target is not None:
            # A fresh selection: heartbeat now if the evidence is stale, else in one period.
            target.first_unanswered = target.quiet_since = None
            target.selected_at = now
            stale = target.last_alive is None or now - target.last_alive >= self._cfg.heartbeat
            target.next_probe = now if stale else now + self._cfg.heartbeat
        if before is not None and before.validated and before is not target:
            before.next_probe = now + ALTERNATE_FACTOR * self._cfg.heartbeat
        if previous_direct is None:
            self._next_repunch = now + (
                self._cfg.repunch_interval if target is None else self._cfg.upgrade_interval
            )
        self._stats["switches"] += 1
        path = self.current
        self._events.append(PathChanged(path))
        self.mtu.switched(before, now)  # its DatagramSizeChanged follows the PathChanged
        direct = path is not None and path.kind == "direct"
        if self._regather:
            if self._was_direct and not direct:
                self._gather.trigger(now)  # lost the direct path: our NAT may have moved us
            elif not direct and not self._path_seen:
                # starting on the relay: if still not direct in a moment, re-learn our
                # public address (a slow reflector may have missed the offer)
                self._gather.trigger(now, FIRST_DELAY)
        self._path_seen = True
        self._was_direct = direct
