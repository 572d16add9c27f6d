"""Tests for quictun.punch.manager: the NAT grid through natsim, selection rules, and attacks."""

from __future__ import annotations

import ipaddress
import itertools
import random
from typing import Any

import pytest
from natsim import NAT_TYPES, Host, Nat, NatType, Network, Peer, Sim, make_site

from quictun.proto import stun
from quictun.punch import (
    MAX_CANDIDATES,
    MAX_PRFLX,
    MAX_TRANSACTIONS,
    RANK_HOST_IPV4,
    RANK_IPV6,
    RANK_LAN,
    RANK_REFLEXIVE,
    Addr,
    Candidate,
    NetPath,
    PathChanged,
    PathConfig,
    PathManager,
    PunchFailed,
)

# ---------------------------------------------------------------------------- helpers

# A symmetric NAT facing an address-and-port-dependent filter (port-restricted cone, or a
# translation-less stateful firewall) cannot be punched naively: the filter never learns
# the symmetric side's per-destination port. Birthday probing finds one (quictun.punch.birthday).
BIRTHDAY = {("symmetric", "port-restricted-cone"), ("symmetric", "firewall")}
HARD = {("symmetric", "symmetric")} | BIRTHDAY


def expected_direct(a: str, b: str) -> bool:
    if "udp-blocked" in (a, b):
        return False
    return (a, b) not in HARD and (b, a) not in HARD


def needs_birthday(a: str, b: str) -> bool:
    return (a, b) in BIRTHDAY or (b, a) in BIRTHDAY


def pair_sim(
    type_a: str,
    type_b: str,
    *,
    mode: str = "auto",
    relay_up: bool = True,
    config: PathConfig | None = None,
    seed: int = 1,
    timeout: float = 30.0,
    loss: float = 0.0,
    jitter: float = 0.0,
) -> tuple[Sim, Peer, Peer]:
    net = Network(seed=seed, loss=loss, jitter=jitter)
    (host_a,) = make_site(net, "a", type_a, index=1, timeout=timeout)
    (host_b,) = make_site(net, "b", type_b, index=2, timeout=timeout)
    sim = Sim(net, relay_up=relay_up)
    a = sim.add_peer("a", host_a, mode=mode, config=config)
    b = sim.add_peer("b", host_b, mode=mode, config=config)
    return sim, a, b


def kinds(peer: Peer) -> list[str | None]:
    return [None if p is None else p.kind for p in peer.changes()]


def remotes(peer: Peer) -> list[Addr | None]:
    return [None if p is None else p.remote for p in peer.changes()]


def nat_of(peer: Peer) -> Nat:
    assert peer.host.nat is not None
    return peer.host.nat


KEY_L, KEY_R = b"local-key", b"remote-key"


def manual_pm(**kwargs: object) -> PathManager:
    """A PathManager driven by hand (no natsim); keys KEY_L / KEY_R."""
    rng = random.Random(7)
    return PathManager(
        local_key=KEY_L,
        remote_key=KEY_R,
        local_networks=[ipaddress.ip_network("10.0.0.0/24")],
        random_bytes=rng.randbytes,
        **kwargs,  # type: ignore[arg-type]
    )


def probes(out: list[tuple[bytes, Addr]]) -> list[tuple[bytes, Addr]]:
    return [(d, a) for d, a in out if stun.decode(d).msg_type == stun.BINDING_REQUEST]


def answer(data: bytes, mapped: Addr = ("192.0.2.9", 1234), key: bytes = KEY_R) -> bytes:
    """The peer's signed response to our probe ``data``."""
    return stun.binding_success(stun.decode(data).txid, mapped, key=key)


def drain(pm: PathManager, *, all_events: bool = False) -> list[Any]:
    """The path events (PathChanged, PunchFailed) emitted so far; ``all_events``: also
    SuspectChanged and GatherWanted."""
    events = []
    while (e := pm.next_event()) is not None:
        if all_events or isinstance(e, PathChanged | PunchFailed):
            events.append(e)
    return events


# ---------------------------------------------------------------------------- candidates


def test_candidate_round_trip() -> None:
    for text in ("host 198.19.1.2 40000", "srflx 2001:db8::1 5000", "prflx 10.0.0.1 1"):
        assert Candidate.decode(text).encode() == text
    assert Candidate(("::ffff:192.0.2.1", 7, 0, 0), "srflx").addr == ("192.0.2.1", 7)


