"""Security hardening of the path manager (review findings; each test failed before).

1. A recorded signed probe replayed from spoofed sources must not make us learn
   candidates or start triggered bursts (amplification toward victims, prflx eviction).
2. Birthday probing never sprays non-global addresses (a lying relay could otherwise aim
   it at a victim's internal network), unless ``PathConfig.birthday_any_address``.
3. The signalled-candidate cap evicts the oldest idle candidate instead of ignoring new
   ones, so a long roaming session can still go direct.
"""

from __future__ import annotations

import ipaddress
import random

import pytest

from quictun.proto import stun
from quictun.proto.limits import ReplayWindow, TokenBucket
from quictun.punch import (
    MAX_CANDIDATES,
    MAX_PRFLX,
    Addr,
    Candidate,
    PathConfig,
    PathManager,
)
from quictun.punch.birthday import decide_role, edm_ip
from quictun.punch.probes import TransactionTable, Txn, seen_requests

KEY_L, KEY_R = b"local-key", b"remote-key"
PEER: Addr = ("93.184.216.34", 4000)  # a global address
VICTIMS = [(f"93.184.217.{i}", 5000 + i) for i in range(1, 60)]


def new_pm(config: PathConfig | None = None, **kwargs: object) -> PathManager:
    rng = random.Random(7)
    return PathManager(
        local_key=KEY_L,
        remote_key=KEY_R,
        local_networks=[ipaddress.ip_network("10.0.0.0/24")],
        config=config,
        random_bytes=rng.randbytes,
        **kwargs,  # type: ignore[arg-type]
    )


def sent_to(out: list[tuple[bytes, Addr]], addrs: list[Addr]) -> list[tuple[bytes, Addr]]:
    wanted = set(addrs)
    return [(d, a) for d, a in out if a in wanted]


def run(pm: PathManager, start: float, end: float) -> list[tuple[bytes, Addr]]:
    """Drive timers from ``start`` to ``end``; return everything sent."""
    out = pm.datagrams_to_send(start)
    t = pm.get_timer()
    while t is not None and t <= end:
        out += pm.datagrams_to_send(max(t, start))
        nxt = pm.get_timer()
        if nxt is not None and nxt <= t:
            nxt = t + 0.001
        t = nxt
    return out


# ---------------------------------------------------------------------------- 1. replay


def test_replayed_probe_from_spoofed_sources_reaches_no_victim() -> None:
    pm = new_pm()
    pm.add_remote_candidates([Candidate(PEER, "srflx")], 0.0)
    pm.start(0.0)
    run(pm, 0.0, 0.5)
    recorded = stun.binding_request(b"R" * 12, key=KEY_L)  # the peer's genuine probe
    pm.receive_stun(recorded, PEER, 0.5)
    out = pm.datagrams_to_send(0.5)
    assert any(a == PEER and stun.decode(d).msg_type == stun.BINDING_SUCCESS for d, a in out)
    before = pm.stats()
    # an on-path observer replays it from many spoofed sources, over the whole window
    out = []
    for i, victim in enumerate(VICTIMS):
        now = 0.6 + i * 0.4
        pm.receive_stun(recorded, victim, now)
        out += pm.datagrams_to_send(now)
    out += run(pm, 0.6 + len(VICTIMS) * 0.4, 30.0)
    assert sent_to(out, VICTIMS) == []  # no response, no probe, no burst
    stats = pm.stats()
    assert stats["prflx_learned"] == before["prflx_learned"] == 0
    assert stats["triggered_checks"] == before["triggered_checks"]
    assert stats["candidates"] == 1
    assert stats["replays_dropped"] == len(VICTIMS)


def test_replays_do_not_evict_real_prflx_candidates() -> None:
    pm = new_pm()
    pm.start(0.0)
    real = ("93.184.216.99", 7000)  # the peer's symmetric-NAT port, learned from its probe
    pm.receive_stun(stun.binding_request(b"P" * 12, key=KEY_L), real, 0.0)
    assert pm.stats()["prflx_learned"] == 1
    recorded = [stun.binding_request(bytes([i]) * 12, key=KEY_L) for i in range(3)]
    for i, data in enumerate(recorded):  # seen once each, from the peer
        pm.receive_stun(data, real, 0.1 + i * 0.01)
    for i, victim in enumerate(VICTIMS * 2):
        pm.receive_stun(recorded[i % 3], victim, 1.0 + i * 0.05)
    assert pm.stats()["candidates"] == 1 and pm.stats()["prflx_learned"] == 1
    out = run(pm, 1.0, 10.0)
    assert sent_to(out, VICTIMS) == []
    assert any(a == real for _d, a in out)  # the real one is still being probed


