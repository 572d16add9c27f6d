"""Property tests of the relay codec: whatever text arrives, ``decode`` either raises
:class:`ProtocolError` or returns a message that encodes again to the same message (so a
relay that forwards what it decoded can never fail on re-encoding: finding 7)."""

from __future__ import annotations

import json
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st
from strategies import messages

from quictun.proto import signalling as sp


def _check(text: str) -> None:
    try:
        msg = sp.decode(text)
    except sp.ProtocolError:
        return
    again = sp.encode(msg)  # never raises for a decoded message
    assert sp.decode(again) == msg


@settings(max_examples=1500, deadline=None)
@given(messages())
def test_decoded_messages_always_encode_again(obj: dict[str, Any]) -> None:
    _check(json.dumps(obj))


@settings(max_examples=500, deadline=None)
@given(st.text(max_size=200))
def test_any_text_is_a_message_or_a_protocol_error(text: str) -> None:
    _check(text)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200))
def test_any_bytes_are_a_message_or_a_protocol_error(data: bytes) -> None:
    try:
        msg = sp.decode(data)
    except sp.ProtocolError:
        return
    assert sp.decode(sp.encode(msg)) == msg
