"""What quictun keeps on disk: the generated secret, stored tickets, name checks first."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from quictun import store
from quictun.proto import ticket as tk

T = tk.Ticket(url="wss://relay.example.org/", name="laptop", secret="s3cret-Ü",
              fingerprint="ab" * 32)


def test_stored_secret_persists(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("QUICTUN_HOME", str(tmp_path))
    a = store.stored_secret("box")
    assert len(a) >= 40
    assert store.stored_secret("box") == a
    assert store.stored_secret("other") != a
    path = store.secret_path("box")
    assert path == tmp_path / "secrets" / "box"
    assert path.stat().st_mode & 0o077 == 0


@pytest.mark.parametrize("name", ["..", ".", "...", "", "a/b", "x" * 65, "a b"])
def test_bad_names_refused_before_the_filesystem(
        name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("QUICTUN_HOME", str(tmp_path / "home"))
    with pytest.raises(tk.InvalidName, match="not a valid name"):
        tk.check_name(name)
    with pytest.raises(tk.InvalidName):
        store.stored_secret(name)
    with pytest.raises(tk.InvalidName):
        store.store_ticket(tk.Ticket(url="ws://x/", name=name, secret="s", fingerprint="ab"))
    with pytest.raises(tk.InvalidName):
        store.load_ticket(name)
    assert not (tmp_path / "home").exists()


@pytest.mark.parametrize("name", ["a", "a.b", ".hidden", "x" * 64, "A-9_."])
def test_good_names(name: str) -> None:
    assert tk.check_name(name) == name


def test_store_and_load(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("QUICTUN_HOME", str(tmp_path))
    assert store.load_ticket("laptop") is None
    path = store.store_ticket(T)
    assert path == store.ticket_path("laptop") == tmp_path / "tickets" / "laptop"
    assert path.stat().st_mode & 0o077 == 0
    assert store.load_ticket("laptop") == T
    other = tk.Ticket(url="ws://x/", name="laptop", secret="new", fingerprint="cd" * 32)
    store.store_ticket(other)
    assert store.load_ticket("laptop") == other
    # a file that holds another name's ticket (copied by hand) is refused
    (tmp_path / "tickets" / "desk").write_text(T.encode())
    with pytest.raises(store.ExposedFile, match="readable by other users.*chmod 600"):
        store.load_ticket("desk")
    (tmp_path / "tickets" / "desk").chmod(0o600)
    with pytest.raises(tk.TicketError, match="is for 'laptop', not 'desk'"):
        store.load_ticket("desk")
    (tmp_path / "tickets" / "bad").write_text("junk")
    (tmp_path / "tickets" / "bad").chmod(0o600)
    with pytest.raises(tk.TicketError, match="stored ticket .*bad.*not a quictun ticket"):
        store.load_ticket("bad")


def test_known_clients_survive_a_restart(tmp_path: Path,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("QUICTUN_HOME", str(tmp_path))
    known = store.KnownClients("box")
    assert "ab" * 32 not in known
    known.add("ab" * 32)
    known.add("cd" * 32)
    known.add("ab" * 32)  # once
    path = tmp_path / "known" / "box"
    assert path.stat().st_mode & 0o077 == 0
    assert path.read_text() == "ab" * 32 + "\n" + "cd" * 32 + "\n"
    path.write_text(path.read_text() + "garbage\n" + "EF" * 32 + "\n")
    again = store.KnownClients("box")
    assert list(again.fingerprints) == ["ab" * 32, "cd" * 32]
    assert "cd" * 32 in again and "ab" * 32 not in store.KnownClients("other")


def test_write_private_never_writes_through_a_planted_symlink(tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.write_text("keep me")
    planted = tmp_path / "secret"
    planted.symlink_to(victim)  # someone planted a link where the secret goes
    old = os.umask(0)  # even with a permissive umask, the file is the owner's only
    try:
        store.write_private(planted, b"the secret")
    finally:
        os.umask(old)
    assert victim.read_text() == "keep me"
    assert not planted.is_symlink() and planted.read_bytes() == b"the secret"
    assert stat.S_IMODE(planted.stat().st_mode) == 0o600
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []
