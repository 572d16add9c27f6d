"""The control protocol's server gate: nothing passes before a valid proof, within limits."""

from __future__ import annotations

import pytest

from quictun.proto import auth
from quictun.proto.control import (
    PROOF_SIZE,
    Authenticated,
    ProofGate,
    Refused,
    decode_candidates_update,
    encode_candidates,
    make_proof,
)
from quictun.proto.identity import Identity

KEYS = auth.session_keys(auth.root_key("s", "box"), "cn", "sn", "pub", "fp")
SERVER_FP = "ab" * 32


def gate(client: Identity, **kw: object) -> ProofGate:
    args: dict = {"now": 0.0, "deadline": 10.0, "hold_limit": 100} | kw
    return ProofGate(KEYS, SERVER_FP, client.public_bytes, **args)


def test_a_valid_proof_releases_what_was_held_in_order() -> None:
    client = Identity.generate()
    g = gate(client)
    assert g.hold(4, b"\x00ssh", False) is None
    assert g.hold(8, b"\x00more", True) is None
    proof = make_proof(KEYS, SERVER_FP, client)
    assert len(proof) == PROOF_SIZE
    assert g.control_data(proof[:50]) is None  # proofs may arrive in pieces
    verdict = g.control_data(proof[50:])
    assert isinstance(verdict, Authenticated)
    assert verdict.client_fp == client.fingerprint
    assert verdict.held == ((4, b"\x00ssh", False), (8, b"\x00more", True))
    assert g.get_timer() is None and g.handle_timer(99.0) is None  # the deadline is gone


@pytest.mark.parametrize("tamper", ["another key", "other session", "byte flipped"])
def test_a_bad_proof_is_refused(tamper: str) -> None:
    client = Identity.generate()
    if tamper == "another key":
        proof = make_proof(KEYS, SERVER_FP, Identity.generate())
    elif tamper == "other session":
        other = auth.session_keys(auth.root_key("s", "box"), "cn2", "sn", "pub", "fp")
        proof = make_proof(other, SERVER_FP, client)
    else:
        raw = bytearray(make_proof(KEYS, SERVER_FP, client))
        raw[100] ^= 1
        proof = bytes(raw)
    g = gate(client)
    g.hold(4, b"\x00x", False)
    verdict = g.control_data(proof)
    assert isinstance(verdict, Refused) and "did not verify" in verdict.reason
    assert g.control_data(make_proof(KEYS, SERVER_FP, client)) is None  # done: no 2nd try


def test_the_deadline_and_the_hold_limit() -> None:
    client = Identity.generate()
    g = gate(client)
    assert g.get_timer() == 10.0
    assert g.handle_timer(9.9) is None
    late = g.handle_timer(10.0)
    assert isinstance(late, Refused) and "within 10 s" in late.reason
    g = gate(client)
    assert g.hold(4, b"x" * 60, False) is None
    assert isinstance(g.hold(8, b"x" * 60, False), Refused)


def test_candidate_updates_codec() -> None:
    assert decode_candidates_update(encode_candidates(["host 1.2.3.4 5"])) == ["host 1.2.3.4 5"]
    for junk in (b"", b"{", b'{"a": 1}', b"[1, 2]", b"\xff"):
        assert decode_candidates_update(junk) == []
    assert len(decode_candidates_update(encode_candidates(["x"] * 100))) == 32
