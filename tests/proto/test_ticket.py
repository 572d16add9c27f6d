"""quictun/proto/ticket.py: format 2 (checksum, tolerant parsing) and format 1 still read."""

from __future__ import annotations

import base64
import json
import string

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from quictun.proto import ticket
from quictun.proto.ticket import Ticket, TicketError

SAMPLE = Ticket(url="wss://relay.example.net:8765/", name="home",
                secret="kX9_3vQpZt0yL2mN8rB4cD6fH1jK5sW7uE-aG0iO3qM",
                fingerprint="0f1e2d3c4b5a69788796a5b4c3d2e1f00f1e2d3c4b5a69788796a5b4c3d2e1f0",
                box_key=bytes(range(32)))


def test_round_trip_with_and_without_a_box_key() -> None:
    for t in (SAMPLE, Ticket(SAMPLE.url, SAMPLE.name, SAMPLE.secret, SAMPLE.fingerprint)):
        text = t.encode()
        assert text.startswith("qt2") and text == text.lower() and text.isalnum()
        assert ticket.decode(text) == t
        assert ticket.looks_like_ticket(text)


def test_the_secret_stays_out_of_repr() -> None:
    assert SAMPLE.secret not in repr(SAMPLE)


@pytest.mark.parametrize("mangle", [
    lambda s: s.upper(),
    lambda s: f'"{s}"', lambda s: f"'{s}'", lambda s: f"\u201c{s}\u201d", lambda s: f"`{s}`",
    lambda s: f"  {s}\n", lambda s: "\n".join(s[i:i + 64] for i in range(0, len(s), 64)),
    lambda s: "\r\n".join(s[i:i + 30] for i in range(0, len(s), 30)) + "\r\n",
    lambda s: " ".join(s[i:i + 8] for i in range(0, len(s), 8)),
    lambda s: f"<{s}>",
    lambda s: s + "====",
])
def test_copying_damage_is_forgiven(mangle: object) -> None:
    assert ticket.decode(mangle(SAMPLE.encode())) == SAMPLE  # type: ignore[operator]


def test_every_single_character_substitution_is_detected() -> None:
    """Each position, each printable ASCII character: the result is the same ticket
    (only a change of case) or a TicketError, never another ticket; inside the body
    (after "qt2") the error is the checksum's."""
    text = SAMPLE.encode()
    alphabet = string.printable
    tried = damaged = 0
    for i, original in enumerate(text):
        for c in alphabet:
            if c == original:
                continue
            typo = text[:i] + c + text[i + 1:]
            tried += 1
            if typo.lower() == text:
                assert ticket.decode(typo) == SAMPLE
                continue
            with pytest.raises(TicketError) as e:
                ticket.decode(typo)
            if i >= 3 and c in "abcdefghijklmnopqrstuvwxyz234567":
                assert "damaged (checksum)" in str(e.value), (i, c)
                damaged += 1
    assert tried == len(text) * (len(alphabet) - 1)
    assert damaged == (len(text) - 3) * 31


def test_format_1_tickets_are_still_read() -> None:
    # format 1, as quictun 0.1 wrote it: qt1 + base32 of {"u", "n", "s", "f"}
    raw = json.dumps({"u": "ws://127.0.0.1:8765/", "n": "home", "s": "s3cret",
                      "f": "ab" * 32}, separators=(",", ":")).encode()
    v1 = "qt1" + base64.b32encode(raw).decode().rstrip("=").lower()
    assert v1.startswith("qt1")
    t = ticket.decode(v1)
    assert (t.url, t.name, t.secret, t.fingerprint, t.box_key) == (
        "ws://127.0.0.1:8765/", "home", "s3cret", "ab" * 32, None)
    assert ticket.decode(v1.upper()) == t
    assert ticket.decode(t.encode()) == t  # and written again as format 2
    with pytest.raises(TicketError, match="damaged"):
        ticket.decode(v1[:-5])


@pytest.mark.parametrize("text,match", [
    ("qt3" + SAMPLE.encode()[3:], "format version 3.*upgrade quictun"),
    ("hello", "not a quictun ticket"), ("", "not a quictun ticket"),
    ("qt2" + "a" * 60, "damaged \\(checksum\\)"),
    (SAMPLE.encode()[:-1] + "0", "contains '0'"),
    (SAMPLE.encode()[:50] + "!" + SAMPLE.encode()[50:], "contains '!'"),
])
def test_refusals_say_why(text: str, match: str) -> None:
    with pytest.raises(TicketError, match=match):
        ticket.decode(text)


@pytest.mark.parametrize("bad", [
    dict(url="http://relay"), dict(url="wss://"), dict(name="a b"), dict(name=".."),
    dict(secret=""), dict(fingerprint="AB" * 32), dict(box_key=b"short"),
    dict(url="wss://r/" + "x" * 300),
])
def test_encode_refuses_what_decode_would(bad: dict[str, object]) -> None:
    fields = {"url": SAMPLE.url, "name": SAMPLE.name, "secret": SAMPLE.secret,
              "fingerprint": SAMPLE.fingerprint, "box_key": None, **bad}
    with pytest.raises(TicketError):
        Ticket(**fields).encode()  # type: ignore[arg-type]


@settings(max_examples=400, deadline=None)
@given(st.one_of(st.text(max_size=300),
                 st.text(alphabet="abcdefghijklmnopqrstuvwxyz234567", max_size=300).map(
                     lambda s: "qt2a" + s),
                 st.integers(0, 400).flatmap(lambda i: st.just(SAMPLE.encode()[:i]))))
def test_decode_raises_only_ticket_error(text: str) -> None:
    try:
        t = ticket.decode(text)
    except TicketError as e:
        assert str(e) and "\n" not in str(e)
    else:
        assert t == SAMPLE or t.encode()  # whatever decodes re-encodes


TEXT = st.text(alphabet=st.characters(codec="utf-8", exclude_categories=("Cs", "Cc")),
               min_size=1, max_size=40)


@settings(max_examples=100, deadline=None)
@given(st.from_regex(r"[A-Za-z0-9_-]{1,64}", fullmatch=True).filter(lambda n: n.strip(".")),
       TEXT.filter(lambda s: s.isprintable() and len(s.encode()) <= 255),
       st.binary(min_size=32, max_size=32), st.none() | st.binary(min_size=32, max_size=32))
def test_any_valid_ticket_round_trips(name: str, secret: str, fp: bytes,
                                      box: bytes | None) -> None:
    t = Ticket("wss://relay.example:443/", name, secret, fp.hex(), box)
    assert ticket.decode(t.encode()) == t
