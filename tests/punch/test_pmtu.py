"""quictun.punch.pmtu: the per-path DPLPMTUD state machine, driven by a fake path.

A :class:`FakePath` carries probes up to ``limit`` bytes (bigger ones vanish, as behind
a filtered-ICMP black hole), answers after ``rtt``, and can fall silent.
"""

from __future__ import annotations

import dataclasses

import pytest

from quictun.punch.pmtu import (
    BASE_SIZE,
    PROBE_WAIT,
    STEP,
    TRANSITIONS,
    Outcome,
    Pmtu,
    PmtuConfig,
    State,
    udp_payload_limit,
)


class FakePath:
    """Polls a Pmtu every ``tick`` and answers what fits (no real clock)."""

    def __init__(self, pmtu: Pmtu, limit: int, rtt: float = 0.02, tick: float = 0.01) -> None:
        self.pmtu = pmtu
        self.limit = limit
        self.rtt = rtt
        self.tick = tick
        self.now = 0.0
        self.silent = False  # nothing at all gets through (a dead path)
        self.active = True  # QUIC traffic flows
        self.alive_at: float | None = 0.0
        self.sent: list[tuple[float, int]] = []
        self._answers: list[tuple[float, int]] = []
        self.sizes: list[tuple[float, int]] = []

    def run(self, seconds: float) -> None:
        end = self.now + seconds
        while self.now < end:
            before = self.pmtu.size
            for at, size in [a for a in self._answers if a[0] <= self.now]:
                self._answers.remove((at, size))
                self.pmtu.acked(size, self.now)
            if not self.silent:
                self.alive_at = self.now  # heartbeats / traffic keep arriving
            size = self.pmtu.poll(self.now, rtt=self.rtt, alive_at=self.alive_at,
                                  active=self.active)
            if size is not None:
                self.sent.append((self.now, size))
                if size <= self.limit and not self.silent:
                    self._answers.append((self.now + self.rtt, size))
            if self.pmtu.size != before:
                self.sizes.append((self.now, self.pmtu.size))
            t = self.pmtu.next_time()
            assert t is None or t > self.now - 1e-9 or size is not None, "timer in the past"
            self.now = round(self.now + self.tick, 6)


def settle(limit: int, ceiling: int = 1472, seconds: float = 30.0, **cfg: object) -> FakePath:
    path = FakePath(Pmtu(ceiling, 0.0, PmtuConfig(**cfg)), limit)  # type: ignore[arg-type]
    path.run(seconds)
    return path


# ---------------------------------------------------------------------------- tables
def test_transition_table_is_complete_and_consistent() -> None:
    for (state, outcome), (_next, effect) in TRANSITIONS.items():
        assert isinstance(state, State) and isinstance(outcome, Outcome)
        assert callable(getattr(Pmtu, effect)), effect
    # every state can be left or stays by design; every state has a probe wait
    assert set(PROBE_WAIT) == set(State)
    assert {s for s, _ in TRANSITIONS} == set(State)
    for field in PROBE_WAIT.values():
        assert field == "" or field in {f.name for f in dataclasses.fields(PmtuConfig)}


def test_udp_payload_limit() -> None:
    cfg = PmtuConfig()
    assert udp_payload_limit(1500, False, cfg) == 1472
    assert udp_payload_limit(1500, True, cfg) == 1452
    assert udp_payload_limit(1280, True, cfg) == 1232
    assert udp_payload_limit(None, False, cfg) == 1472  # unknown: Ethernet
    assert udp_payload_limit(65536, False, cfg) == cfg.max_size
    assert udp_payload_limit(576, False, cfg) == BASE_SIZE  # never below QUIC's floor
    assert udp_payload_limit(1499, False, cfg) % STEP == 0


# ---------------------------------------------------------------------------- search
@pytest.mark.parametrize("limit,ceiling", [
    (1472, 1472),  # Ethernet: the first probe (the ceiling) passes
    (1252, 1472),  # IPv4 through a 1280 MTU
    (1232, 1452),  # IPv6 through a 1280 MTU
    (1400, 1472),
    (8972, 8972),  # jumbo frames
    (16380, 16380),
])
def test_search_finds_the_path_limit(limit: int, ceiling: int) -> None:
    path = settle(limit, ceiling)
    p = path.pmtu
    assert p.state is State.COMPLETE
    assert p.size <= limit  # never more than the path carries
    assert limit - p.size < PmtuConfig().granularity  # and close to it
    assert all(size <= limit for _t, size in path.sizes)  # not even for a moment


def test_a_clean_path_needs_only_two_probes() -> None:
    path = settle(1472)
    assert [s for _t, s in path.sent[:2]] == [BASE_SIZE, 1472]
    assert path.pmtu.probes_lost == 0
    assert path.sizes[0][1] == 1472 and path.sizes[0][0] < 0.1


def test_size_grows_only_on_proof() -> None:
    path = FakePath(Pmtu(1472, 0.0), 1252)
    path.run(0.5)
    assert path.pmtu.size == BASE_SIZE  # the ceiling was tried and lost: still 1200
    assert path.pmtu.probes_lost >= 1