@pytest.mark.parametrize(
    "text",
    [
        "",
        "host",
        "host 1.2.3.4",
        "host 1.2.3.4 80 extra",
        "relay 1.2.3.4 80",
        "host 1.2.3.4 0",
        "host 1.2.3.4 65536",
        "host 1.2.3.4 +80",
        "host 1.2.3.4 ８０",
        "host  1.2.3.4 80",
        "host not-an-ip 80",
        "host 0.0.0.0 80",
        "host 224.0.0.1 80",
        "host 1.2.3.4 " + "9" * 200,
    ],
)
def test_candidate_decode_rejects_garbage(text: str) -> None:
    with pytest.raises(ValueError):
        Candidate.decode(text)


# ---------------------------------------------------------------------------- the NAT grid

GRID = list(itertools.product(NAT_TYPES, repeat=2))


@pytest.mark.parametrize(("type_a", "type_b"), GRID, ids=[f"{a}~{b}" for a, b in GRID])
def test_grid_auto(type_a: str, type_b: str) -> None:
    sim, a, b = pair_sim(type_a, type_b)
    sim.connect()
    sim.run_for(20.0)
    if needs_birthday(type_a, type_b):
        for peer in (a, b):
            assert kinds(peer) == ["relay", "direct"], peer.changes()
            first_direct = [t for t, e in peer.events if isinstance(e, PathChanged)][1]
            assert START + 3.0 < first_direct < START + 3.0 + 15.0
        assert {a.pm.birthday_role, b.pm.birthday_role} == {"easy", "hard"}
        assert a.pm.current is not None and b.pm.current is not None
        assert a.pm.current.local == b.pm.current.remote
        assert b.pm.current.local == a.pm.current.remote
        assert a.pm.aux_slots() | b.pm.aux_slots() == {(a.pm.current.slot or b.pm.current.slot)}
    elif expected_direct(type_a, type_b):
        for peer in (a, b):
            assert kinds(peer) == ["relay", "direct"], peer.changes()
            first_direct = [t for t, e in peer.events if isinstance(e, PathChanged)][1]
            assert first_direct < sim.net.now - 18.0  # well within the punch window
        # each side sends to the address the other one's packets come from
        assert a.pm.current is not None and b.pm.current is not None
        assert a.pm.current.local == b.pm.current.remote
        assert b.pm.current.local == a.pm.current.remote
    else:
        assert kinds(a) == kinds(b) == ["relay"]
        assert a.pm.stats()["validated"] == b.pm.stats()["validated"] == []
    assert not a.failures() and not b.failures()


@pytest.mark.parametrize(("type_a", "type_b"), GRID, ids=[f"{a}~{b}" for a, b in GRID])
def test_grid_direct_mode(type_a: str, type_b: str) -> None:
    sim, a, b = pair_sim(type_a, type_b, mode="direct")
    sim.connect()
    sim.run_for(20.0)
    for peer in (a, b):
        if expected_direct(type_a, type_b) or needs_birthday(type_a, type_b):
            assert kinds(peer) == ["direct"]
            assert not peer.failures()
        else:
            assert kinds(peer) == []
            assert len(peer.failures()) == 1
            (when,) = [t for t, e in peer.events if isinstance(e, PunchFailed)]
            # a birthday attempt (bounded, maybe useless) moves the verdict to its end
            limit = START + 3.0 + 15.0 if peer.pm.birthday_role else START + 6.0
            assert when == pytest.approx(limit)
        assert peer.pm.stats()["relay_traffic"] == 0


START = 0.5  # Sim.connect gathers for 0.5 s, then starts both peers


def test_symmetric_to_cone_uses_prflx() -> None:
    sim, a, b = pair_sim("symmetric", "full-cone")
    sim.connect()
    sim.run_for(5.0)
    assert b.pm.stats()["prflx_learned"] >= 1
    assert b.pm.current is not None and b.pm.current.remote != a.srflx  # not the STUN port
    assert b.pm.current.rank == RANK_REFLEXIVE


