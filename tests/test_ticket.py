"""Tickets: round trip, damage, versions, and the persisted generated secret."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest

from quictun import ticket as tk

T = tk.Ticket(url="wss://relay.example.org/", name="laptop", secret="s3cret-Ü",
              fingerprint="ab" * 32)


def test_round_trip() -> None:
    text = T.encode()
    assert text.startswith("qt1")
    assert tk.looks_like_ticket(text)
    assert text == text.strip() and " " not in text
    assert tk.decode(text) == T
    assert tk.decode(f"  {text}\n") == T


@pytest.mark.parametrize("text", ["", "hello", "qt", "QT1ABC", "qt1abc!def", "xx1abcdef"])
def test_not_a_ticket(text: str) -> None:
    with pytest.raises(tk.TicketError, match="not a quictun ticket"):
        tk.decode(text)


def test_damaged() -> None:
    text = T.encode()
    for bad in (text[:-7], text[:20], text[:3] + "a" * 5 + text[8:]):
        with pytest.raises(tk.TicketError, match="damaged"):
            tk.decode(bad)


def test_missing_or_wrong_typed_field_is_damaged() -> None:
    for obj in ({"u": "ws://x/", "n": "a", "s": "b"},
                {"u": "ws://x/", "n": "a", "s": 5, "f": "c"}, [1, 2]):
        raw = json.dumps(obj).encode()
        text = "qt1" + base64.b32encode(raw).decode().rstrip("=").lower()
        with pytest.raises(tk.TicketError, match="damaged"):
            tk.decode(text)


def test_newer_version_is_named() -> None:
    text = "qt2" + T.encode()[3:]
    with pytest.raises(tk.TicketError, match="format version 2.*upgrade"):
        tk.decode(text)


def test_stored_secret_persists(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("QUICTUN_HOME", str(tmp_path))
    a = tk.stored_secret("box")
    assert len(a) >= 40
    assert tk.stored_secret("box") == a
    assert tk.stored_secret("other") != a
    path = tk.secret_path("box")
    assert path == tmp_path / "secrets" / "box"
    assert path.stat().st_mode & 0o077 == 0
