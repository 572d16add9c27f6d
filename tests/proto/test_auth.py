"""The secret-keyed MACs bind what they claim to bind."""

from __future__ import annotations

from quictun.proto import auth


def test_root_key_depends_on_secret_and_name() -> None:
    r = auth.root_key("secret", "home")
    assert r == auth.root_key("secret", "home")
    assert r != auth.root_key("secret", "office")
    assert r != auth.root_key("Secret", "home")
    assert len(r) == 32


def test_relay_cannot_merge_or_split_candidates() -> None:
    root = auth.root_key("s", "n")
    a = auth.offer_mac(root, "nonce", "pub", ["host 10.0.0.1 1", "srflx 1.2.3.4 2"])
    assert a != auth.offer_mac(root, "nonce", "pub", ["host 10.0.0.1 1\nsrflx 1.2.3.4 2"])
    assert a != auth.offer_mac(root, "nonce", "pub", ["host 10.0.0.1 1"])
    b = auth.answer_mac(root, "n1", "n2", "fp", "pub", ["x", "y"])
    assert b != auth.answer_mac(root, "n1", "n2", "fp", "pub", ["x\ny"])
    assert b != auth.answer_mac(root, "n1", "n2", "fp2", "pub", ["x", "y"])


def test_session_keys_differ_per_nonce_and_direction() -> None:
    root = auth.root_key("s", "n")
    k1 = auth.session_keys(root, "c1", "s1", "pub", "fp")
    k2 = auth.session_keys(root, "c2", "s1", "pub", "fp")
    assert k1.to_server != k1.to_client != k1.proof
    assert k1 != k2
    assert auth.check(auth.offer_mac(root, "n", "p", []), auth.offer_mac(root, "n", "p", []))
    assert not auth.check("00", 5)
