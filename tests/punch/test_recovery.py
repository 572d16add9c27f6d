"""The path manager after a direct path stops carrying data (quictun.punch.recovery),
through the NAT simulator: a path that answers probes but carries no QUIC is distrusted,
suspicion ends only with QUIC, and a symmetric NAT that moved the tunnel to new ports gets
a new birthday attempt."""

from __future__ import annotations

from natsim import Network, Sim, make_site
from test_manager import kinds, nat_of, pair_sim

from quictun.punch import PathConfig
from quictun.punch.probes import CandidateState
from quictun.punch.recovery import BirthdayRetry, check_data, quiet


def test_a_path_that_answers_probes_but_carries_no_quic_is_distrusted() -> None:
    """A middlebox passes the small signed probes and drops QUIC: the path still
    validates and answers every heartbeat, but no data crosses it. Both ends leave it
    for the relay, and do not go back to it while it is distrusted."""
    cfg = PathConfig()
    sim, a, b = pair_sim("port-restricted-cone", "port-restricted-cone", config=cfg)
    sim.connect()
    sim.run_for(10.0)
    assert kinds(a) == kinds(b) == ["relay", "direct"]
    nat_of(a).drop_quic = True
    sim.run_for(cfg.data_silence + 5.0)
    for peer in (a, b):
        assert kinds(peer) == ["relay", "direct", "relay"], kinds(peer)
        assert peer.pm.stats()["paths_distrusted"] == 1
    # the pair validates again (probes pass) but is not selected while distrusted
    sim.run_for(cfg.distrust / 2)
    for peer in (a, b):
        assert peer.pm.current is not None and peer.pm.current.kind == "relay"
        assert peer.pm.stats()["validated"], "probes still pass: it validated again"


def test_quic_from_the_path_keeps_it_trusted() -> None:
    """An idle tunnel still sends QUIC keepalives (and their ACKs) every 15 s: an hour
    on one direct path, never distrusted."""
    sim, a, b = pair_sim("port-restricted-cone", "full-cone")
    sim.connect()
    sim.run_for(3600.0)
    for peer in (a, b):
        assert kinds(peer) == ["relay", "direct"]
        assert peer.pm.stats()["paths_distrusted"] == 0


def test_without_any_quic_even_a_working_path_is_distrusted() -> None:
    """The rule's premise, checked: no QUIC at all (no keepalive) for data_silence while
    probes are answered is exactly what distrusts a path."""
    net = Network(seed=3)
    (host_a,) = make_site(net, "a", "port-restricted-cone", index=1)
    (host_b,) = make_site(net, "b", "port-restricted-cone", index=2)
    sim = Sim(net, keepalive=None)
    a = sim.add_peer("a", host_a)
    sim.add_peer("b", host_b)
    sim.connect()
    sim.run_for(PathConfig().data_silence - 2.0)
    assert a.pm.stats()["paths_distrusted"] == 0
    sim.run_for(10.0)
    assert a.pm.stats()["paths_distrusted"] == 1


def test_a_quiet_spell_ends_with_quic_not_with_probe_answers() -> None:
    cfg = PathConfig()
    c = CandidateState(("203.0.113.9", 4000), "srflx", 4, validated=True)
    c.selected_at = c.last_alive = c.traffic_at = 0.0
    assert not check_data(c, cfg, 1.0) and not quiet(c, cfg, 1.0)
    check_data(c, cfg, 4.0)  # nothing for 1.5 heartbeats: a quiet spell starts
    assert quiet(c, cfg, 4.0) and c.quiet_since == 4.0
    c.last_alive = 4.5  # a probe answer: not enough
    check_data(c, cfg, 4.6)
    assert quiet(c, cfg, 4.6)
    c.last_alive = c.traffic_at = 5.0  # authenticated QUIC from the path
    check_data(c, cfg, 5.1)
    assert not quiet(c, cfg, 5.1)


def test_birthday_retries_are_bounded_and_spaced() -> None:
    retry = BirthdayRetry(retries=2, spacing=60.0)
    retry.started(0.0)
    assert retry.next_attempt(10.0, 3.0) == 60.0  # not before the spacing
    retry.started(60.0)
    assert retry.next_attempt(200.0, 3.0) == 203.0  # long after: the usual delay
    retry.started(203.0)
    assert retry.next_attempt(1000.0, 3.0) is None  # spent


def test_symmetric_nat_that_moved_gets_a_new_birthday_attempt() -> None:
    """A symmetric NAT forgets its mappings (a router reboot): the direct pair found by
    birthday probing dies, the candidates go in-band again, and a second birthday
    attempt finds a new pair: direct again instead of relayed for good."""
    sim, a, b = pair_sim("symmetric", "port-restricted-cone", seed=4)
    sim.regather_on_fallback = True  # the shell re-sends candidates after a fallback
    sim.connect()
    sim.run_for(30.0)
    assert kinds(a)[-1] == kinds(b)[-1] == "direct", (kinds(a), kinds(b))
    first = a.pm.stats()["birthday_probes"] + b.pm.stats()["birthday_probes"]
    nat_of(a).rebind()  # soon after the first attempt: the retry waits for the spacing
    sim.run_for(90.0)
    for peer in (a, b):
        assert peer.pm.stats()["paths_died"] >= 1
        assert kinds(peer)[-1] == "direct", kinds(peer)
    assert a.pm.stats()["birthday_probes"] + b.pm.stats()["birthday_probes"] > first
