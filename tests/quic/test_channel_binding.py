"""quictun/quic/binding.py: the TLS channel binding is equal on both ends of one QUIC
connection, on every engine pair, and differs between connections."""

from __future__ import annotations

import os

import pytest
from test_engines import _pair_params
from test_flow import exchange, make_pair

from quictun.proto import pake
from quictun.proto.identity import Identity
from quictun.quic import engines
from quictun.quic.binding import BindingUnavailable, channel_binding


@pytest.mark.parametrize(("client_name", "server_name"), _pair_params())
def test_both_ends_compute_the_same_binding(client_name: str, server_name: str) -> None:
    ce, se = engines.get(client_name), engines.get(server_name)
    ident = Identity.generate()
    client, server = make_pair(ce, se, ident)
    with pytest.raises(BindingUnavailable):
        channel_binding(client)  # not before the handshake is done
    exchange(client, server, 0.0)
    cb = channel_binding(client)
    assert len(cb) == 32 and cb == channel_binding(server)
    other_client, other_server = make_pair(ce, se, ident)  # same identity, new connection
    exchange(other_client, other_server, 0.0)
    assert channel_binding(other_client) == channel_binding(other_server) != cb


@pytest.mark.parametrize(("client_name", "server_name"), _pair_params())
def test_proofs_over_the_binding_verify_across_the_connection(client_name: str,
                                                              server_name: str) -> None:
    """The in-QUIC key confirmation as the handlers will do it: each side proves the PAKE
    key over its own view of the channel; a proof made on another connection fails."""
    ce, se = engines.get(client_name), engines.get(server_name)
    ident = Identity.generate()
    client, server = make_pair(ce, se, ident)
    exchange(client, server, 0.0)
    c = pake.start(pake.prepare("s", "home", "connect", "client"), os.urandom(64))
    s = pake.start(pake.prepare("s", "home", "connect", "server"), os.urandom(64))
    kc, ks = pake.finish(c, s.message), pake.finish(s, c.message)
    sfp, cfp = ce.peer_fingerprint(client), "c" * 64
    assert sfp == ident.fingerprint
    proof = kc.proof("client", channel_binding(client), sfp, cfp)
    assert ks.check_proof("client", proof, channel_binding(server), ident.fingerprint, cfp)
    back = ks.proof("server", channel_binding(server), ident.fingerprint, cfp)
    assert kc.check_proof("server", back, channel_binding(client), sfp, cfp)
    other_client, other_server = make_pair(ce, se, ident)
    exchange(other_client, other_server, 0.0)
    assert not ks.check_proof("client", proof, channel_binding(other_server),
                              ident.fingerprint, cfp)
