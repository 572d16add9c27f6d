"""Path MTU discovery inside the path manager: which size QUIC may use on the current path.

Theory of operation
-------------------
QUIC starts at 1200 bytes, which every QUIC path carries (RFC 9000 §14). The selected
direct path gets a :class:`~quictun.punch.pmtu.Pmtu` (the DPLPMTUD state machine of one
path) when it is first selected; its probes are the path manager's own signed STUN
Binding requests, padded (PADDING) to the size under test, sent on that path and answered
like any other probe (``Txn.pmtu_size`` routes the answer back here). The ceiling of the
search is the local route's MTU, if the shell can tell (``route_mtu``, Linux ``IP_MTU``),
else what fits Ethernet's 1500.

:class:`PathMtu` is that bookkeeping for one :class:`~quictun.punch.manager.PathManager`,
which owns it and calls it at fixed points (so the manager itself stays small):

* :meth:`PathMtu.bind` once, with the manager's candidate table, outbox, event queue and
  a view of its selection;
* :meth:`PathMtu.service` at the end of every service run (it queues the probes that are
  due; True means a path's usability changed, so the manager re-selects);
* :meth:`PathMtu.switched` after every PathChanged (the old path's search pauses, the new
  size is announced right after its PathChanged);
* :meth:`PathMtu.answered` for every accepted answer, :meth:`PathMtu.forget` when a path
  must be validated again (it may come back over another route: prove it again),
  :meth:`PathMtu.timers` in ``get_timer``.

The shell reads :attr:`PathMtu.datagram_size` (announced as :class:`DatagramSizeChanged`
whenever it moves) and reports QUIC's probe timeouts (:meth:`PathMtu.note_quic_stall`: a
confirmation at once, so a black hole after a route change is found in seconds) and the
local stack's refusals (:meth:`PathMtu.note_send_too_big`, EMSGSIZE); after either it
drains the manager's events as after any input.

Only the selected path's search runs (and the retry of a path in ERROR, which cannot
carry even 1200 bytes and is therefore never selected: see ``CandidateState.usable``); an
alternate keeps its state, frozen, until it is selected again. The relay path is a
WebSocket, bounded by the relay's frame limit, not an MTU: it has a fixed size.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable
from typing import Any

from .pmtu import BASE_SIZE, Pmtu, PmtuConfig, udp_payload_limit
from .probes import CandidateState, Outbox, Txn
from .types import Addr, DatagramSizeChanged, Event, normalize_addr

__all__ = ["PathMtu", "Selection"]

Selection = Callable[[], "tuple[CandidateState | None, bool]"]
"""``() -> (selected direct candidate or None, on the relay)``: the manager's selection."""