def test_auto_without_relay_fails_like_direct() -> None:
    sim, a, b = pair_sim("symmetric", "symmetric", relay_up=False)
    sim.connect()
    sim.run_for(10.0)
    assert kinds(a) == [] and len(a.failures()) == 1
    sim.set_relay(True)
    assert kinds(a) == ["relay"]


def test_relay_after_delays_relay() -> None:
    cfg = PathConfig(relay_after=3.0)
    sim, a, b = pair_sim("udp-blocked", "full-cone", config=cfg)
    sim.connect()
    sim.run_for(10.0)
    assert kinds(a) == ["relay"]
    assert a.events[0][0] == pytest.approx(0.5 + 3.0)


# ---------------------------------------------------------------------------- ranking


def test_same_lan_picks_lan_pair_over_hairpin() -> None:
    net = Network(seed=2)
    host_a, host_b = make_site(net, "h", "port-restricted-cone", index=1, hosts=2, hairpin=True)
    sim = Sim(net)
    a = sim.add_peer("a", host_a)
    b = sim.add_peer("b", host_b, port=40001)
    sim.connect()
    sim.run_for(15.0)
    for peer, other in ((a, b), (b, a)):
        assert peer.pm.current is not None
        assert peer.pm.current.rank == RANK_LAN
        assert peer.pm.current.remote == other.addr
        # the reflexive (hairpin) pair works too, and stays known as an alternate
        assert other.srflx in peer.pm.stats()["validated"]
        assert kinds(peer) == ["relay", "direct"]


def test_ipv6_preferred_over_reflexive_ipv4() -> None:
    net = Network(seed=3)
    fw_a = Nat(net, NAT_TYPES["firewall"], None)
    fw_b = Nat(net, NAT_TYPES["firewall"], None)
    nat_a = Nat(net, NAT_TYPES["full-cone"], "203.0.113.1")
    nat_b = Nat(net, NAT_TYPES["port-restricted-cone"], "203.0.113.2")
    host_a = Host(net, "a", "10.1.0.2", nat_a, ip6="2001:db8:a::2", nat6=fw_a)
    host_b = Host(net, "b", "10.2.0.2", nat_b, ip6="2001:db8:b::2", nat6=fw_b)
    sim = Sim(net)
    a = sim.add_peer("a", host_a)
    b = sim.add_peer("b", host_b)
    sim.connect()
    sim.run_for(10.0)
    for peer, other in ((a, b), (b, a)):
        assert peer.pm.current is not None
        assert peer.pm.current.rank == RANK_IPV6
        assert peer.pm.current.remote == (other.host.ip6, other.port)
        assert other.srflx in peer.pm.stats()["validated"]
        assert kinds(peer)[-1] == "direct"
        assert len(kinds(peer)) <= 3  # relay, (maybe reflexive first), IPv6


def test_bad_mode_rejected() -> None:
    with pytest.raises(ValueError):
        manual_pm(mode="sometimes")


def test_rank_rules() -> None:
    pm = manual_pm()
    pm.add_remote_candidates(
        [
            Candidate(("10.0.0.5", 1), "host"),  # inside local_networks
            Candidate(("127.0.0.1", 1), "host"),  # loopback
            Candidate(("fe80::1", 1), "host"),  # link-local
            Candidate(("2001:db8::1", 1), "host"),
            Candidate(("2001:db8::2", 1), "srflx"),
            Candidate(("198.51.100.7", 1), "host"),
            Candidate(("198.51.100.8", 1), "srflx"),
        ],
        0.0,
    )
    ranks = {c.addr[0]: c.rank for c in pm._cands.values()}
    assert ranks == {
        "10.0.0.5": RANK_LAN,
        "127.0.0.1": RANK_LAN,
        "fe80::1": RANK_LAN,
        "2001:db8::1": RANK_IPV6,
        "2001:db8::2": RANK_IPV6,
        "198.51.100.7": RANK_HOST_IPV4,
        "198.51.100.8": RANK_REFLEXIVE,
    }


# ---------------------------------------------------------------------------- spoofing


def started_manual(**kwargs: object) -> tuple[PathManager, list[tuple[bytes, Addr]]]:
    pm = manual_pm(**kwargs)
    pm.add_remote_candidates([Candidate(("198.51.100.7", 4000), "srflx")], 0.0)
    pm.start(0.0)
    out = pm.datagrams_to_send(0.0)
    assert [a for _, a in probes(out)] == [("198.51.100.7", 4000)]
    return pm, out


