"""quictun/proto/pake.py: SPAKE2 exchange, key schedule, boxes, proofs, hints."""

from __future__ import annotations

import hashlib
import hmac
import os

import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519
from hypothesis import given, settings
from hypothesis import strategies as st
from spake2 import SPAKE2_A, SPAKE2_B

from quictun.proto import pake
from quictun.proto.pake import PakeError

SECRET = "correct horse battery staple"


def _pair(secret_c: str = SECRET, secret_s: str = SECRET, name_c: str = "home",
          name_s: str = "home", kind_c: str = pake.KIND_CONNECT,
          kind_s: str = pake.KIND_CONNECT, hint: bytes = b"",
          ) -> tuple[pake.SessionKeys, pake.SessionKeys]:
    c = pake.start(pake.prepare(secret_c, name_c, kind_c, "client"), os.urandom(64))
    s = pake.start(pake.prepare(secret_s, name_s, kind_s, "server"), os.urandom(64))
    return pake.finish(c, s.message, hint), pake.finish(s, c.message, hint)


def _agree(kc: pake.SessionKeys, ks: pake.SessionKeys) -> bool:
    """Both directions' boxes open on the other side (the key confirmation)."""
    try:
        return (ks.open(0, kc.seal(0, b"c")) == b"c") and (kc.open(0, ks.seal(0, b"s")) == b"s")
    except PakeError:
        return False


def _fails_both_ways(kc: pake.SessionKeys, ks: pake.SessionKeys) -> None:
    with pytest.raises(PakeError, match="authentication failed"):
        kc.open(0, ks.seal(0, b"server hello"))
    with pytest.raises(PakeError, match="authentication failed"):
        ks.open(0, kc.seal(0, b"client hello"))


# -- agreement ---------------------------------------------------------------------------
@pytest.mark.parametrize("kind", pake.KINDS)
def test_same_secret_agrees_and_boxes_open_in_order(kind: str) -> None:
    kc, ks = _pair(kind_c=kind, kind_s=kind)
    assert kc.transcript == ks.transcript
    assert kc.punch_to_server == ks.punch_to_server != kc.punch_to_client
    assert kc.punch_to_client == ks.punch_to_client
    for n in range(3):
        assert ks.open(n, kc.seal(n, b"to server %d" % n)) == b"to server %d" % n
        assert kc.open(n, ks.seal(n, b"to client %d" % n)) == b"to client %d" % n


def test_a_box_opens_only_under_its_own_number_and_direction() -> None:
    kc, ks = _pair()
    box = kc.seal(1, b"x")
    with pytest.raises(PakeError):
        ks.open(0, box)  # another counter: replay or reordering
    with pytest.raises(PakeError):
        kc.open(1, box)  # reflected back to its sender
    with pytest.raises(PakeError):
        ks.open(-1, box)


def test_every_exchange_has_fresh_keys() -> None:
    a, _ = _pair()
    b, _ = _pair()
    assert a.transcript != b.transcript and a.punch_to_server != b.punch_to_server


def test_messages_and_keys_match_the_spake2_library() -> None:
    """Same randomness: our messages equal SPAKE2_A/SPAKE2_B's, and our keys follow the
    documented schedule from the library's own key (so the cached blinding is exact)."""
    pc = pake.prepare(SECRET, "home", pake.KIND_CONNECT, "client")
    ps = pake.prepare(SECRET, "home", pake.KIND_CONNECT, "server")
    ra, rb = os.urandom(64), os.urandom(64)
    ours_c, ours_s = pake.start(pc, ra), pake.start(ps, rb)
    lib_a = SPAKE2_A(pc._pw, idA=pc.id_a, idB=pc.id_b, entropy_f=lambda n: ra)
    lib_b = SPAKE2_B(ps._pw, idA=ps.id_a, idB=ps.id_b, entropy_f=lambda n: rb)
    ma, mb = lib_a.start(), lib_b.start()
    assert (ma, mb) == (ours_c.message, ours_s.message)
    key = lib_a.finish(mb)
    assert key == lib_b.finish(ma)
    keys = pake.finish(ours_c, mb)

    def lp(*parts: bytes) -> bytes:
        return b"".join(len(p).to_bytes(4, "big") + p for p in parts)

    th = hashlib.sha256(lp(b"quictun/2 transcript", b"connect", b"home", ma, b"", mb)).digest()
    prk = hmac.new(th, key, hashlib.sha256).digest()
    expect = hmac.new(prk, b"quictun/2 punch to server\x01", hashlib.sha256).digest()
    assert keys.transcript == th and keys.punch_to_server == expect


