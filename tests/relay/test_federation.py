"""The matchmaker's cluster half, driven as a pure state machine: several matchmakers,
their ToPeer effects delivered to each other, and a table in this file answering Claim,
Release and Lookup with the semantics the Redis scripts implement (the scripts
themselves run against a real redis-server in test_cluster_redis.py)."""

from __future__ import annotations

import hashlib
import logging
import os
from collections import deque

import pytest
from helpers import signed_register

from quictun.proto import signalling as sp
from signal_server import peerwire as pw
from signal_server.matchmaker import Matchmaker, MatchmakerConfig
from signal_server.types import (
    UNAVAILABLE,
    Claim,
    ClaimResult,
    Disconnect,
    Holder,
    Lookup,
    LostName,
    Release,
    Send,
    ToPeer,
)

OWNER_A = "aa" * 32
OWNER_B = "bb" * 32


def owner_id(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


class Cluster:
    """Matchmakers named by instance id; effects are queued and run in order."""

    def __init__(self, *ids: str, **config: object) -> None:
        self.now = 1000.0
        self.mms = {i: Matchmaker(MatchmakerConfig(instance=i, **config),  # type: ignore[arg-type]
                                  random_bytes=os.urandom) for i in ids}
        self.challenges: dict[tuple[str, int], str | None] = {}
        self.names: dict[str, tuple[bytes, str, int]] = {}  # name -> owner, inst, conn ('' free)
        self.inbox: dict[tuple[str, int], list[sp.Message | bytes]] = {}
        self.disconnected: dict[tuple[str, int], Disconnect] = {}
        self.dead: set[str] = set()
        self.unreachable: set[str] = set()  # gone, but the registry does not know yet
        self.registry_up = True
        self.queue: deque[tuple[str, object]] = deque()
        self.peer_messages = 0

    # --- the shell's job ------------------------------------------------------------

    def run(self) -> None:
        for inst, mm in self.mms.items():
            self.queue.extend((inst, out) for out in mm.outputs())
        while self.queue:
            inst, out = self.queue.popleft()
            self._perform(inst, out)
            for i, mm in self.mms.items():
                self.queue.extend((i, o) for o in mm.outputs())

    def _perform(self, inst: str, out: object) -> None:
        mm = self.mms[inst]
        if isinstance(out, Send):
            item = out.data if isinstance(out.data, bytes) else sp.decode(out.data)
            self.inbox.setdefault((inst, out.conn_id), []).append(item)
        elif isinstance(out, Disconnect):
            self.disconnected[(inst, out.conn_id)] = out
        elif isinstance(out, Claim):
            mm.claim_result(out, self._claim(inst, out), self.now)
        elif isinstance(out, Release):
            cur = self.names.get(out.name)
            if self.registry_up and cur is not None and cur[1:] == (inst, out.conn_id):
                if out.grace is None:
                    del self.names[out.name]
                else:
                    self.names[out.name] = (cur[0], "", 0)
        elif isinstance(out, Lookup):
            mm.lookup_result(out, self._lookup(out.name), self.now)
        elif isinstance(out, ToPeer):
            self.peer_messages += 1
            if out.instance in self.dead or out.instance in self.unreachable:
                mm.peer_down(out.instance, self.now)
            else:
                self.mms[out.instance].receive_peer(inst, out.data, self.now)

    def _claim(self, inst: str, claim: Claim) -> ClaimResult:
        if not self.registry_up:
            return ClaimResult(UNAVAILABLE)
        cur = self.names.get(claim.name)
        if cur is not None and cur[0] != claim.owner:
            return ClaimResult("taken")
        self.names[claim.name] = (claim.owner, inst, claim.conn_id)
        if cur is not None and cur[1] and cur[1] not in self.dead:
            return ClaimResult("ok", Holder(cur[1], cur[2]))
        return ClaimResult("ok")

    def _lookup(self, name: str) -> Holder | None | str:
        if not self.registry_up:
            return UNAVAILABLE
        cur = self.names.get(name)
        if cur is None or not cur[1] or cur[1] in self.dead:
            return None
        return Holder(cur[1], cur[2])

    # --- client actions ---------------------------------------------------------------

    def open(self, inst: str, cid: int) -> None:
        mm = self.mms[inst]
        mm.open(cid, f"10.0.0.{cid}:{5000 + cid}", self.now)
        mm.receive_text(cid, sp.encode(sp.Hello(v=2, token=None, agent="t")), self.now)
        self.run()
        welcome = self.pop(inst, cid)
        assert isinstance(welcome, sp.Welcome)
        self.challenges[(inst, cid)] = welcome.challenge

    def reg(self, inst: str, cid: int, name: str, owner: str) -> sp.Register:
        """A ``register`` signed by ``owner`` for the conn ``cid`` of instance ``inst``."""
        return signed_register(name, owner, self.challenges.get((inst, cid), "00" * 32))

    def send(self, inst: str, cid: int, msg: sp.Message) -> None:
        self.mms[inst].receive_text(cid, sp.encode(msg), self.now)
        self.run()

    def send_bin(self, inst: str, cid: int, data: bytes) -> None:
        self.mms[inst].receive_binary(cid, data, self.now)
        self.run()

    def close(self, inst: str, cid: int) -> None:
        self.mms[inst].close(cid, self.now)
        self.run()

    def advance(self, dt: float) -> None:
        self.now += dt
        for mm in self.mms.values():
            timer = mm.get_timer()
            if timer is not None and timer <= self.now:
                mm.handle_timer(self.now)
        self.run()

    def kill(self, inst: str) -> None:
        """The instance dies: others learn it (as the shell does from its link)."""
        self.dead.add(inst)
        del self.mms[inst]
        for mm in self.mms.values():
            mm.peer_down(inst, self.now)
        self.run()

    def pop(self, inst: str, cid: int) -> sp.Message | bytes:
        box = self.inbox.get((inst, cid), [])
        assert box, f"nothing sent to {inst}/{cid}"
        return box.pop(0)

    def pending(self, inst: str, cid: int) -> list[sp.Message | bytes]:
        return self.inbox.pop((inst, cid), [])

    def register(self, inst: str, cid: int, name: str, owner: str = OWNER_A) -> None:
        self.send(inst, cid, self.reg(inst, cid, name, owner))
        assert self.pop(inst, cid) == sp.Registered(name)

    def pair(self, holder: tuple[str, int], connector: tuple[str, int],
             name: str = "srv") -> tuple[int, int]:
        """Register, connect, answer; (holder's session id, connector's session id)."""
        self.open(*holder)
        self.open(*connector)
        self.register(*holder, name)
        self.send(*connector, sp.Connect(name=name, offer={"o": 1}))
        incoming = self.pop(*holder)
        assert isinstance(incoming, sp.Incoming) and incoming.offer == {"o": 1}
        self.send(*holder, sp.Answer(session=incoming.session, answer={"a": 2}))
        answer = self.pop(*connector)
        assert isinstance(answer, sp.Answer) and answer.answer == {"a": 2}
        assert self.pop(*holder) == sp.Go(incoming.session)
        return incoming.session, answer.session


def test_register_on_one_connect_through_another_and_relay_both_ways() -> None:
    c = Cluster("A", "B")
    c.mms["B"]._next_session = 500  # distinct ids, so a missed rewrite would show
    hs, cs = c.pair(("A", 1), ("B", 7))
    assert cs == 500 and hs == 1
    c.send_bin("B", 7, sp.encode_relay(cs, b"\x40from-connector"))
    assert c.pop("A", 1) == sp.encode_relay(hs, b"\x40from-connector")
    c.send_bin("A", 1, sp.encode_relay_batch(hs, [b"\x40x", b"\x40yy"]))
    assert c.pop("B", 7) == sp.encode_relay_batch(cs, [b"\x40x", b"\x40yy"])
    a, b = c.mms["A"].stats, c.mms["B"].stats
    assert a["relayed_packets"] == 2 and b["relayed_packets"] == 1
    assert a["peer_sessions"] == b["peer_sessions"] == 1
    assert a["pairings_total"] == 1 and b["sessions_total"] == 1


def test_a_relay_frame_before_the_answer_or_from_a_stranger_is_dropped() -> None:
    c = Cluster("A", "B", "C")
    hs, cs = c.pair(("A", 1), ("B", 2))
    forged = pw.relay_frame(cs, hs, sp.encode_relay(99, b"\x40x"))
    c.mms["A"].receive_peer("C", forged, c.now)  # the session is with B, not C
    c.run()
    assert c.pending("A", 1) == []
    assert c.mms["A"].dropped_bytes == 2
    c.send("B", 2, sp.Connect(name="srv", offer={}))  # a second session, not answered
    incoming = c.pop("A", 1)
    assert isinstance(incoming, sp.Incoming)
    early = pw.relay_frame(cs + 1, incoming.session, sp.encode_relay(0, b"\x40yy"))
    c.mms["A"].receive_peer("B", early, c.now)
    c.run()
    assert c.pending("A", 1) == [] and c.mms["A"].dropped_bytes == 5


def test_close_and_disconnect_cross_instances() -> None:
    c = Cluster("A", "B")
    hs, cs = c.pair(("A", 1), ("B", 2))
    c.send("B", 2, sp.Close(session=cs, reason="bye"))
    assert c.pop("A", 1) == sp.Closed(hs, "bye")
    c.send("B", 2, sp.Connect(name="srv", offer={}))
    incoming = c.pop("A", 1)
    assert isinstance(incoming, sp.Incoming)
    c.close("A", 1)  # the holder drops before answering
    assert isinstance(c.pop("B", 2), sp.Closed)
    assert c.mms["A"].stats["sessions"] == c.mms["B"].stats["sessions"] == 0


def test_reject_code_crosses_and_is_counted_by_the_holders_instance() -> None:
    c = Cluster("A", "B")
    c.open("A", 1)
    c.open("B", 2)
    c.register("A", 1, "srv")
    c.send("B", 2, sp.Connect(name="srv", offer={}))
    incoming = c.pop("A", 1)
    assert isinstance(incoming, sp.Incoming)
    c.send("A", 1, sp.Reject(session=incoming.session, reason="wrong secret", code="auth"))
    rejected = c.pop("B", 2)
    assert isinstance(rejected, sp.Rejected) and rejected.code == "auth"
    assert c.mms["A"].rejects == {"auth": 1}


def test_connect_timeout_tells_the_holder_on_the_other_instance() -> None:
    c = Cluster("A", "B", connect_timeout=15.0)
    c.open("A", 1)
    c.open("B", 2)
    c.register("A", 1, "srv")
    c.send("B", 2, sp.Connect(name="srv", offer={}))
    incoming = c.pop("A", 1)
    c.advance(15.0)
    err = c.pop("B", 2)
    assert isinstance(err, sp.Error) and err.code == "timeout"
    assert c.pop("A", 1) == sp.Closed(incoming.session, "timeout")
    c.advance(2.0)  # the holder's own (later) deadline finds nothing left to do
    assert c.pending("A", 1) == [] and c.mms["A"].stats["sessions"] == 0


def test_unknown_name_and_a_stale_holder() -> None:
    c = Cluster("A", "B")
    c.open("B", 2)
    c.send("B", 2, sp.Connect(name="nobody", offer={}))
    assert c.pop("B", 2).code == "no-such-name"  # type: ignore[union-attr]
    c.names["ghost"] = (owner_id(OWNER_A), "A", 42)  # the registry says conn 42 on A
    c.send("B", 2, sp.Connect(name="ghost", offer={}))
    assert c.pop("B", 2).code == "no-such-name"  # type: ignore[union-attr]
    assert c.mms["B"].stats["sessions"] == 0


def test_ownership_is_global_and_the_same_owner_moves_a_name() -> None:
    c = Cluster("A", "B")
    c.open("A", 1)
    c.open("B", 2)
    c.open("B", 3)
    c.register("A", 1, "srv")
    c.send("B", 2, c.reg("B", 2, "srv", OWNER_B))
    assert c.pop("B", 2).code == "name-taken"  # type: ignore[union-attr]
    c.register("B", 3, "srv")  # same owner, another instance: takes it over
    assert c.mms["A"].held_names() == []  # A was told (moved) and let go ...
    told = c.pop("A", 1)  # ... and so is its holder, which must not serve on silently
    assert isinstance(told, sp.Error) and told.code == sp.E_TAKEN_OVER, told
    c.open("A", 4)
    c.send("A", 4, sp.Connect(name="srv", offer={}))  # a connect on A now goes to B
    assert isinstance(c.pop("B", 3), sp.Incoming)


def test_an_instance_dies() -> None:
    c = Cluster("A", "B")
    hs, cs = c.pair(("A", 1), ("B", 2))
    c.open("B", 3)
    c.send("B", 3, sp.Connect(name="srv", offer={}))  # pending when A dies
    assert isinstance(c.pop("A", 1), sp.Incoming)
    c.kill("A")
    assert c.pop("B", 2) == sp.Closed(cs, "peer disconnected")
    assert c.pop("B", 3).code == "no-such-name"  # type: ignore[union-attr]
    assert c.mms["B"].stats["sessions"] == 0
    # the serve re-registers on B (same owner): reachable again
    c.open("B", 4)
    c.register("B", 4, "srv")
    c.send("B", 3, sp.Connect(name="srv", offer={}))
    assert isinstance(c.pop("B", 4), sp.Incoming)


def test_a_message_to_a_dead_instance_ends_its_sessions() -> None:
    c = Cluster("A", "B")
    c.open("A", 1)
    c.open("B", 2)
    c.register("A", 1, "srv")
    del c.mms["A"]
    c.unreachable.add("A")  # died; its record in the registry has not expired yet
    c.send("B", 2, sp.Connect(name="srv", offer={}))
    assert c.pop("B", 2).code == "no-such-name"  # type: ignore[union-attr]
    assert c.mms["B"].stats["sessions"] == 0


def test_registry_down_local_peers_keep_working() -> None:
    c = Cluster("A", "B")
    hs, cs = c.pair(("A", 1), ("B", 2))
    c.open("A", 3)
    c.registry_up = False
    # the established cross-instance session is unaffected
    c.send_bin("B", 2, sp.encode_relay(cs, b"\x40x"))
    assert c.pop("A", 1) == sp.encode_relay(hs, b"\x40x")
    # a connect to a name held on this instance pairs without the registry
    c.send("A", 3, sp.Connect(name="srv", offer={}))
    assert isinstance(c.pop("A", 1), sp.Incoming)
    # names elsewhere cannot be found, new names cannot be claimed: one clear error
    c.send("B", 2, sp.Connect(name="other", offer={}))
    err = c.pop("B", 2)
    assert isinstance(err, sp.Error) and err.code == "server-error" and "Redis" in err.message
    c.send("A", 3, c.reg("A", 3, "fresh", OWNER_B))
    assert c.pop("A", 3).code == "server-error"  # type: ignore[union-attr]
    # the same owner re-registering a name this instance knows is let through
    c.close("A", 1)
    c.open("A", 5)
    c.register("A", 5, "srv")
    assert c.mms["A"].stats["connections"] == 2


def test_names_lost_after_an_outage() -> None:
    c = Cluster("A")
    c.open("A", 1)
    c.open("A", 2)
    c.register("A", 1, "one")
    c.register("A", 2, "two")
    mm = c.mms["A"]
    assert {h.name for h in mm.held_names()} == {"one", "two"}
    mm.names_lost([LostName("one", 1, "moved"), LostName("two", 2, "taken")], c.now)
    c.run()
    assert ("A", 1) not in c.disconnected and ("A", 2) in c.disconnected
    assert mm.held_names() == []
    told = c.pop("A", 1)  # "moved": the same owner registered it elsewhere
    assert isinstance(told, sp.Error) and told.code == sp.E_TAKEN_OVER, told


def test_the_holders_pending_limit_holds_across_instances() -> None:
    c = Cluster("A", "B", max_pending_per_holder=3, max_pending_per_conn=32)
    c.open("A", 1)
    c.open("A", 2)
    c.open("B", 3)
    c.register("A", 1, "srv")
    for inst, cid in (("A", 2), ("B", 3), ("B", 3)):
        c.send(inst, cid, sp.Connect(name="srv", offer={}))
    assert len([m for m in c.pending("A", 1) if isinstance(m, sp.Incoming)]) == 3
    c.send("B", 3, sp.Connect(name="srv", offer={}))
    c.send("A", 2, sp.Connect(name="srv", offer={}))
    assert c.pop("B", 3).code == "busy"  # type: ignore[union-attr]
    assert c.pop("A", 2).code == "busy"  # type: ignore[union-attr]
    assert c.pending("A", 1) == []


def test_a_holder_that_leaves_during_its_claim_is_released() -> None:
    c = Cluster("A")
    mm = c.mms["A"]
    c.open("A", 1)
    mm.receive_text(1, sp.encode(c.reg("A", 1, "srv", OWNER_A)), c.now)
    claim = mm.outputs()
    assert len(claim) == 1 and isinstance(claim[0], Claim)
    mm.close(1, c.now)
    mm.claim_result(claim[0], ClaimResult("ok"), c.now)
    release = mm.outputs()
    assert len(release) == 1 and isinstance(release[0], Release)
    assert release[0].grace == mm.config.name_grace


def test_malformed_peer_messages_are_counted_not_raised(
        caplog: pytest.LogCaptureFixture) -> None:
    c = Cluster("A")
    mm = c.mms["A"]
    with caplog.at_level(logging.WARNING, "quictun.signal"):
        for junk in (b"", b"\x00{", b"\x00[]", b"\x00{\"k\":\"answer\"}", b"\x07", b"\x01\x00"):
            mm.receive_peer("B", junk, c.now)
    assert mm.errors["peer-protocol"] == 6
    assert "Traceback" not in caplog.text


def test_single_relay_emits_no_cluster_effects() -> None:
    mm = Matchmaker(MatchmakerConfig(), random_bytes=os.urandom)
    mm.open(1, "10.0.0.1:1", 0.0)
    mm.receive_text(1, sp.encode(sp.Hello(v=2, token=None, agent="t")), 0.0)
    (welcome,) = mm.outputs()
    challenge = sp.decode(welcome.data).challenge  # type: ignore[union-attr,arg-type]
    mm.receive_text(1, sp.encode(signed_register("x", OWNER_A, challenge)), 0.0)
    mm.receive_text(1, sp.encode(sp.Connect(name="nope", offer={})), 0.0)
    mm.close(1, 0.0)
    assert all(isinstance(o, (Send, Disconnect)) for o in mm.outputs())