def test_spoofed_probes_change_nothing() -> None:
    pm, out = started_manual()
    ((probe, dest),) = out
    drain(pm)
    before = pm.current
    stranger = ("192.0.2.66", 6666)
    attacks = [
        (answer(probe, key=b"wrong"), dest),  # wrong key
        (answer(probe), stranger),  # right response, from an address we never sent to
        (stun.binding_success(b"x" * 12, ("1.2.3.4", 5), key=KEY_R), dest),  # unknown txid
        (stun.binding_request(b"y" * 12, key=b"wrong"), stranger),  # unsigned-for-us request
        (stun.binding_request(b"z" * 12), stranger),  # no integrity at all
        (b"\x00\x01garbage" + bytes(30), dest),  # malformed
        (stun.binding_success(b"w" * 12, ("1.2.3.4", 5)), dest),  # unsigned response
    ]
    for data, src in attacks:
        pm.receive_stun(data, src, 0.01)
    assert pm.datagrams_to_send(0.01) == []  # nothing answered, no triggered check
    assert drain(pm) == [] and pm.current == before
    stats = pm.stats()
    assert stats["invalid_dropped"] == len(attacks)
    assert stats["validated"] == [] and stats["candidates"] == 1
    # the genuine response still works afterwards
    pm.receive_stun(answer(probe), dest, 0.02)
    assert pm.current is not None and pm.current.remote == dest
    assert pm.current.rtt == pytest.approx(0.02)
    # and a replay of it does nothing (txid consumed)
    pm.receive_stun(answer(probe), dest, 0.03)
    assert pm.stats()["invalid_dropped"] == len(attacks) + 1


def test_valid_request_is_answered_before_start_and_learns_prflx() -> None:
    pm = manual_pm()
    src = ("::ffff:192.0.2.5", 7000)
    request = stun.binding_request(b"q" * 12, key=KEY_L)
    pm.receive_stun(request, src, 0.0)
    out = pm.datagrams_to_send(0.0)
    resp = [(d, a) for d, a in out if stun.decode(d).msg_type == stun.BINDING_SUCCESS]
    assert len(resp) == 1
    data, dest = resp[0]
    assert dest == ("192.0.2.5", 7000)  # normalised
    assert stun.verify_integrity(data, KEY_L)
    assert stun.decode(data).xor_mapped_address == ("192.0.2.5", 7000)
    assert [a for _, a in probes(out)] == [("192.0.2.5", 7000)]  # triggered check
    assert pm.stats()["prflx_learned"] == 1
    assert drain(pm) == []  # no selection before start()


def test_fresh_validation_needed_after_fallback() -> None:
    cfg = PathConfig()
    pm, out = started_manual(config=cfg)
    ((probe, dest),) = out
    pm.receive_stun(answer(probe), dest, 0.02)
    assert [e.path.kind for e in drain(pm)] == ["relay", "direct"]  # type: ignore[union-attr]
    held: list[bytes] = []
    t = 0.02
    while True:
        timer = pm.get_timer()
        assert timer is not None and timer < 30
        t = timer
        pm.handle_timer(t)
        sent = [d for d, _ in probes(pm.datagrams_to_send(t))]
        if pm.current is None or pm.current.kind != "direct":
            break
        held += sent
    assert len(held) >= 3
    assert t == pytest.approx(0.02 + cfg.dead_after)
    assert [e.path for e in drain(pm)] == [NetPath("relay", None, None, None, 9)]  # type: ignore[union-attr]
    # responses to probes sent before the fallback no longer count
    for data in held:
        pm.receive_stun(answer(data), dest, t + 0.01)
    assert pm.current is not None and pm.current.kind == "relay" and drain(pm) == []
    # re-punching started; a response to a new probe validates again
    assert sent  # the re-punch burst started at the fallback
    pm.receive_stun(answer(sent[0]), dest, t + 0.05)
    assert [e.path.kind for e in drain(pm)] == ["direct"]  # type: ignore[union-attr]


# ---------------------------------------------------------------------------- keepalive