def test_retransmission_from_same_source_is_answered_but_triggers_nothing() -> None:
    pm = new_pm()
    pm.start(0.0)
    src = ("93.184.216.50", 6000)
    request = stun.binding_request(b"T" * 12, key=KEY_L)
    pm.receive_stun(request, src, 0.0)
    first = [d for d, a in pm.datagrams_to_send(0.0)
             if stun.decode(d).msg_type == stun.BINDING_SUCCESS]
    checks = pm.stats()["triggered_checks"]
    run(pm, 0.0, 4.0)  # the triggered burst is over
    pm.receive_stun(request, src, 4.0)  # same txid, same source: a retransmission
    again = [d for d, a in pm.datagrams_to_send(4.0)
             if stun.decode(d).msg_type == stun.BINDING_SUCCESS]
    assert again == first  # the same response
    assert pm.stats()["triggered_checks"] == checks
    assert run(pm, 4.0, 9.0) == []  # no new burst toward src
    # a fresh probe from the real peer still triggers a check as before
    pm.receive_stun(stun.binding_request(b"U" * 12, key=KEY_L), src, 9.0)
    assert pm.stats()["triggered_checks"] == checks + 1


def test_prflx_learning_and_triggered_checks_are_rate_limited() -> None:
    """Defence in depth: even fresh, validly signed requests (only the key holder can
    make them, or a replay older than the replay window) cannot make us probe new
    addresses faster than the token buckets allow."""
    pm = new_pm()
    pm.start(0.0)
    sources = [(f"93.184.218.{i}", 9000) for i in range(1, 41)]
    for i, src in enumerate(sources):
        pm.receive_stun(stun.binding_request(i.to_bytes(12, "big"), key=KEY_L), src, 0.0)
    stats = pm.stats()
    assert stats["prflx_learned"] <= 4
    assert stats["triggered_checks"] <= 8
    assert stats["responses_sent"] == len(sources)  # answering is 1:1, never limited
    # one second later, at most 4 more
    for i, src in enumerate(sources):
        txid = (1000 + i).to_bytes(12, "big")
        pm.receive_stun(stun.binding_request(txid, key=KEY_L), src, 1.0)
    assert pm.stats()["prflx_learned"] <= 8


def test_seen_requests_table_is_bounded_and_expires() -> None:
    seen = seen_requests()
    a, b = ("192.0.2.1", 1), ("192.0.2.2", 2)
    assert seen.check(b"x" * 12, 0.0, (a, 0)) == "new"
    assert seen.check(b"x" * 12, 1.0, (a, 0)) == "repeat"
    assert seen.check(b"x" * 12, 1.0, (a, 3)) == "replay"  # another socket
    assert seen.check(b"x" * 12, 1.0, (b, 0)) == "replay"
    assert seen.check(b"x" * 12, 31.0, (b, 0)) == "new"  # past the window
    for i in range(5000):
        seen.check(i.to_bytes(12, "big"), 32.0, (a, 0))
    assert len(seen) <= 1024


def test_replay_window_can_fail_closed() -> None:
    """A full window that must not forget (offer nonces) refuses new keys until old ones
    expire."""
    w = ReplayWindow(10.0, 2, evict_when_full=False)
    assert w.check("a", 0.0) == "new" and w.check("b", 0.0) == "new"
    assert w.check("c", 1.0) == "replay"  # full: refused, not remembered
    assert w.check("a", 1.0) == "repeat"  # no origin: the same key is never new again
    assert w.check("c", 10.0) == "new"  # a and b expired


def test_token_bucket() -> None:
    bucket = TokenBucket(4.0, 4)
    assert [bucket.take(0.0) for _ in range(6)] == [True] * 4 + [False] * 2
    assert bucket.take(0.25) and not bucket.take(0.25)
    assert not bucket.take(0.1)  # the clock going back adds nothing
    assert sum(bucket.take(100.0) for _ in range(10)) == 4  # capped at the burst
    with pytest.raises(ValueError):
        TokenBucket(0.0, 1)
    big = TokenBucket(100.0, 1000)
    assert big.take(0.0, 600) and not big.take(0.0, 600)  # all or nothing
    assert big.take(2.0, 600)


def test_transaction_table_matches_address_and_slot() -> None:
    table = TransactionTable()
    table.add(b"t" * 12, Txn(("192.0.2.1", 1), 0.0, slot=2), 0.0)
    assert table.match(b"t" * 12, ("192.0.2.1", 1), 0, 0.1) is None
    assert table.match(b"t" * 12, ("192.0.2.9", 1), 2, 0.1) is None
    assert table.match(b"t" * 12, ("192.0.2.1", 1), 2, 0.1) is not None
    assert table.match(b"t" * 12, ("192.0.2.1", 1), 2, 5.0) is None  # expired
    assert len(table) == 0


# ---------------------------------------------------------------------------- 2. birthday


NON_GLOBAL = ["10.1.2.3", "192.168.1.20", "172.16.5.5", "100.64.0.9", "127.0.0.1",
              "169.254.1.1", "198.18.0.7", "203.0.113.5"]