class PathMtu:
    """The path MTU side of one path manager (see the module docstring).

    Args:
        config: the search knobs; None: no discovery, every direct path uses
            ``unprobed``.
        relay_size: the datagram size announced for the relay path.
        unprobed: the size before any path exists, and of a direct path without
            discovery (QUIC's starting size).
        route_mtu: ``route_mtu(addr)``, the IP MTU of the local route to ``addr`` or None
            (the shell's; without it the search's ceiling is what fits Ethernet).
    """

    def __init__(self, config: PmtuConfig | None = None, *, relay_size: int = BASE_SIZE,
                 unprobed: int = BASE_SIZE,
                 route_mtu: Callable[[Addr], int | None] | None = None) -> None:
        self.config = config
        self.relay_size = relay_size
        self.unprobed = unprobed
        self._route_mtu = route_mtu
        self._announced = unprobed  # QUIC starts at its configured size
        self._cands: Iterable[CandidateState] = ()
        self._lookup: Callable[[Addr], CandidateState | None] = lambda addr: None
        self._outbox: Outbox | None = None
        self._events: deque[Event] = deque()
        self._selection: Selection = lambda: (None, False)
        self.probes_sent = 0
        self.probes_acked = 0

    def bind(self, cands: dict[Addr, CandidateState], outbox: Outbox,
             events: deque[Event], selection: Selection) -> PathMtu:
        """Attach to the manager's state (once, from its constructor); returns self."""
        self._cands = cands.values()
        self._lookup = cands.get
        self._outbox, self._events, self._selection = outbox, events, selection
        return self

    # ------------------------------------------------------------------ the shell's view
    @property
    def datagram_size(self) -> int:
        """The largest UDP payload QUIC may send on the current path now (bytes): the
        selected direct path's proven size, the relay's ``relay_size``, or ``unprobed``
        with no path (announced by :class:`DatagramSizeChanged`)."""
        selected, on_relay = self._selection()
        if selected is not None:
            if self.config is None:
                return self.unprobed
            return selected.pmtu.size if selected.pmtu is not None else self.config.base
        return self.relay_size if on_relay else self.unprobed

    def note_quic_stall(self) -> None:
        """QUIC's loss recovery fired (a probe timeout): if the selected direct path uses
        a size above 1200, confirm that size now (see :meth:`Pmtu.confirm_soon`)."""
        selected, _relay = self._selection()
        if selected is not None and selected.pmtu is not None:
            selected.pmtu.confirm_soon()

    def note_send_too_big(self, addr: Addr, size: int, now: float) -> None:
        """The local stack refused to send ``size`` bytes to ``addr`` (EMSGSIZE): that
        path's search stays below it (:meth:`Pmtu.too_big`); may announce a new size."""
        try:
            c = self._lookup(normalize_addr(addr))
        except ValueError:
            return
        if c is not None and c.pmtu is not None:
            c.pmtu.too_big(size, now)
            self._announce()

    def report(self) -> dict[str, Any]:
        """Counters for the manager's ``stats()``, and the selected path's search."""
        out: dict[str, Any] = {"pmtu_probes_sent": self.probes_sent,
                               "pmtu_probes_acked": self.probes_acked}
        selected, _relay = self._selection()
        p = selected.pmtu if selected is not None else None
        if p is not None:
            out["pmtu"] = {"state": p.state.value, "size": p.size, "ceiling": p.ceiling,
                           "black_holes": p.black_holes, "lost": p.probes_lost}
        return out

    # ------------------------------------------------------------------ the manager's hooks
    def service(self, now: float) -> bool:
        """Run the selected path's search (and the retry of a path in ERROR), queueing the
        padded probes that are due. True: a path became (un)usable, re-select."""
        cfg = self.config
        if cfg is None or self._outbox is None:
            return False
        selected, _relay = self._selection()
        if selected is not None and selected.pmtu is None:
            link = self._route_mtu(selected.addr) if self._route_mtu is not None else None
            ceiling = udp_payload_limit(link, ":" in selected.addr[0], cfg)
            selected.pmtu = Pmtu(ceiling, now, cfg)
        changed = False
        for c in self._cands:
            p = c.pmtu
            if p is None or not _polled(c, selected):
                continue
            active = c.traffic_at is not None and now - c.traffic_at < cfg.confirm_interval
            usable = p.usable
            size = p.poll(now, rtt=c.rtt, alive_at=c.last_alive, active=active)
            if size is not None:
                self._outbox.request(c.addr, c.slot, now, pad_to=size)
                self.probes_sent += 1
            if p.wants_liveness() and (c.next_probe is None or c.next_probe > now):
                c.next_probe = now  # a small probe: lost because too big, or path silent?
            changed |= p.usable != usable  # ERROR: move off it; a retry passed: may return
        self._announce()
        return changed

    def switched(self, before: CandidateState | None, now: float) -> None:
        """The selection changed (after its PathChanged): ``before``'s search pauses (no
        stale probe counted lost; its size is confirmed when it is selected again), and
        the size of the new path is announced."""
        selected, _relay = self._selection()
        if (before is not None and before is not selected and before.pmtu is not None
                and before.pmtu.usable):
            before.pmtu.pause(now)
        self._announce()

    def answered(self, c: CandidateState | None, txn: Txn, now: float) -> None:
        """A signed answer to one of our probes came from ``c``."""
        if c is not None and txn.pmtu_size and c.pmtu is not None:
            c.pmtu.acked(txn.pmtu_size, now)
            self.probes_acked += 1

    @staticmethod
    def forget(c: CandidateState) -> None:
        """``c`` must be validated again: its path may take another route, prove it again."""
        c.pmtu = None

    def timers(self) -> list[float]:
        """When :meth:`service` must run next (for the manager's ``get_timer``)."""
        selected, _relay = self._selection()
        return [t for c in self._cands if c.pmtu is not None and _polled(c, selected)
                and (t := c.pmtu.next_time()) is not None]

    def _announce(self) -> None:
        """Queue a DatagramSizeChanged if :attr:`datagram_size` moved since the last one."""
        size = self.datagram_size
        if size != self._announced:
            self._announced = size
            self._events.append(DatagramSizeChanged(size))


def _polled(c: CandidateState, selected: CandidateState | None) -> bool:
    """Whose search runs: the selected path's, and a failed (ERROR) one's retry."""
    return (c.pmtu is not None and c.validated
            and (c is selected or not c.pmtu.usable))
