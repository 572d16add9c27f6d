"""quictun/proto/offer.py: the relay-carried messages, their payloads, and one whole
protocol-2 exchange driven through them as the two peers would (with a hostile relay)."""

from __future__ import annotations

import json
import os
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519
from hypothesis import given, settings
from hypothesis import strategies as st

from quictun.proto import offer, pake
from quictun.proto.offer import (
    Answer,
    CandidateUpdate,
    ClientHello,
    Data,
    Offer,
    OfferError,
    ServerHello,
    TicketGrant,
)

NOW = 1_750_000_000_000
CANDS_C = ("host 192.168.1.20 40001", "srflx 198.51.100.7 40001")
CANDS_S = ("host 10.0.0.5 50000", "host fd00::5 50000", "srflx 203.0.113.9 50000")
SECRET = "a-ticket-secret-of-any-length"


def wire(obj: dict[str, Any]) -> Any:
    """What the relay forwards: compact JSON text, parsed again at the far end."""
    return json.loads(json.dumps(obj, separators=(",", ":")))


# -- the messages --------------------------------------------------------------------------
def test_messages_round_trip() -> None:
    o = Offer("connect", b"A" + os.urandom(32), os.urandom(pake.HINT_SIZE))
    assert offer.decode_offer(wire(o.to_json())) == o
    assert offer.decode_offer(wire(Offer("pair", b"A" + bytes(32)).to_json())).hint is None
    a = Answer(b"B" + os.urandom(32), os.urandom(300))
    assert offer.decode_answer(wire(a.to_json())) == a
    d = Data(7, os.urandom(40))
    assert offer.decode_data(wire(d.to_json())) == d


V1_OFFER = {"v": 1, "pub": "ab" * 32, "nonce": "cd" * 16, "cands": ["host 1.2.3.4 5"],
            "mac": "ef" * 32}


def test_an_old_client_gets_the_upgrade_error() -> None:
    with pytest.raises(OfferError) as e:
        offer.decode_offer(V1_OFFER)
    assert e.value.code == offer.E_VERSION
    assert "upgrade quictun on the connecting machine" in e.value.message
    with pytest.raises(OfferError) as e:
        offer.decode_offer({k: v for k, v in V1_OFFER.items() if k != "v"})
    assert e.value.code == offer.E_VERSION  # protocol 1's shape without its "v"
    with pytest.raises(OfferError) as e:
        offer.decode_offer({"kind": "connect"})
    assert e.value.code == offer.E_MALFORMED  # no version and no protocol-1 shape


def test_a_newer_peer_names_the_machine_to_upgrade() -> None:
    """The reason travels to the other machine (a reject's text): it must name the
    machine by role, never "this machine"."""
    for decode, who in ((offer.decode_offer, "serving"), (offer.decode_answer, "connecting"),
                        (offer.decode_data, "receiving")):
        with pytest.raises(OfferError) as e:
            decode({"v": 3})
        assert e.value.code == offer.E_VERSION
        assert f"upgrade quictun on the {who} machine" in str(e.value), e.value


GOOD = Offer("connect", b"A" + bytes(32)).to_json()


@pytest.mark.parametrize("bad", [
    [], "offer", {**GOOD, "v": True}, {**GOOD, "v": 2.0}, {**GOOD, "extra": 1},
    {k: v for k, v in GOOD.items() if k != "pake"}, {**GOOD, "kind": "conect"},
    {**GOOD, "pake": GOOD["pake"][:-1]}, {**GOOD, "pake": GOOD["pake"] + "A"},
    {**GOOD, "hint": offer.b64(bytes(pake.HINT_SIZE))[:-1] + "B"},  # stray bits: not canonical
    {**GOOD, "pake": "+" + GOOD["pake"][1:]}, {**GOOD, "hint": "AAAA"},
    {**GOOD, "pake": 12}, {**GOOD, "kind": None},
])
def test_malformed_offers(bad: Any) -> None:
    with pytest.raises(OfferError) as e:
        offer.decode_offer(bad)
    assert e.value.code == offer.E_MALFORMED


@pytest.mark.parametrize("bad", [
    {"v": 2, "n": -1, "box": "A" * 24}, {"v": 2, "n": True, "box": "A" * 24},
    {"v": 2, "n": 1 << 32, "box": "A" * 24}, {"v": 2, "n": 0, "box": "AAAA"},
    {"v": 2, "n": 0}, {"v": 2, "n": 0, "box": "A" * 24, "x": 0},
])
def test_malformed_data(bad: Any) -> None:
    with pytest.raises(OfferError, match="malformed"):
        offer.decode_data(bad)


# -- payloads --------------------------------------------------------------------------------
PAYLOADS = [
    ServerHello("ab" * 32, CANDS_S, NOW),
    ServerHello("ab" * 32, (), NOW, os.urandom(32)),
    ClientHello(os.urandom(32), CANDS_C, NOW),
    CandidateUpdate(CANDS_C),
    TicketGrant("qt2aaaa"),
]