# -- a wrong secret, name or kind: confirmation fails on both sides ------------------------
@pytest.mark.parametrize("change", [
    {"secret_s": SECRET + "!"},
    {"secret_s": "sunshine42"},
    {"name_s": "home2"},
    {"kind_s": pake.KIND_PAIR},
])
def test_any_difference_fails_key_confirmation_on_both_sides(change: dict[str, str]) -> None:
    kc, ks = _pair(**change)
    assert kc.transcript == ks.transcript or change.get("name_s") or change.get("kind_s")
    _fails_both_ways(kc, ks)


# -- tampering with any message ----------------------------------------------------------
def _tampered(message: bytes, i: int) -> bytes:
    return message[:i] + bytes([message[i] ^ 0x01]) + message[i + 1:]


@pytest.mark.parametrize("who", ["client", "server"])
def test_changing_any_byte_of_a_pake_message_fails(who: str) -> None:
    """A relay that changes one byte of either PAKE message: the receiver refuses it
    outright (side byte, not a group element) or the boxes stop opening both ways."""
    pc = pake.prepare(SECRET, "home", pake.KIND_CONNECT, "client")
    ps = pake.prepare(SECRET, "home", pake.KIND_CONNECT, "server")
    for i in range(pake.MESSAGE_SIZE):
        c, s = pake.start(pc, os.urandom(64)), pake.start(ps, os.urandom(64))
        to_s, to_c = c.message, s.message
        if who == "client":
            to_s = _tampered(to_s, i)
        else:
            to_c = _tampered(to_c, i)
        try:
            kc, ks = pake.finish(c, to_c), pake.finish(s, to_s)
        except PakeError:
            continue
        assert not _agree(kc, ks), f"byte {i} of the {who}'s message changed unnoticed"


def test_changing_any_byte_of_a_box_fails() -> None:
    kc, ks = _pair()
    box = ks.seal(0, b'{"t":"server"}')
    for i in range(len(box)):
        with pytest.raises(PakeError):
            kc.open(0, _tampered(box, i))
    with pytest.raises(PakeError):
        kc.open(0, box[:-1])
    with pytest.raises(PakeError):
        kc.open(0, box + b"\x00")


def test_a_changed_hint_changes_the_transcript() -> None:
    c = pake.start(pake.prepare(SECRET, "home", pake.KIND_CONNECT, "client"), os.urandom(64))
    s = pake.start(pake.prepare(SECRET, "home", pake.KIND_CONNECT, "server"), os.urandom(64))
    kc, ks = pake.finish(c, s.message, b"hint as sent"), pake.finish(s, c.message, b"other")
    _fails_both_ways(kc, ks)


def test_reflection_and_wrong_side_are_refused() -> None:
    pc = pake.prepare(SECRET, "home", pake.KIND_CONNECT, "client")
    c = pake.start(pc, os.urandom(64))
    with pytest.raises(PakeError, match="wrong side"):
        pake.finish(c, c.message)  # our own message, side byte A
    with pytest.raises(PakeError, match="reflection"):
        pake.finish(c, b"B" + c.message[1:])  # our element with the peer's side byte
    with pytest.raises(PakeError, match="33 bytes"):
        pake.finish(c, c.message[:-1])


def test_start_takes_exactly_its_randomness_and_arguments_are_checked() -> None:
    p = pake.prepare(SECRET, "home", pake.KIND_CONNECT, "client")
    with pytest.raises(ValueError):
        pake.start(p, b"\x00" * 32)
    r = os.urandom(64)
    assert pake.start(p, r).message == pake.start(p, r).message  # deterministic given r
    for bad in [dict(kind="other"), dict(role="relay"), dict(name=""), dict(secret="")]:
        args = {"secret": SECRET, "name": "home", "kind": "connect", "role": "client", **bad}
        with pytest.raises(ValueError):
            pake.prepare(**args)
    assert SECRET not in repr(p) and SECRET not in repr(pake.start(p, r))


# -- the in-QUIC proofs -------------------------------------------------------------------
def test_proofs_bind_the_channel_and_both_fingerprints() -> None:
    kc, ks = _pair()
    cb, sfp, cfp = os.urandom(32), "a" * 64, "b" * 64
    proof = kc.proof("client", cb, sfp, cfp)
    assert ks.check_proof("client", proof, cb, sfp, cfp)
    assert not ks.check_proof("server", proof, cb, sfp, cfp)  # not usable as the other
    assert not ks.check_proof("client", proof, os.urandom(32), sfp, cfp)  # other channel
    assert not ks.check_proof("client", proof, cb, "c" * 64, cfp)
    assert not ks.check_proof("client", proof, cb, sfp, "c" * 64)
    assert not ks.check_proof("client", "not bytes", cb, sfp, cfp)
    other, _ = _pair()
    assert not ks.check_proof("client", other.proof("client", cb, sfp, cfp), cb, sfp, cfp)
    assert kc.client_signature_input(cb, sfp) == ks.client_signature_input(cb, sfp)


