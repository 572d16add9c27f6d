"""When the path manager asks the shell to re-learn our candidates (GatherWanted)."""

from __future__ import annotations

import os

from quictun.proto import stun
from quictun.punch import Candidate, GatherWanted, PathConfig, PathManager, SuspectChanged
from quictun.punch.gather import FIRST_DELAY, RETRY_DELAYS, GatherSchedule

PEER = ("203.0.113.2", 4000)


def test_schedule_retries_until_satisfied() -> None:
    g = GatherSchedule()
    g.trigger(0.0, delay=1.0)
    g.trigger(0.0)  # ignored: one is active
    assert g.next_time == 1.0 and not g.due(0.5, satisfied=False)
    assert g.due(1.0, satisfied=False)
    assert g.next_time is None
    g.done(2.0)
    assert g.next_time == 2.0 + RETRY_DELAYS[0]
    assert not g.due(4.0, satisfied=True)  # direct again: the schedule ends
    assert g.next_time is None
    g.trigger(10.0)
    assert g.next_time == 10.0  # a new trigger starts a new schedule


def test_schedule_gives_up_after_the_last_retry() -> None:
    g = GatherSchedule(retry_delays=(1.0,))
    g.trigger(0.0)
    assert g.due(0.0, satisfied=False)
    g.done(0.0)
    assert g.due(1.0, satisfied=False)
    g.done(1.0)
    assert g.next_time is None


def manager(regather: bool = True) -> PathManager:
    return PathManager(local_key=b"l" * 32, remote_key=b"r" * 32, local_networks=[],
                       config=PathConfig(relay_after=0.0), random_bytes=os.urandom,
                       regather=regather)


def events(pm: PathManager, now: float) -> list[object]:
    pm.datagrams_to_send_slots(now)
    out = []
    while (e := pm.next_event()) is not None:
        out.append(e)
    return out


def test_starting_on_the_relay_asks_after_the_first_delay() -> None:
    pm = manager()
    pm.start(0.0)
    assert not any(isinstance(e, GatherWanted) for e in events(pm, 0.0))
    assert pm.get_timer() is not None and pm.get_timer() <= FIRST_DELAY
    assert any(isinstance(e, GatherWanted) for e in events(pm, FIRST_DELAY))
    pm.gathered(FIRST_DELAY + 0.1)  # the shell reports back; the next retry is scheduled
    assert not any(isinstance(e, GatherWanted) for e in events(pm, FIRST_DELAY + 0.2))
    assert any(isinstance(e, GatherWanted)
               for e in events(pm, FIRST_DELAY + 0.1 + RETRY_DELAYS[0]))


def test_without_regather_nothing_is_asked() -> None:
    pm = manager(regather=False)
    pm.start(0.0)
    assert not any(isinstance(e, GatherWanted) for t in (0.0, 1.0, 5.0, 30.0)
                   for e in events(pm, t))


def _validate(pm: PathManager, now: float) -> None:
    """Answer the manager's next probe to PEER, signed by the peer (validates it)."""
    for data, addr, _ttl, _slot in pm.datagrams_to_send_slots(now):
        if addr == PEER and stun.is_stun(data):
            msg = stun.decode(data)
            pm.receive_stun(stun.binding_success(msg.txid, ("198.18.0.11", 5), key=b"r" * 32),
                            PEER, now)
            return
    raise AssertionError("no probe to the peer")


def test_a_direct_path_that_goes_quiet_is_suspect_and_asks_at_once() -> None:
    pm = manager()
    pm.add_remote_candidates([Candidate(PEER, "srflx")], 0.0)
    pm.start(0.0)
    _validate(pm, 0.0)
    evs = events(pm, 0.01)
    assert pm.current is not None and pm.current.kind == "direct"
    assert not any(isinstance(e, SuspectChanged) for e in evs)
    # nothing answers any more: past 1.5 heartbeats the path is suspect
    t, seen = 0.0, []
    while t < 4.0:
        t += 0.25
        seen += events(pm, t)
    assert SuspectChanged(True) in seen
    assert any(isinstance(e, GatherWanted) for e in seen)
