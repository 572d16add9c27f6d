"""quictun/proto/throttle.py: the online-guess throttle's schedule, decay and bounds."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from quictun.proto.throttle import Policy, Throttle, schedule

DEFAULT = Policy()


def test_the_default_schedule() -> None:
    """5 guesses at once, then waits of 2, 4, 8 ... s; in the long run the decay (one
    failure forgiven per 300 s) holds them near 256-512 s, below the 10-minute cap."""
    times = schedule(DEFAULT, 40)
    assert times[:5] == [0.0] * 5
    gaps = [b - a for a, b in zip(times[4:], times[5:], strict=False)]
    assert gaps[:8] == [2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0]
    assert all(256.0 <= g <= 512.0 <= DEFAULT.cap for g in gaps[8:])
    assert schedule(Policy(forgive=1e9), 20)[-1] - schedule(Policy(forgive=1e9), 19)[-1] \
        == DEFAULT.cap  # without decay the waits reach the cap


def test_sustained_guessing_is_about_one_per_forgive_interval() -> None:
    day = 86_400.0
    times = [t for t in schedule(DEFAULT, 400) if t <= day]
    assert len(times) <= day / DEFAULT.forgive + DEFAULT.free + 20
    late = [t for t in times if t > day / 2]
    assert len(late) <= (day / 2) / DEFAULT.forgive + 2


def test_a_refusal_says_how_long_and_charges_nothing() -> None:
    t = Throttle(Policy(free=2, base=10.0, max_pending=99))
    assert t.admit("home", 0.0).admitted
    t.failed("home", 0.0)
    assert t.admit("home", 0.0).admitted  # the second failure sets a 10 s wait
    t.failed("home", 0.0)
    v = t.admit("home", 5.0)
    assert not v.admitted and v.retry_after == 5.0 and "throttled for 5 s" in v.reason
    assert t.failures("home", 5.0) == 2.0 - 5.0 / 300.0
    assert t.admit("home", 10.0).admitted


def test_failures_decay() -> None:
    t = Throttle(DEFAULT)
    for _ in range(5):
        t.admit("home", 0.0)
        t.failed("home", 0.0)
    assert t.failures("home", 0.0) == 5.0
    assert t.failures("home", 3 * DEFAULT.forgive) == 2.0
    assert t.failures("home", 10 * DEFAULT.forgive) == 0.0
    assert t.prune(10 * DEFAULT.forgive) == 1 and len(t) == 0


def test_a_confirmed_exchange_is_refunded() -> None:
    t = Throttle(DEFAULT)
    for i in range(20):
        assert t.admit("home", float(i)).admitted
        t.succeeded("home", float(i))
    assert t.failures("home", 20.0) == 0.0 and t.retry_after("home", 20.0) == 0.0


def test_reset_clears_a_known_clients_own_key_only() -> None:
    t = Throttle(Policy(free=1, base=60.0))
    assert t.admit(("client", "fp1"), 0.0).admitted
    assert t.admit(("name", "home"), 0.0).admitted
    assert t.retry_after(("client", "fp1"), 0.0) == 60.0
    t.succeeded(("client", "fp1"), 1.0, reset=True)
    t.succeeded(("name", "home"), 1.0)
    assert t.retry_after(("client", "fp1"), 1.0) == 0.0
    assert t.retry_after(("name", "home"), 1.0) == 59.0  # strangers share it: no reset


def test_keys_are_independent() -> None:
    t = Throttle(Policy(free=1, base=60.0))
    assert t.admit(("name", "home"), 0.0).admitted
    assert not t.admit(("name", "home"), 1.0).admitted
    assert t.admit(("client", "known"), 1.0).admitted  # a guesser does not lock it out
    assert t.admit(("name", "other"), 1.0).admitted


def test_exchanges_in_flight_are_bounded() -> None:
    t = Throttle(Policy(free=100, max_pending=2))
    assert t.admit("home", 0.0).admitted and t.admit("home", 0.0).admitted
    v = t.admit("home", 0.0)
    assert not v.admitted and v.retry_after == 0.0 and "in progress" in v.reason
    t.failed("home", 0.1)
    assert t.admit("home", 0.1).admitted


def test_the_number_of_keys_is_bounded() -> None:
    t = Throttle(Policy(free=1, base=60.0, max_keys=3))
    for k in range(3):
        assert t.admit(k, 0.0).admitted
    v = t.admit("one more", 1.0)
    assert not v.admitted and "too many" in v.reason
    for k in range(3):
        t.failed(k, 1.0)
    assert t.admit("one more", 10_000.0).admitted  # the old ones were pruned


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["admit", "ok", "fail"]), st.sampled_from("ab"),
                          st.floats(0, 1000)), max_size=60))
def test_invariants_under_any_sequence(ops: list[tuple[str, str, float]]) -> None:
    t = Throttle(Policy(max_pending=3))
    now = 0.0
    for op, key, dt in ops:
        now += dt
        if op == "admit":
            v = t.admit(key, now)
            assert v.admitted or v.reason
            assert v.retry_after >= 0.0
        elif op == "ok":
            t.succeeded(key, now)
        else:
            t.failed(key, now)
        assert t.failures(key, now) >= 0.0
        assert 0.0 <= t.retry_after(key, now) <= t.policy.cap
