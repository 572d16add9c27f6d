"""What the path manager does when a direct path stops carrying data (sans-I/O rules).

Theory of operation
-------------------
Two rules for :class:`~quictun.punch.manager.PathManager`, kept here so that the manager
stays one state machine:

**Probes are not data.** A signed probe answer proves that small UDP packets pass; the
tunnel needs QUIC to pass. So the selected direct path is watched for *authenticated
QUIC* from it (``CandidateState.traffic_at``, fed by ``note_direct_traffic``), not only
for probe answers (:func:`check_data`):

* once it went quiet (nothing at all for the suspect threshold), probe answers alone no
  longer end the suspicion: only QUIC does (the shell PINGs at once), so the shell keeps
  duplicating QUIC over the relay meanwhile and data moves (:func:`quiet`);
* if no QUIC came from it for ``data_silence`` seconds while it was selected and its
  probes are answered, the path is *distrusted*: dropped like a dead path and not
  selected again until ``distrust`` seconds passed (doubling each time, up to 8 times
  that), even though it keeps validating. QUIC's keepalive PING (and its ACK) crosses
  an idle working path every 15 s, so the silence is a failure, not idleness.

**A dead path may need a new birthday attempt.** After a NAT reset a symmetric NAT maps
the tunnel to new ports, and only birthday probing finds them again. The manager runs
one attempt at the start; :class:`BirthdayRetry` allows ``retries`` more, each after the
selected path died (if nothing validated by then) and at least ``spacing`` seconds after
the previous one, so the total spray stays bounded (see :mod:`quictun.punch.birthday`
for why it must be).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from .birthday import Birthday, start_attempt
from .probes import CandidateState
from .types import RANK_LAN, Candidate, PathConfig

__all__ = ["BirthdayRetry", "birthday_toward", "check_data", "distrust", "quiet",
           "release_distrust"]

MAX_DISTRUST_FACTOR = 8


def quiet(c: CandidateState, cfg: PathConfig, now: float) -> bool:
    """The selected path is *suspect*: nothing for the suspect threshold, or it went
    quiet and no authenticated QUIC has come from it since (probe answers do not count)."""
    return c.silent(cfg, now) or c.quiet_since is not None


def check_data(c: CandidateState, cfg: PathConfig, now: float) -> bool:
    """Update the selected candidate's quiet spell; True when it must be distrusted now
    (see the module docstring). A path silent in every way is left to the ordinary
    expiry (``dead_after`` without any answer). The manager calls it whenever it runs
    its timers, at least once per heartbeat while a path is selected."""
    silent = c.silent(cfg, now)
    if silent:
        # a spell starts when a path that was alive while selected goes quiet (a newly
        # selected alternate with stale evidence is just waiting for its first answer)
        fresh = c.last_alive is not None and c.selected_at is not None \
            and c.last_alive >= c.selected_at
        if c.quiet_since is None and fresh:
            c.quiet_since = now
    elif c.quiet_since is not None and c.traffic_at is not None and c.traffic_at >= c.quiet_since:
        c.quiet_since = None  # QUIC passes again
    if silent:
        return False
    since = c.traffic_at if c.traffic_at is not None else c.selected_at
    return since is not None and cfg.data_silence > 0 and now - since >= cfg.data_silence


def distrust(c: CandidateState, cfg: PathConfig, now: float) -> None:
    """Keep ``c`` from being selected for a while (longer each time)."""
    factor = min(2 ** c.distrusts, MAX_DISTRUST_FACTOR)
    c.distrusts += 1
    c.distrusted_until = now + cfg.distrust * factor
    c.quiet_since = None


def release_distrust(cands: Iterable[CandidateState], now: float) -> bool:
    """Forgive candidates whose distrust ran out; True if any was (reselect)."""
    freed = False
    for c in cands:
        if c.distrusted_until is not None and now >= c.distrusted_until:
            c.distrusted_until = None
            freed = True
    return freed


class BirthdayRetry:
    """How many more birthday attempts a session may make after its direct path died,
    and when."""

    def __init__(self, retries: int = 2, spacing: float = 30.0) -> None:
        self.left = retries
        self.spacing = spacing
        self._last: float | None = None

    def started(self, now: float) -> None:
        """An attempt started (the first one too): the spacing counts from here."""
        self._last = now

    def next_attempt(self, now: float, delay: float) -> float | None:
        """The selected path died at ``now``: when another attempt may start (``delay``
        from now, and ``spacing`` after the previous attempt), spending one retry; None
        when none is left."""
        if self.left <= 0:
            return None
        self.left -= 1
        last = self._last if self._last is not None else now - self.spacing
        return max(now + delay, last + self.spacing)


def birthday_toward(cands: Iterable[CandidateState], ours: list[Candidate] | None,
                    now: float, cfg: PathConfig, *, multi_socket: bool,
                    random_bytes: Callable[[int], bytes]) -> Birthday | None:
    """The birthday attempt to start now, the first one or a retry (None while any
    candidate is validated): toward the peer's signalled candidates beyond its LAN."""
    cands = list(cands)
    if any(c.validated for c in cands):
        return None
    peer = [Candidate(c.addr, c.kind) for c in cands if c.kind != "prflx" and c.rank > RANK_LAN]
    return start_attempt(peer, ours, now, cfg, multi_socket=multi_socket,
                         random_bytes=random_bytes)
