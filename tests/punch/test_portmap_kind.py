"""The ``portmap`` candidate kind: its wire form, its rank, and what an older peer does
with it (skips it, keeps the other candidates)."""

from __future__ import annotations

import ipaddress

import pytest

from quictun.proto import addr
from quictun.proto.addr import Candidate, decode_candidates
from quictun.punch.selection import CandidateTable
from quictun.punch.types import (
    RANK_HOST_IPV4,
    RANK_IPV6,
    RANK_LAN,
    RANK_PORTMAP,
    RANK_REFLEXIVE,
    rank_of,
)

MAPPED = ("198.51.100.7", 40000)


def test_round_trip() -> None:
    text = "portmap 198.51.100.7 40000"
    assert Candidate.decode(text) == Candidate(MAPPED, "portmap")
    assert Candidate.decode(text).encode() == text


def test_rank_between_routed_host_and_reflexive() -> None:
    assert RANK_HOST_IPV4 < RANK_PORTMAP < RANK_REFLEXIVE
    assert rank_of(MAPPED, "portmap", []) == RANK_PORTMAP
    assert rank_of(MAPPED, "srflx", []) == RANK_REFLEXIVE
    assert rank_of(MAPPED, "prflx", []) == RANK_REFLEXIVE
    assert rank_of(("2001:db8::7", 40000), "portmap", []) == RANK_IPV6  # IPv6 first
    lan = [ipaddress.ip_network("10.0.0.0/8")]
    assert rank_of(("10.0.0.7", 1), "portmap", lan) == RANK_LAN


def test_a_mapped_address_outranks_the_same_address_learned_otherwise() -> None:
    table = CandidateTable([])
    c, _ = table.signalled(Candidate(MAPPED, "srflx"), None)
    assert c is not None and (c.kind, c.rank) == ("srflx", RANK_REFLEXIVE)
    c, _ = table.signalled(Candidate(MAPPED, "portmap"), None)
    assert c is not None and (c.kind, c.rank) == ("portmap", RANK_PORTMAP)
    c, _ = table.signalled(Candidate(MAPPED, "srflx"), None)  # a worse kind never wins
    assert c is not None and (c.kind, c.rank) == ("portmap", RANK_PORTMAP)
    c, _ = table.signalled(Candidate(MAPPED, "host"), None)  # a better one does
    assert c is not None and (c.kind, c.rank) == ("host", RANK_HOST_IPV4)


def test_an_older_peer_skips_the_kind_and_keeps_the_rest(
        monkeypatch: pytest.MonkeyPatch) -> None:
    wire = ["host 192.0.2.5 4000", "portmap 198.51.100.7 40000", "srflx 198.51.100.7 4001"]
    assert [c.kind for c in decode_candidates(wire)] == ["host", "portmap", "srflx"]
    # the decoder of a peer from before this kind existed
    monkeypatch.setattr(addr, "CANDIDATE_KINDS", ("host", "srflx", "prflx"))
    assert [c.kind for c in decode_candidates(wire)] == ["host", "srflx"]