@pytest.mark.parametrize("ip", NON_GLOBAL)
def test_birthday_never_targets_non_global_addresses(ip: str) -> None:
    peer = [Candidate((ip, 1111), "srflx"), Candidate((ip, 2222), "srflx")]
    assert edm_ip(peer) is None
    assert decide_role(peer, None, multi_socket=True) == (None, [])
    # hard role toward a non-global reflexive address: refused as well
    one = [Candidate((ip, 1111), "srflx")]
    mine = [Candidate(("93.184.216.1", 1), "srflx"), Candidate(("93.184.216.1", 2), "srflx")]
    assert decide_role(one, mine, multi_socket=True) == (None, [])
    # the lab's opt-in
    assert decide_role(peer, None, multi_socket=True, any_address=True) == ("easy", [(ip, 0)])
    assert decide_role(one, mine, multi_socket=True, any_address=True) == ("hard", [(ip, 1111)])


def test_birthday_global_targets_still_work() -> None:
    peer = [Candidate(("93.184.216.34", 1111), "srflx"),
            Candidate(("93.184.216.34", 2222), "srflx")]
    assert decide_role(peer, None, multi_socket=False) == ("easy", [("93.184.216.34", 0)])


def birthday_pm(ip: str, config: PathConfig | None = None) -> PathManager:
    pm = new_pm(config)
    pm.add_remote_candidates([Candidate((ip, 1111), "srflx"), Candidate((ip, 2222), "srflx")],
                             0.0)
    pm.start(0.0)
    return pm


def test_lying_relay_cannot_aim_birthday_at_internal_network() -> None:
    pm = birthday_pm("192.168.1.20")
    out = run(pm, 0.0, 20.0)
    assert pm.birthday_role is None and pm.stats()["birthday_probes"] == 0
    assert {a for _d, a in out} <= {("192.168.1.20", 1111), ("192.168.1.20", 2222)}


def test_birthday_any_address_opt_in() -> None:
    assert PathConfig().birthday_any_address is False
    pm = birthday_pm("198.18.0.7", PathConfig(birthday_any_address=True))
    run(pm, 0.0, 5.0)
    assert pm.birthday_role == "easy" and pm.stats()["birthday_probes"] > 0


def test_one_bounded_birthday_attempt_per_manager() -> None:
    cfg = PathConfig()
    pm = birthday_pm(PEER[0])
    run(pm, 0.0, 200.0)  # nothing ever answers; re-punches keep going
    assert pm.birthday_role == "easy"
    assert pm.stats()["birthday_probes"] <= cfg.birthday_rate * cfg.birthday_duration + 20
    assert pm.aux_slots() == set()


# ---------------------------------------------------------------------------- 3. cap


def signalled(i: int) -> Candidate:
    return Candidate((f"93.184.{100 + i // 200}.{i % 200 + 1}", 4000), "srflx")


def test_candidate_cap_evicts_oldest_idle_candidate() -> None:
    pm = new_pm()
    pm.add_remote_candidates([signalled(i) for i in range(MAX_CANDIDATES)], 0.0)
    pm.start(0.0)
    out = pm.datagrams_to_send(0.0)
    # the first candidate works and is selected
    probe = next(d for d, a in out if a == signalled(0).addr)
    pm.receive_stun(stun.binding_success(stun.decode(probe).txid, ("192.0.2.9", 1), key=KEY_R),
                    signalled(0).addr, 0.01)
    assert pm.current is not None and pm.current.remote == signalled(0).addr
    # the peer roams: a new reflexive candidate after every NAT rebinding, sent in-band
    new = [signalled(MAX_CANDIDATES + i) for i in range(40)]
    for i, cand in enumerate(new):
        pm.add_remote_candidates([cand], 1.0 + i)
    stats = pm.stats()
    assert stats["candidates"] == MAX_CANDIDATES
    assert pm.current.remote == signalled(0).addr  # the selected one is never evicted
    out = run(pm, 40.0, 41.0)
    assert any(a == new[-1].addr for _d, a in out)  # the newest one is probed
    kept = {a for _d, a in run(pm, 41.0, 200.0)}
    assert signalled(1).addr not in kept  # the oldest idle ones were evicted


def test_resignalled_candidate_counts_as_fresh() -> None:
    pm = new_pm()
    pm.add_remote_candidates([signalled(i) for i in range(MAX_CANDIDATES)], 0.0)
    pm.add_remote_candidates([signalled(0)], 1.0)  # re-sent: still current for the peer
    pm.add_remote_candidates([signalled(MAX_CANDIDATES)], 2.0)
    pm.start(2.0)
    dests = {a for _d, a in pm.datagrams_to_send(2.0)}
    assert signalled(0).addr in dests and signalled(1).addr not in dests
    assert signalled(MAX_CANDIDATES).addr in dests


def test_prflx_cap_unchanged() -> None:
    pm = new_pm()
    for i in range(3 * MAX_PRFLX):
        src = (f"93.184.219.{i + 1}", 7000)
        pm.receive_stun(stun.binding_request(i.to_bytes(12, "big"), key=KEY_L), src, i * 1.0)
    assert pm.stats()["candidates"] == MAX_PRFLX
