"""Registration keys: one per name, stable for one identity, unlinkable by the relay."""

from __future__ import annotations

from pathlib import Path

from quictun.proto.identity import Identity, fingerprint_of_raw, raw_public
from quictun.store import load_or_create


def test_a_name_keeps_its_key_across_restarts(tmp_path: Path) -> None:
    first = load_or_create(tmp_path)
    again = load_or_create(tmp_path)  # the same machine after a restart
    assert raw_public(first.registration_key("home")) == raw_public(
        again.registration_key("home"))


def test_two_names_of_one_machine_have_unrelated_keys() -> None:
    ident = Identity.generate()
    keys = {raw_public(ident.registration_key(n)) for n in ("home", "work", "home.", "Home")}
    assert len(keys) == 4
    # none of them is, or names, the identity that tickets pin
    assert ident.public_bytes not in keys
    assert ident.fingerprint not in {fingerprint_of_raw(k) for k in keys}


def test_another_identity_gets_another_key_for_the_same_name() -> None:
    a, b = Identity.generate(), Identity.generate()
    assert raw_public(a.registration_key("home")) != raw_public(b.registration_key("home"))
