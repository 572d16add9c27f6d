"""Which candidates the path manager keeps, and which one it sends on (pure rules).

Selection: the best validated candidate is the lowest ``(rank, rtt at validation)``
(never a distrusted one, :mod:`.recovery`).
From the relay or from no path, upgrade to it as soon as one exists. From a direct path,
switch only to a *strictly* lower rank, never on RTT, so loss and jitter cannot make it
flap; or, early, when the selected path went quiet (through a heartbeat and the fast
probes after it) while another of no worse rank answered recently: the peer's NAT moved
it. Never to a worse rank, so loss on a LAN path cannot flap it either. A validated path
that path MTU discovery found unable to carry even 1200 bytes (:mod:`.pmtu`, ERROR) is
not *usable*: it is never selected until a retry passes.

Room: at most ``limit`` signalled (or prflx) candidates; a new one evicts the one
signalled longest ago that is neither validated nor selected (:func:`eviction_victim`).
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Sequence

from .probes import CandidateState
from .types import KIND_PREFERENCE, RANK_RELAY, Addr, Candidate, IPNetwork, PathConfig, rank_of

__all__ = ["EARLY_MOVE_EXTRA", "MAX_CANDIDATES", "MAX_PRFLX", "CandidateTable", "best",
           "eviction_victim", "repunch_targets", "target"]

MAX_CANDIDATES = 32  # signalled candidates kept; the oldest idle one is evicted
MAX_PRFLX = 8  # peer-reflexive candidates kept; the oldest unvalidated one is evicted

EARLY_MOVE_EXTRA = 1.0  # s of fast probing unanswered before moving off a silent path early



def best(cands: Iterable[CandidateState]) -> CandidateState | None:
    """The best usable candidate (validated, able to carry 1200 bytes) that is not
    distrusted (see :mod:`quictun.punch.recovery`), or None."""
    live = [c for c in cands if c.usable and c.distrusted_until is None]
    if not live:
        return None
    return min(live, key=lambda c: (c.rank, c.validation_rtt or 0.0, c.addr))


def target(
    cands: Iterable[CandidateState], selected: CandidateState | None, cfg: PathConfig,
    now: float, *, relay_only: bool, relay_usable: bool, relay_wanted: bool,
) -> tuple[CandidateState | None, bool]:
    """``(direct candidate, use the relay)`` that should be current now.

    ``relay_only``: never a direct path; ``relay_usable``: the relay can carry datagrams;
    ``relay_wanted``: fall back to it when there is no direct path (the caller folds in
    the mode and ``relay_after``).
    """
    if relay_only:
        return None, relay_usable
    cands = list(cands)
    top = best(cands)
    cur = selected
    if cur is not None and cur.usable:
        if top is not None and top.rank < cur.rank:
            return top, False
        if cur.silent(cfg, now, EARLY_MOVE_EXTRA):
            alive = [c for c in cands
                     if c.usable and c is not cur and c.rank <= cur.rank
                     and not c.silent(cfg, now) and c.distrusted_until is None]
            if alive:
                return min(alive, key=lambda c: (c.rank, c.validation_rtt or 0.0)), False
        return cur, False
    if top is not None:
        return top, False
    return None, relay_wanted


def repunch_targets(cands: Iterable[CandidateState],
                    selected: CandidateState | None) -> list[CandidateState]:
    """Unvalidated candidates that would beat the current path if they worked."""
    limit = selected.rank if selected is not None else RANK_RELAY + 1
    return [c for c in cands if not c.validated and c.rank < limit]


def eviction_victim(cands: Iterable[CandidateState], selected: CandidateState | None, *,
                    prflx: bool, limit: int) -> tuple[bool, CandidateState | None]:
    """Room for one more (prflx or signalled) candidate? ``(True, None)``: there is room;
    ``(True, victim)``: after forgetting ``victim`` (the oldest that is neither validated
    nor selected); ``(False, None)``: every one of ``limit`` is in use."""
    same = [c for c in cands if (c.kind == "prflx") == prflx]
    if len(same) < limit:
        return True, None
    victims = [c for c in same if not c.validated and c is not selected]
    if not victims:
        return False, None
    return True, min(victims, key=lambda c: c.seq)


class CandidateTable(dict[Addr, CandidateState]):
    """The remote candidates of one session, by address, with the room rules above.

    Each method that adds a candidate may evict another: it returns the address it
    forgot (the caller forgets that address's transactions too), or None.
    """

    def __init__(self, local_networks: Sequence[IPNetwork]) -> None:
        super().__init__()
        self._networks = tuple(local_networks)
        self._seq = itertools.count(1)

    def _add(self, addr: Addr, kind: str) -> CandidateState:
        c = CandidateState(addr, kind, rank_of(addr, kind, self._networks), seq=next(self._seq))
        self[addr] = c
        return c

    def _make_room(self, selected: CandidateState | None, *, prflx: bool,
                   limit: int) -> tuple[bool, Addr | None]:
        room, victim = eviction_victim(self.values(), selected, prflx=prflx, limit=limit)
        if victim is None:
            return room, None
        del self[victim.addr]
        return True, victim.addr

    def signalled(self, cand: Candidate, selected: CandidateState | None
                  ) -> tuple[CandidateState | None, Addr | None]:
        """Record a candidate the peer signalled (again: that refreshes its age, and a
        better kind wins); None when all ``MAX_CANDIDATES`` are in use."""
        existing = self.get(cand.addr)
        forgot = None
        if existing is None:
            room, forgot = self._make_room(selected, prflx=False, limit=MAX_CANDIDATES)
            if not room:
                return None, None
            existing = self._add(cand.addr, cand.kind)
        elif KIND_PREFERENCE[cand.kind] < KIND_PREFERENCE[existing.kind]:
            existing.kind = cand.kind
            existing.rank = rank_of(existing.addr, existing.kind, self._networks)
        existing.seq = next(self._seq)
        return existing, forgot

    def learn_prflx(self, addr: Addr, selected: CandidateState | None
                    ) -> tuple[CandidateState | None, Addr | None]:
        """A peer-reflexive candidate (the source of a signed request, or a birthday hit);
        None when all ``MAX_PRFLX`` are in use."""
        room, forgot = self._make_room(selected, prflx=True, limit=MAX_PRFLX)
        return (self._add(addr, "prflx") if room else None), forgot