# -- hints -----------------------------------------------------------------------------------
def test_hint_round_trip_and_binding() -> None:
    box_priv, box_pub = pake.box_keypair(os.urandom(32))
    ident = ed25519.Ed25519PrivateKey.generate()
    msg = os.urandom(33)
    hint = pake.seal_hint(box_public=box_pub, name="home", message=msg, identity=ident,
                          ts_ms=1_700_000_000_000, rand=os.urandom(32))
    assert len(hint) == pake.HINT_SIZE
    h = pake.open_hint(box_private=box_priv, name="home", message=msg, hint=hint)
    assert h.ts_ms == 1_700_000_000_000 and h.ephemeral == hint[:32]
    assert h.client_public == ident.public_key().public_bytes_raw()
    other_priv, _ = pake.box_keypair(os.urandom(32))
    for kwargs in [dict(box_private=other_priv), dict(name="home2"),
                   dict(message=os.urandom(33))]:
        args = {"box_private": box_priv, "name": "home", "message": msg, "hint": hint,
                **kwargs}
        with pytest.raises(PakeError):
            pake.open_hint(**args)
    for i in range(len(hint)):
        with pytest.raises(PakeError):
            pake.open_hint(box_private=box_priv, name="home", message=msg,
                           hint=_tampered(hint, i))


def test_box_keypair_is_derived_and_stable() -> None:
    seed = os.urandom(32)
    assert pake.box_keypair(seed) == pake.box_keypair(seed)
    assert pake.box_keypair(seed)[1] != pake.box_keypair(os.urandom(32))[1]


def test_a_low_order_ephemeral_key_is_refused() -> None:
    box_priv, _ = pake.box_keypair(os.urandom(32))
    zero = b"\x00" * pake.HINT_SIZE
    with pytest.raises(PakeError):
        pake.open_hint(box_private=box_priv, name="home", message=b"m", hint=zero)


# -- TLS channel binding -------------------------------------------------------------------
@pytest.mark.parametrize("hash_name,size", [("sha256", 32), ("sha384", 48)])
def test_channel_binding_is_tls13_hkdf_expand_label(hash_name: str, size: int) -> None:
    from aioquic.tls import hkdf_expand_label
    from cryptography.hazmat.primitives import hashes

    secret, th = os.urandom(size), os.urandom(size)
    alg = hashes.SHA256() if hash_name == "sha256" else hashes.SHA384()
    expected = hkdf_expand_label(alg, secret, b"quictun cb", th, 32)
    assert pake.tls_channel_binding(secret, th, hash_name) == expected


# -- fuzzing: only PakeError escapes ---------------------------------------------------------
_CLIENT = pake.prepare(SECRET, "home", pake.KIND_CONNECT, "client")
_SERVER = pake.prepare(SECRET, "home", pake.KIND_CONNECT, "server")


@settings(max_examples=150, deadline=None)
@given(st.one_of(st.binary(max_size=80), st.binary(min_size=32, max_size=32).map(
    lambda b: b"B" + b)))
def test_finish_raises_only_pake_error(message: bytes) -> None:
    started = pake.start(_CLIENT, bytes(64))
    try:
        pake.finish(started, message)
    except PakeError:
        pass


@settings(max_examples=200, deadline=None)
@given(st.integers(min_value=-2, max_value=5), st.binary(max_size=200))
def test_open_raises_only_pake_error(n: int, box: bytes) -> None:
    keys = pake.finish(pake.start(_SERVER, bytes(64)), pake.start(_CLIENT, bytes(64)).message)
    with pytest.raises(PakeError):
        keys.open(n, box)


_BOX_PRIV, _ = pake.box_keypair(bytes(32))


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=pake.HINT_SIZE + 8), st.binary(max_size=40))
def test_open_hint_raises_only_pake_error(hint: bytes, message: bytes) -> None:
    with pytest.raises(PakeError):
        pake.open_hint(box_private=_BOX_PRIV, name="home", message=message, hint=hint)


def test_resume_seeds_agree_per_role_and_differ_between_roles_and_sessions() -> None:
    """Both peers derive the same resume seed for each role (either could check the
    other), the roles' seeds differ, and another exchange gives other seeds."""
    kc, ks = _pair()
    assert kc.resume_seed("client") == ks.resume_seed("client")
    assert kc.resume_seed("server") == ks.resume_seed("server")
    assert kc.resume_seed("client") != kc.resume_seed("server")
    other, _ = _pair()
    assert other.resume_seed("client") != kc.resume_seed("client")
    with pytest.raises(ValueError):
        kc.resume_seed("relay")
