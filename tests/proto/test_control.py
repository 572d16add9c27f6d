"""The control protocol: the client's and the server's proofs, bound to the TLS channel,
and the server's gate (nothing passes before a valid proof, within limits)."""

from __future__ import annotations

import os

import pytest

from quictun.proto import pake
from quictun.proto.control import (
    PROOF_SIZE,
    Authenticated,
    ProofGate,
    Refused,
    check_server_proof,
    decode_candidates_update,
    encode_candidates,
    make_proof,
)
from quictun.proto.identity import Identity

SERVER_FP = "ab" * 32
CB = b"c" * 32  # a TLS channel binding


def keys_pair(secret: str = "s", server_secret: str = "s") -> tuple[pake.SessionKeys,
                                                                     pake.SessionKeys]:
    c = pake.start(pake.prepare(secret, "box", "connect", "client"), os.urandom(64))
    s = pake.start(pake.prepare(server_secret, "box", "connect", "server"), os.urandom(64))
    return pake.finish(c, s.message), pake.finish(s, c.message)


CLIENT_KEYS, SERVER_KEYS = keys_pair()


def gate(client: Identity, keys: pake.SessionKeys = SERVER_KEYS, **kw: object) -> ProofGate:
    args: dict = {"now": 0.0, "deadline": 10.0, "hold_limit": 100} | kw
    g = ProofGate(keys, SERVER_FP, client.public_bytes, **args)
    return g


def test_a_valid_proof_releases_what_was_held_in_order_and_the_server_proves_back() -> None:
    client = Identity.generate()
    g = gate(client)
    assert g.hold(4, b"\x00ssh", False) is None
    assert g.hold(8, b"\x00more", True) is None
    proof = make_proof(CLIENT_KEYS, CB, SERVER_FP, client)
    assert len(proof) == PROOF_SIZE
    assert g.control_data(proof[:50]) is None  # proofs may arrive in pieces
    assert g.control_data(proof[50:]) is None  # no TLS binding yet: nothing is decided
    verdict = g.set_binding(CB)
    assert isinstance(verdict, Authenticated)
    assert verdict.client_fp == client.fingerprint
    assert verdict.held == ((4, b"\x00ssh", False), (8, b"\x00more", True))
    assert check_server_proof(CLIENT_KEYS, verdict.reply, CB, SERVER_FP, client.fingerprint)
    assert not check_server_proof(CLIENT_KEYS, verdict.reply, b"x" * 32, SERVER_FP,
                                  client.fingerprint)  # another connection
    assert g.get_timer() is None and g.handle_timer(99.0) is None  # the deadline is gone


@pytest.mark.parametrize("tamper", ["another key", "wrong secret", "other channel",
                                    "byte flipped", "too long"])
def test_a_bad_proof_is_refused(tamper: str) -> None:
    client = Identity.generate()
    keys, cb = CLIENT_KEYS, CB
    if tamper == "wrong secret":
        keys = keys_pair("guess", "s")[0]
    elif tamper == "other channel":
        cb = b"d" * 32  # e.g. a relay that terminated QUIC on both sides
    proof = make_proof(keys, cb, SERVER_FP,
                       Identity.generate() if tamper == "another key" else client)
    if tamper == "byte flipped":
        raw = bytearray(proof)
        raw[100] ^= 1
        proof = bytes(raw)
    if tamper == "too long":
        proof += b"x"
    g = gate(client)
    g.set_binding(CB)
    g.hold(4, b"\x00x", False)
    verdict = g.control_data(proof)
    assert isinstance(verdict, Refused)
    assert g.control_data(make_proof(CLIENT_KEYS, CB, SERVER_FP, client)) is None  # no 2nd try


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