@pytest.mark.parametrize("heartbeat", [2.0, 10.0])
def test_short_mapping_timeout_idle_minute(heartbeat: float) -> None:
    cfg = PathConfig(heartbeat=heartbeat)
    sim, a, b = pair_sim("port-restricted-cone", "port-restricted-cone", timeout=5.0, config=cfg)
    sim.connect()
    sim.run_for(60.0)
    if heartbeat < 5.0:
        assert kinds(a) == kinds(b) == ["relay", "direct"]
        got = (a.quic_received_direct, b.quic_received_direct)
        a.send_quic()
        b.send_quic()
        sim.run_for(0.1)
        assert (a.quic_received_direct, b.quic_received_direct) == (got[0] + 1, got[1] + 1)
        # one mapping per NAT, made by the reflector query and kept alive by heartbeats
        assert nat_of(a).mappings_created == nat_of(b).mappings_created == 1
    else:  # control: heartbeats slower than the NAT timeout let the mappings expire
        assert nat_of(a).mappings_created > 1 and nat_of(b).mappings_created > 1


def test_quic_traffic_counts_as_liveness() -> None:
    sim, a, b = pair_sim("full-cone", "full-cone")
    sim.connect()
    sim.run_for(7.0)  # past the punch window (the private host candidate is probed till 6.5)
    sent = a.pm.stats()["probes_sent"]
    sim.start_traffic(0.5)
    sim.run_for(30.0)
    assert kinds(a) == ["relay", "direct"]
    assert a.quic_received_direct > 50
    assert a.pm.stats()["probes_sent"] - sent <= 30 / 2.0 + 2  # heartbeats only


# ---------------------------------------------------------------------------- rebinding


def test_rebinding_moves_straight_to_new_prflx_pair() -> None:
    sim, a, b = pair_sim("port-restricted-cone", "full-cone")
    sim.connect()
    sim.start_traffic(0.5)
    sim.run_for(5.0)
    old = b.pm.current
    assert old is not None and old.kind == "direct"
    nat_of(a).rebind()
    sim.run_for(20.0)
    assert kinds(a) == ["relay", "direct"]  # a's path to b never broke
    assert kinds(b) == ["relay", "direct", "direct"]
    new = b.pm.current
    assert new is not None and new.remote != old.remote and new.remote[0] == old.remote[0]
    # b moved as soon as the old pair was silent and the new one answered, before the
    # old one was declared dead (dead_after)
    assert b.pm.stats()["paths_died"] == 0
    received = a.quic_received_direct
    sim.run_for(5.0)
    assert a.quic_received_direct >= received + 9


def test_rebinding_falls_back_to_relay_and_returns() -> None:
    sim, a, b = pair_sim("full-cone", "port-restricted-cone")
    sim.regather_on_fallback = True  # the shell re-sends candidates after a fallback
    sim.connect()
    sim.run_for(5.0)
    nat_of(a).rebind()
    sim.run_for(30.0)
    for peer in (a, b):
        assert kinds(peer) == ["relay", "direct", "relay", "direct"]
        assert peer.pm.stats()["paths_died"] == 1
    times = [t for t, e in a.events if isinstance(e, PathChanged)]
    assert times[2] - 5.5 < 8.0  # dead within dead_after (+ heartbeat phase)
    assert times[3] - times[2] < 1.0  # back as soon as the new candidates arrive
    assert remotes(b)[3] != remotes(b)[1]


# ---------------------------------------------------------------------------- stability


@pytest.mark.parametrize("pair", [("port-restricted-cone", "full-cone"), ("firewall", "firewall")])
def test_no_flapping_with_loss_and_jitter(pair: tuple[str, str]) -> None:
    sim, a, b = pair_sim(*pair, loss=0.10, jitter=0.03, seed=11)
    sim.connect()
    sim.start_traffic(1.0)
    sim.run_for(600.0)
    assert kinds(a) == kinds(b) == ["relay", "direct"]
    assert a.pm.stats()["switches"] == b.pm.stats()["switches"] == 2


def test_no_flapping_between_two_working_paths() -> None:
    net = Network(seed=5, loss=0.10, jitter=0.03)
    host_a, host_b = make_site(net, "h", "full-cone", index=1, hosts=2, hairpin=True)
    sim = Sim(net)
    a = sim.add_peer("a", host_a)
    b = sim.add_peer("b", host_b, port=40001)
    sim.connect()
    sim.run_for(600.0)
    for peer in (a, b):
        assert kinds(peer) == ["relay", "direct"]
        assert peer.pm.current is not None and peer.pm.current.rank == RANK_LAN