@pytest.mark.parametrize("p", PAYLOADS, ids=lambda p: type(p).__name__)
def test_payloads_round_trip_padded(p: offer.Payload) -> None:
    raw = offer.encode_payload(p)
    assert len(raw) % offer.PAD == 0
    assert offer.decode_payload(raw, type(p)) == p
    others = [t for t in (ServerHello, ClientHello, CandidateUpdate, TicketGrant)
              if t is not type(p)]
    with pytest.raises(OfferError, match="unexpected type"):
        offer.decode_payload(raw, *others)


def test_padding_hides_the_number_of_candidates() -> None:
    sizes = {len(offer.encode_payload(ClientHello(bytes(32), CANDS_C[:k], NOW)))
             for k in range(3)}
    assert sizes == {offer.PAD}


@pytest.mark.parametrize("raw", [
    b'{"t":"server","fp":"' + b"AB" * 32 + b'","cands":[],"ts":1}',
    b'{"t":"server","fp":"' + b"ab" * 32 + b'","cands":[],"ts":NaN}',
    b'{"t":"server","fp":"' + b"ab" * 32 + b'","cands":[],"ts":1.5}',
    b'{"t":"client","pub":"AAAA","cands":[],"ts":1}',
    b'{"t":"cands","cands":["a\\u0000b"]}',
    b'{"t":"cands","cands":' + json.dumps(["host 1.2.3.4 5"] * 33).encode() + b"}",
    b'{"t":"ticket","ticket":""}', b'{"t":["list"]}', b"[1]", b"\xff", b"{",
])
def test_malformed_payloads(raw: bytes) -> None:
    with pytest.raises(OfferError, match="malformed"):
        offer.decode_payload(raw, ServerHello, ClientHello, CandidateUpdate, TicketGrant)


def test_freshness_window() -> None:
    offer.check_fresh(NOW - offer.SKEW_MS, NOW)
    offer.check_fresh(NOW + offer.SKEW_MS, NOW)
    for ts, word in [(NOW - offer.SKEW_MS - 1, "behind"), (NOW + offer.SKEW_MS + 1, "ahead")]:
        with pytest.raises(OfferError, match=word) as e:
            offer.check_fresh(ts, NOW)
        assert e.value.code == offer.E_STALE


# -- fuzzing: only OfferError escapes ------------------------------------------------------
JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=40),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                 max_size=5),
    max_leaves=12)
FIELDS = st.fixed_dictionaries({"v": st.sampled_from([2, 1, 3, "2", None])}, optional={
    "kind": st.sampled_from(["connect", "pair", "x"]), "pake": st.text(max_size=60),
    "hint": st.text(max_size=10), "box": st.text(max_size=60), "n": JSON})


@settings(max_examples=300, deadline=None)
@given(st.one_of(JSON, FIELDS))
def test_message_decoders_raise_only_offer_error(obj: Any) -> None:
    for decode in (offer.decode_offer, offer.decode_answer, offer.decode_data):
        try:
            decode(obj)
        except OfferError as e:
            assert e.code in (offer.E_VERSION, offer.E_MALFORMED) and e.message


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.binary(max_size=300), JSON.map(lambda o: json.dumps(o).encode())))
def test_payload_decoder_raises_only_offer_error(raw: bytes) -> None:
    try:
        offer.decode_payload(raw, ServerHello, ClientHello, CandidateUpdate, TicketGrant)
    except OfferError as e:
        assert e.code == offer.E_MALFORMED


CAND = st.from_regex(r"[ -~]{1,128}", fullmatch=True)


@settings(max_examples=100, deadline=None)
@given(st.lists(CAND, max_size=offer.MAX_CANDIDATES), st.integers(0, (1 << 53) - 1))
def test_generated_payloads_round_trip(cands: list[str], ts: int) -> None:
    for p in (ClientHello(bytes(32), tuple(cands), ts), CandidateUpdate(tuple(cands))):
        assert offer.decode_payload(offer.encode_payload(p), type(p)) == p


# -- one whole exchange, as the two peers run it ---------------------------------------------
SERVER_FP = "5e" * 32
BOX_PRIV, BOX_PUB = pake.box_keypair(os.urandom(32))
CLIENT_ID = ed25519.Ed25519PrivateKey.generate()


def client_offer(secret: str = SECRET) -> tuple[pake.Started, dict[str, Any]]:
    started = pake.start(pake.prepare(secret, "home", "connect", "client"), os.urandom(64))
    hint = pake.seal_hint(box_public=BOX_PUB, name="home", message=started.message,
                          identity=CLIENT_ID, ts_ms=NOW, rand=os.urandom(32))
    return started, Offer("connect", started.message, hint).to_json()


def server_answer(offer_obj: Any, secret: str = SECRET,
                  ) -> tuple[pake.SessionKeys, pake.Hint | None, dict[str, Any]]:
    o = offer.decode_offer(offer_obj)
    hint = None
    if o.hint is not None:
        hint = pake.open_hint(box_private=BOX_PRIV, name="home", message=o.pake, hint=o.hint)
        offer.check_fresh(hint.ts_ms, NOW)
    # the server prepares the secret for the kind the offer names (bound into the keys)
    started = pake.start(pake.prepare(secret, "home", o.kind, "server"), os.urandom(64))
    keys = pake.finish(started, o.pake, o.hint or b"")
    box = keys.seal(0, offer.encode_payload(ServerHello(SERVER_FP, CANDS_S, NOW)))
    return keys, hint, Answer(started.message, box).to_json()


