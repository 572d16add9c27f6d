"""The matchmaker under hostile input (issue 12): whatever a connector sends, the relay
never raises, everything it sends decodes again (the harness decodes every output), and
the holder of a name is never disconnected nor kept from its next honest client."""

from __future__ import annotations

import json
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st
from strategies import messages
from test_matchmaker import Harness

from quictun.proto import signalling as sp

frames = st.one_of(messages().map(json.dumps), st.text(max_size=100),
                   st.binary(max_size=64))


@settings(max_examples=200, deadline=None)
@given(st.lists(frames, min_size=1, max_size=30))
def test_no_input_from_a_connector_disturbs_the_holder(seq: list[Any]) -> None:
    h = Harness()
    sid = h.pair(owner=1, connector=2)
    h.open(3)
    for frame in seq:
        for cid in (2, 3):  # a member of the session, and a stranger
            if cid in h.disconnected:
                continue
            if isinstance(frame, bytes):
                h.send_bin(cid, frame)
            else:
                h.send(cid, frame)
    assert 1 not in h.disconnected
    h.open(9)
    h.send(9, sp.Connect(name="srv", offer={"o": 2}))
    assert any(isinstance(m, sp.Incoming) and m.session != sid for m in h.pop_all(1))