def test_fallback_to_alternate_then_upgrade_back() -> None:
    net = Network(seed=6)
    host_a, host_b = make_site(net, "h", "full-cone", index=1, hosts=2, hairpin=True)
    sim = Sim(net)
    a = sim.add_peer("a", host_a)
    b = sim.add_peer("b", host_b, port=40001)
    sim.connect()
    sim.run_for(12.0)  # alternates get their first slow probe at ~10 s
    host_a.nat.lan_down = True  # type: ignore[union-attr]
    sim.run_for(20.0)
    for peer in (a, b):
        assert [p.rank for p in peer.changes()[1:]] == [RANK_LAN, RANK_REFLEXIVE]  # type: ignore[union-attr]
    host_a.nat.lan_down = False  # type: ignore[union-attr]
    sim.run_for(70.0)  # upgrade re-punch every upgrade_interval (60 s)
    for peer in (a, b):
        assert [p.rank for p in peer.changes()[1:]] == [RANK_LAN, RANK_REFLEXIVE, RANK_LAN]  # type: ignore[union-attr]


def test_dead_path_without_relay_goes_pathless_then_repunches() -> None:
    sim, a, b = pair_sim("port-restricted-cone", "restricted-cone", relay_up=False)
    sim.connect()
    sim.run_for(5.0)
    assert kinds(a) == kinds(b) == ["direct"]
    nat_of(a).blackhole = True
    sim.run_for(10.0)
    assert kinds(a) == kinds(b) == ["direct", None]
    assert a.pm.current is None and not a.failures()
    nat_of(a).blackhole = False
    sim.run_for(12.0)  # next re-punch burst within repunch_interval
    assert kinds(a) == kinds(b) == ["direct", None, "direct"]
    assert not a.failures() and not b.failures()


def test_relay_lost_and_restored() -> None:
    sim, a, b = pair_sim("symmetric", "symmetric")
    sim.connect()
    sim.run_for(2.0)
    sim.set_relay(False)
    sim.run_for(1.0)
    sim.set_relay(True)
    assert kinds(a) == ["relay", None, "relay"]


def test_relay_mode_never_probes() -> None:
    sim, a, b = pair_sim("full-cone", "full-cone", mode="relay")
    sim.connect()
    sim.run_for(30.0)
    assert kinds(a) == kinds(b) == ["relay"]
    assert sim.net.sent == 8  # the four reflector queries and their answers
    pm = a.pm
    pm.receive_stun(stun.binding_request(b"r" * 12, key=b"key-b-\x00"), b.addr, sim.net.now)
    assert pm.datagrams_to_send(sim.net.now) == []
    assert pm.stats()["probes_sent"] == 0 and pm.get_timer() is None


# ---------------------------------------------------------------------------- bounds


def test_memory_is_bounded() -> None:
    pm = manual_pm()
    many = [Candidate((f"198.51.{i // 200}.{i % 200 + 1}", 9), "srflx") for i in range(100)]
    pm.add_remote_candidates(many, 0.0)
    assert pm.stats()["candidates"] == MAX_CANDIDATES
    for i in range(50):  # valid requests from 50 sources (the peer's NAT gone wild)
        request = stun.binding_request(bytes([i]) * 12, key=KEY_L)
        pm.receive_stun(request, ("192.0.2.1", 1000 + i), i * 0.3)  # within the rate limit
    assert pm.stats()["candidates"] == MAX_CANDIDATES + MAX_PRFLX
    pm.start(15.0)
    t = 15.0
    while t < 20.0:
        pm.datagrams_to_send(t)
        t = pm.get_timer() or 99.0
    assert pm.stats()["probes_sent"] > MAX_TRANSACTIONS
    assert pm.stats()["pending_transactions"] <= MAX_TRANSACTIONS


def test_suite_nat_table_is_complete() -> None:
    assert set(NAT_TYPES) == {
        "firewall",
        "full-cone",
        "restricted-cone",
        "port-restricted-cone",
        "symmetric",
        "udp-blocked",
    }
    assert NatType().filtering == "apdf"
