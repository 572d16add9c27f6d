"""The owner token is bound to the identity and the name, and reveals neither."""

from __future__ import annotations

from quictun.proto import auth
from quictun.proto.identity import Identity


def test_owner_token_depends_on_identity_and_name() -> None:
    a, b = Identity.generate(), Identity.generate()
    t = auth.owner_token(a.private_bytes(), "home")
    assert t == auth.owner_token(a.private_bytes(), "home")
    assert t != auth.owner_token(a.private_bytes(), "office")
    assert t != auth.owner_token(b.private_bytes(), "home")
    assert len(t) == 64 and a.private_bytes().hex() not in t