def test_path_that_cannot_carry_base_is_error_then_retried() -> None:
    cfg = PmtuConfig(error_retry=5.0)
    path = FakePath(Pmtu(1472, 0.0, cfg), 1100)
    path.run(3.0)
    p = path.pmtu
    assert p.state is State.ERROR and not p.usable
    assert [s for _t, s in path.sent] == [BASE_SIZE] * cfg.max_probes
    path.limit = 1472  # the path got better
    path.run(6.0)
    assert p.state is State.COMPLETE and p.usable and p.size == 1472


# ---------------------------------------------------------------------------- black holes
def test_black_hole_falls_back_to_base_then_searches_again() -> None:
    cfg = PmtuConfig(confirm_interval=2.0)
    path = FakePath(Pmtu(1472, 0.0, cfg), 1472)
    path.run(5.0)
    assert path.pmtu.size == 1472
    path.limit = 1252  # the route changed; ICMP filtered
    changed_at = path.now
    path.run(3 * cfg.timeout_max + cfg.confirm_interval)
    assert path.pmtu.black_holes == 1
    assert any(size == BASE_SIZE and t > changed_at for t, size in path.sizes)
    path.run(20.0)
    assert path.pmtu.state is State.COMPLETE
    assert 1252 - PmtuConfig().granularity < path.pmtu.size <= 1252


def test_no_confirmations_while_idle() -> None:
    cfg = PmtuConfig(confirm_interval=1.0)
    path = FakePath(Pmtu(1472, 0.0, cfg), 1472)
    path.run(1.0)
    path.active = False
    n = len(path.sent)
    path.run(30.0)
    assert len(path.sent) == n
    path.active = True
    path.run(1.5)
    assert len(path.sent) > n


def test_quic_stall_hint_confirms_at_once() -> None:
    cfg = PmtuConfig(confirm_interval=60.0)
    path = FakePath(Pmtu(1472, 0.0, cfg), 1472)
    path.run(2.0)
    path.limit = 1252
    path.pmtu.confirm_soon()
    path.run(cfg.max_probes * cfg.timeout_min + 0.2)  # short RTT: timeouts at the minimum
    assert path.pmtu.black_holes == 1 and path.pmtu.size == BASE_SIZE


def test_silent_path_is_not_evidence_about_size() -> None:
    path = FakePath(Pmtu(1472, 0.0), 1472)
    path.silent = True  # nothing comes back at all: the path is dead, not too small
    path.run(20.0)
    p = path.pmtu
    assert p.probes_lost == 0 and p.state is State.BASE
    assert len(path.sent) == 1  # one probe waits for a sign of life, no spinning
    assert p.next_time() is None
    path.silent = False
    path.run(5.0)
    assert p.state is State.COMPLETE and p.size == 1472


def test_raise_timer_searches_above_again() -> None:
    cfg = PmtuConfig(raise_interval=50.0)
    path = FakePath(Pmtu(1472, 0.0, cfg), 1252)
    path.run(20.0)
    assert path.pmtu.size < 1472
    path.limit = 1472  # the path grew
    path.run(60.0)
    assert path.pmtu.size == 1472


# ---------------------------------------------------------------------------- local refusals
def test_too_big_from_the_local_stack() -> None:
    p = Pmtu(1472, 0.0)
    assert p.poll(0.0, rtt=0.01, alive_at=0.0, active=True) == BASE_SIZE
    p.acked(BASE_SIZE, 0.01)
    assert p.poll(0.01, rtt=0.01, alive_at=0.01, active=True) == 1472
    p.too_big(1472, 0.01)  # EMSGSIZE: the interface is smaller
    assert p.ceiling < 1472
    size = p.poll(0.01, rtt=0.01, alive_at=0.01, active=True)
    assert size is not None and size < 1472  # no waiting for timeouts


def test_too_big_at_the_current_size_falls_back() -> None:
    path = FakePath(Pmtu(1472, 0.0), 1472)
    path.run(1.0)
    assert path.pmtu.size == 1472
    path.pmtu.too_big(1400, path.now)  # e.g. the interface MTU was lowered
    assert path.pmtu.size == BASE_SIZE and path.pmtu.ceiling <= 1396
    path.limit = 1396
    path.run(20.0)
    assert 1396 - 16 < path.pmtu.size <= 1396


def test_base_must_be_sane() -> None:
    with pytest.raises(ValueError):
        Pmtu(1472, 0.0, PmtuConfig(base=1000))
    with pytest.raises(ValueError):
        Pmtu(1472, 0.0, PmtuConfig(base=1202))


def test_pause_forgets_the_probe_in_flight_and_reconfirms() -> None:
    path = FakePath(Pmtu(1472, 0.0), 1472)
    path.run(1.0)
    p = path.pmtu
    assert p.state is State.COMPLETE and p.size == 1472
    p.pause(path.now)
    assert p.next_time() is not None or p.state is State.COMPLETE
    size = p.poll(path.now, rtt=0.02, alive_at=path.now, active=False)
    assert size == 1472  # back in use: the proven size is confirmed first
    lost_before = p.probes_lost
    p.pause(path.now + 0.01)  # deselected again with that probe in flight
    path.run(10.0)
    assert p.probes_lost == lost_before  # the abandoned probe never counted as lost
