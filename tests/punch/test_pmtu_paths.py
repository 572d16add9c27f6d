"""Path MTU discovery inside the PathManager (quictun.punch.pathmtu), over natsim's internet.

``Network.mtu`` drops bigger datagrams silently (a filtered-ICMP black hole); fake QUIC
datagrams are padded to the size each manager announced (DatagramSizeChanged), so a
wrong size shows up as QUIC traffic that stops arriving.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from natsim import Network, Peer, Sim, make_site

from quictun.config import TunnelConfig
from quictun.proto import stun
from quictun.punch import PathChanged
from quictun.punch.pathmtu import PathMtu
from quictun.punch.pmtu import BASE_SIZE, PmtuConfig
from quictun.punch.types import Addr, DatagramSizeChanged

FAST = PmtuConfig(confirm_interval=2.0)
RELAY_SIZE = TunnelConfig().relay_datagram_size


def mtu_of(config: PmtuConfig | None = FAST,
           route_mtu: Callable[[Addr], int | None] | None = None) -> PathMtu:
    """What the session's new_path_manager passes (the default TunnelConfig's sizes)."""
    return PathMtu(config, relay_size=RELAY_SIZE, unprobed=TunnelConfig().max_datagram,
                   route_mtu=route_mtu)


def pair(*, mtu: int | None, config: PmtuConfig | None = FAST, kind: str = "firewall",
         route_mtu: Callable[[Addr], int | None] | None = None) -> tuple[Sim, Peer, Peer]:
    net = Network(seed=3)
    net.mtu = mtu
    (host_a,) = make_site(net, "a", kind, index=1)
    (host_b,) = make_site(net, "b", kind, index=2)
    sim = Sim(net)
    a = sim.add_peer("a", host_a, mtu=mtu_of(config, route_mtu))
    b = sim.add_peer("b", host_b, mtu=mtu_of(config, route_mtu))
    sim.connect()
    sim.start_traffic(0.01)
    return sim, a, b


def kinds(peer: Peer) -> list[str | None]:
    return [None if p is None else p.kind for p in peer.changes()]


def delivered_over(sim: Sim, peer: Peer, seconds: float) -> int:
    """Fake QUIC datagrams ``peer`` received directly during the next ``seconds``."""
    before = peer.quic_received_direct
    sim.run_for(seconds)
    return peer.quic_received_direct - before


def test_small_mtu_path_settles_within_it_and_carries_traffic() -> None:
    sim, a, b = pair(mtu=1252)
    sim.run_for(20.0)
    for peer in (a, b):
        assert kinds(peer) == ["relay", "direct"]  # lost probes never looked like death
        size = peer.sizes()[-1][1]
        assert 1252 - 16 < size <= 1252
        assert peer.pm.stats()["pmtu"]["state"] == "complete"
        # the announcement order: relay's size, then 1200 on the new direct path, then up
        assert [s for _t, s in peer.sizes()][:2] == [RELAY_SIZE, BASE_SIZE]
    # every datagram of the next 5 s arrives: 100 per second each way
    assert delivered_over(sim, b, 5.0) == 500
    assert sim.net.too_big > 0  # the big probes did hit the limit


def test_black_hole_after_a_route_change_recovers() -> None:
    sim, a, b = pair(mtu=None)
    sim.run_for(5.0)
    assert a.sizes()[-1][1] == 1472  # no route MTU known: an Ethernet ceiling
    sim.net.mtu = 1252  # the route changed; ICMP filtered
    t_change = sim.net.now
    sim.run_for(15.0)
    size_events = [(t, s) for t, s in a.sizes() if t > t_change]
    assert size_events[0][1] == BASE_SIZE  # fell back first ...
    assert size_events[0][0] - t_change < FAST.confirm_interval + 3 * FAST.timeout_max
    assert 1252 - 16 < size_events[-1][1] <= 1252  # ... then found the new limit
    assert delivered_over(sim, b, 5.0) == 500
    assert kinds(a) == ["relay", "direct"]
    assert a.pm.stats()["pmtu"]["state"] == "complete"
    assert a.pm.stats()["pmtu"]["black_holes"] == 1


def test_quic_stall_hint_speeds_up_black_hole_detection() -> None:
    sim, a, _b = pair(mtu=None, config=PmtuConfig(confirm_interval=300.0))
    sim.run_for(5.0)
    sim.net.mtu = 1252
    t_change = sim.net.now
    sim.run_for(0.2)
    a.pm.mtu.note_quic_stall()  # what the session does when QUIC's PTO fires
    sim.run_for(5.0)
    fallback = [t for t, s in a.sizes() if t > t_change and s == BASE_SIZE]
    # max_probes timeouts and the liveness probes between them, not confirm_interval
    assert fallback and fallback[0] - t_change < 3.0


def test_route_mtu_sets_the_ceiling() -> None:
    sim, a, b = pair(mtu=None, route_mtu=lambda addr: 9000)
    sim.run_for(5.0)
    assert a.sizes()[-1][1] == 9000 - 28
    assert delivered_over(sim, b, 1.0) == 100


def test_path_below_base_is_not_used() -> None:
    sim, a, b = pair(mtu=1100, config=dataclasses.replace(FAST, error_retry=1000.0))
    sim.run_for(10.0)
    for peer in (a, b):
        # validated by small probes, then found unable to carry 1200 bytes: relay
        assert kinds(peer)[-1] == "relay"
        assert "direct" in kinds(peer)
        assert peer.sizes()[-1][1] == RELAY_SIZE


def test_path_below_base_is_retried_and_used_once_it_carries() -> None:
    sim, a, b = pair(mtu=1100, config=dataclasses.replace(FAST, error_retry=5.0))
    sim.run_for(4.0)
    assert kinds(a)[-1] == "relay"
    sim.net.mtu = None  # the path got better
    sim.run_for(15.0)
    assert kinds(a)[-1] == "direct" and kinds(b)[-1] == "direct"
    assert a.sizes()[-1][1] == 1472


def test_no_probing_when_disabled() -> None:
    sim, a, _b = pair(mtu=None, config=None)
    sim.run_for(10.0)
    assert a.pm.stats()["pmtu_probes_sent"] == 0
    assert a.sizes()[-1][1] == TunnelConfig().max_datagram == BASE_SIZE


def test_a_manager_without_path_mtu_announces_nothing() -> None:
    net = Network(seed=3)
    (host_a,) = make_site(net, "a", "firewall", index=1)
    (host_b,) = make_site(net, "b", "firewall", index=2)
    sim = Sim(net)
    a, _b = sim.add_peer("a", host_a), sim.add_peer("b", host_b)
    sim.connect()
    sim.start_traffic(0.01)
    sim.run_for(5.0)
    assert kinds(a) == ["relay", "direct"]
    assert a.sizes() == [] and a.pm.mtu.datagram_size == BASE_SIZE


def test_send_too_big_lowers_the_size() -> None:
    sim, a, _b = pair(mtu=None)
    sim.run_for(3.0)
    assert a.pm.mtu.datagram_size == 1472
    path = a.pm.current
    assert path is not None and path.remote is not None
    a.pm.mtu.note_send_too_big(path.remote, 1472, sim.net.now)
    assert a.pm.mtu.datagram_size == BASE_SIZE
    assert isinstance(a.pm.next_event(), DatagramSizeChanged)
    sim.run_for(10.0)
    assert 1200 < a.pm.mtu.datagram_size <= 1468


def test_size_event_follows_its_path_event() -> None:
    sim, a, _b = pair(mtu=None)
    sim.run_for(3.0)
    events = [e for _t, e in a.events if isinstance(e, PathChanged | DatagramSizeChanged)]
    assert any(isinstance(e, DatagramSizeChanged) for e in events)
    for i, e in enumerate(events):
        if isinstance(e, PathChanged) and i + 1 < len(events):
            assert isinstance(events[i + 1], DatagramSizeChanged)


def test_probes_are_signed_padded_binding_requests() -> None:
    sim, a, _b = pair(mtu=None)
    sent: list[bytes] = []
    real = a.host.send

    def spy(port: int, data: bytes, dst: Addr, ttl: int | None = None) -> None:
        if stun.is_stun(data):
            sent.append(data)
        real(port, data, dst, ttl)

    a.host.send = spy  # type: ignore[method-assign]
    sim.run_for(3.0)
    padded = [d for d in sent if stun.decode(d).get(stun.ATTR_PADDING) is not None]
    assert padded and {len(d) for d in padded} >= {BASE_SIZE, 1472}
    for d in padded:
        msg = stun.decode(d)
        assert msg.msg_type == stun.BINDING_REQUEST
        assert stun.verify_integrity(d, b"key-b-\x00")  # a's requests: signed for b