def client_confirm(started: pake.Started, sent_hint: bytes, answer_obj: Any,
                   ) -> tuple[pake.SessionKeys, ServerHello, dict[str, Any]]:
    a = offer.decode_answer(answer_obj)
    keys = pake.finish(started, a.pake, sent_hint)
    hello = offer.decode_payload(keys.open(0, a.box), ServerHello)
    assert isinstance(hello, ServerHello)
    offer.check_fresh(hello.ts_ms, NOW)
    pub = CLIENT_ID.public_key().public_bytes_raw()
    box = keys.seal(0, offer.encode_payload(ClientHello(pub, CANDS_C, NOW)))
    return keys, hello, Data(0, box).to_json()


def server_confirm(keys: pake.SessionKeys, data_obj: Any) -> ClientHello:
    d = offer.decode_data(data_obj)
    hello = offer.decode_payload(keys.open(d.n, d.box), ClientHello)
    assert isinstance(hello, ClientHello) and d.n == 0
    offer.check_fresh(hello.ts_ms, NOW)
    return hello


def test_whole_exchange_and_what_the_relay_sees() -> None:
    started, o = client_offer()
    sent_hint = offer.decode_offer(o).hint or b""
    ks, hint, a = server_answer(wire(o))
    assert hint is not None and hint.client_public == CLIENT_ID.public_key().public_bytes_raw()
    kc, shello, d = client_confirm(started, sent_hint, wire(a))
    assert shello.fingerprint == SERVER_FP and shello.candidates == CANDS_S
    chello = server_confirm(ks, wire(d))
    assert chello.candidates == CANDS_C and chello.public == hint.client_public
    assert kc.punch_to_server == ks.punch_to_server
    relay_view = json.dumps([o, a, d])
    secrets_of_the_peers = [*CANDS_C, *CANDS_S, "192.168.1.20", "10.0.0.5", "fd00::5",
                            "203.0.113.9", SERVER_FP, SECRET,
                            CLIENT_ID.public_key().public_bytes_raw().hex(),
                            offer.b64(CLIENT_ID.public_key().public_bytes_raw()),
                            offer.b64(BOX_PUB), BOX_PUB.hex()]
    assert not [s for s in secrets_of_the_peers if s in relay_view]


def test_wrong_secret_fails_on_both_sides_through_the_codec() -> None:
    started, o = client_offer("sunshine42")
    _, _, a = server_answer(wire(o))
    with pytest.raises(pake.PakeError, match="authentication failed"):
        client_confirm(started, offer.decode_offer(o).hint or b"", wire(a))
    # and a client that guessed wrong cannot make a box the server accepts
    started, o = client_offer(SECRET)
    ks, _, a = server_answer(wire(o), secret="the real one")
    guessed = pake.finish(started, offer.decode_answer(a).pake, offer.decode_offer(o).hint or b"")
    forged = Data(0, guessed.seal(0, offer.encode_payload(ClientHello(bytes(32), (), NOW))))
    with pytest.raises(pake.PakeError, match="authentication failed"):
        server_confirm(ks, wire(forged.to_json()))


def _rewrite(obj: dict[str, Any], field: str) -> dict[str, Any]:
    raw = offer._unb64(obj[field], field)
    i = len(raw) // 2
    return {**obj, field: offer.b64(raw[:i] + bytes([raw[i] ^ 0x80]) + raw[i + 1:])}


@pytest.mark.parametrize("where", ["offer.pake", "offer.hint", "answer.pake", "answer.box",
                                   "data.box", "data.n", "offer.kind"])
def test_a_relay_that_rewrites_anything_is_caught(where: str) -> None:
    started, o = client_offer()
    sent_hint = offer.decode_offer(o).hint or b""
    msg, field = where.split(".")
    if msg == "offer":
        o = {**o, "kind": "pair"} if field == "kind" else _rewrite(o, field)
    with pytest.raises((pake.PakeError, OfferError)):
        ks, _, a = server_answer(wire(o))
        if msg == "answer":
            a = _rewrite(a, field)
        kc, _, d = client_confirm(started, sent_hint, wire(a))
        if msg == "data":
            d = {**d, "n": 1} if field == "n" else _rewrite(d, field)
        server_confirm(ks, wire(d))


def test_a_replayed_offer_gets_nowhere() -> None:
    """A recorded offer sent again: the server answers with fresh keys the replayer
    cannot use, and a recorded client box does not open under them."""
    started, o = client_offer()
    sent_hint = offer.decode_offer(o).hint or b""
    ks1, _, a1 = server_answer(wire(o))
    _, _, d1 = client_confirm(started, sent_hint, wire(a1))
    ks2, _, _ = server_answer(wire(o))  # the replay
    with pytest.raises(pake.PakeError):
        server_confirm(ks2, wire(d1))
    assert server_confirm(ks1, wire(d1)).candidates == CANDS_C
