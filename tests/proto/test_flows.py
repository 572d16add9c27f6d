"""UDP flows: one per source address, queued while opening, expired when idle."""

from __future__ import annotations

from quictun.proto.flows import OPEN, REFUSED, Flow, FlowStats, FlowTable


def test_one_flow_per_source_and_the_limit() -> None:
    t = FlowTable(idle_timeout=30, max_flows=2)
    a = t.add(("127.0.0.1", 1000), 0.0)
    assert a is not None and t.add(("127.0.0.1", 1000), 1.0) is a
    assert t.add(("127.0.0.1", 1001), 0.0) is not None
    assert t.add(("127.0.0.1", 1002), 0.0) is None
    assert len(t) == 2


def test_queue_while_opening_then_flush() -> None:
    f = Flow("k", 0.0)
    assert f.hold(b"1", 2) and f.hold(b"2", 2) and not f.hold(b"3", 2)
    assert f.stats.dropped_queue == 1
    assert f.opened(7) == [b"1", b"2"]
    assert f.state == OPEN and f.flow_id == 7 and f.queue == []


def test_refused_flow_counts_its_queue() -> None:
    f = Flow("k", 0.0)
    f.hold(b"x", 4)
    f.refused()
    assert f.state == REFUSED and f.stats.dropped_refused == 1


def test_idle_expiry_and_timer() -> None:
    t = FlowTable(idle_timeout=10, max_flows=8)
    assert t.get_timer() is None
    a, b = t.add("a", 0.0), t.add("b", 5.0)
    assert a is not None and b is not None
    assert t.get_timer() == 10.0
    t.touch(a, 8.0)
    assert t.expire(12.0) == []
    assert t.get_timer() == 15.0
    assert [f.key for f in t.expire(15.0)] == ["b"]
    assert [f.key for f in t.expire(18.0)] == ["a"]
    assert len(t) == 0


def test_stats_add() -> None:
    s = FlowStats(datagrams_in=1, dropped_too_big=2)
    s.add(FlowStats(datagrams_in=2, dropped_queue=1))
    assert (s.datagrams_in, s.dropped) == (3, 3)
