"""Hypothesis strategies shared by the codec and relay property tests."""

from __future__ import annotations

from typing import Any

from hypothesis import strategies as st

from quictun.proto import signalling as sp

TYPES = sorted({cls.T for cls in sp.CLIENT_MESSAGES + sp.SERVER_MESSAGES})
FIELDS = sorted({f for cls in sp.CLIENT_MESSAGES + sp.SERVER_MESSAGES for f in cls.CHECKS})

# values of every kind JSON (and Python's json module) can carry, including those that
# cannot be encoded again: non-finite numbers, huge integers, lone surrogates
scalars = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=40),
    st.sampled_from(["\ud800", "a\udfffb", "ab" * 32, "00" * 64, "box", "x" * 70]),
)
values = st.recursive(scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=8), inner, max_size=4)),
    max_leaves=12)


@st.composite
def messages(draw: Any) -> dict[str, Any]:
    """A JSON object shaped like a message: a known type and a mix of its fields."""
    obj: dict[str, Any] = {"t": draw(st.sampled_from(TYPES))}
    for field in draw(st.lists(st.sampled_from(FIELDS), max_size=6, unique=True)):
        obj[field] = draw(values)
    return obj
