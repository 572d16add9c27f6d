"""The offer/answer codec: round trips, and every way a relay or a guesser can get it wrong."""

from __future__ import annotations

import os

import pytest

from quictun.proto import auth
from quictun.proto.offer import Answer, Forged, Malformed, Offer, session_keys

ROOT = auth.root_key("s3cret", "box")
OTHER = auth.root_key("guess", "box")
PUB = bytes(range(32))


def offer() -> Offer:
    return Offer.create(PUB, ["host 198.19.1.2 4000", "srflx 198.18.0.11 4000"], os.urandom)


def test_round_trip_and_same_keys_on_both_sides() -> None:
    o = offer()
    got = Offer.from_wire(o.to_wire(ROOT), ROOT)
    assert got == o
    a = Answer.create("ab" * 32, ["host 198.19.2.2 5000"], os.urandom)
    assert Answer.from_wire(a.to_wire(ROOT, o), ROOT, o) == a
    assert session_keys(ROOT, o, a) == session_keys(ROOT, got, a)
    assert session_keys(ROOT, o, a) != session_keys(OTHER, o, a)


def test_wrong_secret_is_forged_not_malformed() -> None:
    with pytest.raises(Forged):
        Offer.from_wire(offer().to_wire(OTHER), ROOT)


@pytest.mark.parametrize("field, value", [
    ("pub", "00" * 32), ("nonce", "00" * 16), ("cands", ["host 203.0.113.9 1"]),
    ("cands", []), ("mac", "00" * 32),
])
def test_any_changed_offer_field_fails_the_mac(field: str, value: object) -> None:
    wire = offer().to_wire(ROOT)
    wire[field] = value
    with pytest.raises(Forged):
        Offer.from_wire(wire, ROOT)


@pytest.mark.parametrize("wire", [
    None, [], "offer", {}, {"pub": 1, "nonce": "n", "cands": []},
    {"pub": "p", "nonce": "n", "cands": [1]}, {"pub": "p", "nonce": None, "cands": []},
])
def test_malformed_offers(wire: object) -> None:
    with pytest.raises(Malformed):
        Offer.from_wire(wire, ROOT)


def test_a_key_that_is_not_32_bytes_is_malformed_even_with_a_valid_mac() -> None:
    for pub in ("zz" * 32, "ab" * 31):
        o = {"v": 1, "pub": pub, "nonce": "n", "cands": []}
        o["mac"] = auth.offer_mac(ROOT, "n", pub, [])
        with pytest.raises(Malformed):
            Offer.from_wire(o, ROOT)


@pytest.mark.parametrize("field, value", [
    ("fp", "cd" * 32), ("nonce", "11" * 16), ("cands", ["host 203.0.113.9 1"]),
    ("mac", "00" * 32),
])
def test_a_relay_that_rewrites_the_answer_is_caught(field: str, value: object) -> None:
    o = offer()
    wire = Answer.create("ab" * 32, [], os.urandom).to_wire(ROOT, o)
    wire[field] = value
    with pytest.raises(Forged):
        Answer.from_wire(wire, ROOT, o)


def test_an_answer_is_bound_to_its_offer() -> None:
    o1, o2 = offer(), offer()
    wire = Answer.create("ab" * 32, [], os.urandom).to_wire(ROOT, o1)
    with pytest.raises(Forged):
        Answer.from_wire(wire, ROOT, o2)  # replayed toward another offer
