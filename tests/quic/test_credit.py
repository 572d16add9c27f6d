"""The quictun/1+credit per-stream credit bookkeeping (quictun/quic/credit.py), pure."""

from __future__ import annotations

import pytest

from quictun.quic.credit import (
    INITIAL_CREDIT,
    TAG,
    ReceiveCredit,
    RecordReader,
    SendCredit,
    encode_record,
    encode_varint,
)


@pytest.mark.parametrize(("value", "size"), [(0, 1), (63, 1), (64, 2), (16383, 2),
                                             (16384, 4), (2**30 - 1, 4), (2**30, 8),
                                             (2**62 - 1, 8)])
def test_varints_round_trip_at_every_size(value: int, size: int) -> None:
    raw = encode_varint(value)
    assert len(raw) == size
    assert RecordReader().feed(raw + encode_varint(7)) == [(value, 7)]


def test_varint_out_of_range_is_refused() -> None:
    with pytest.raises(ValueError):
        encode_varint(2**62)


def test_records_split_anywhere_are_reassembled() -> None:
    raw = b"".join(encode_record(sid, limit) for sid, limit in
                   [(0, 5), (4, 2**21 + 17), (2**40, 2**61)])
    for cut in range(len(raw) + 1):
        reader = RecordReader()
        got = reader.feed(raw[:cut]) + reader.feed(raw[cut:])
        assert got == [(0, 5), (4, 2**21 + 17), (2**40, 2**61)]


def test_sender_holds_beyond_the_limit_in_order_with_fin() -> None:
    c = SendCredit(initial=10)
    assert c.send(4, b"", False) == (b"", False)  # opening the stream
    assert c.send(4, b"abcdefgh", False) == (b"abcdefgh", False)
    assert c.send(4, b"ijklmn", False) == (b"ij", False)  # 10 bytes allowed
    assert c.held(4) == 4
    assert c.send(4, b"o", True) == (b"", False)  # nothing overtakes held bytes; FIN waits
    assert c.raise_limit(4, 12) == (b"kl", False)
    assert c.raise_limit(4, 11) is None  # limits only grow
    assert c.raise_limit(4, 100) == (b"mno", True)  # everything, then the FIN
    assert c.held(4) == 0
    # the stream is finished: its state is gone, later records are ignored
    assert c.raise_limit(4, 200) is None
    assert c._sent == {} and c._limit == {}


def test_sender_ignores_records_for_streams_it_never_sent_on() -> None:
    c = SendCredit(initial=10)
    for sid in range(1000):
        assert c.raise_limit(sid, 10**9) is None
    assert c._limit == {}  # a peer cannot grow our state with records


def test_sender_drop_and_release_all() -> None:
    c = SendCredit(initial=3)
    c.send(0, b"aaaaa", False)
    c.send(4, b"bbbbb", True)
    c.send(8, b"cc", False)
    assert c.held(0) == c.held(4) == 2 and c.held(8) == 0
    c.drop(0)  # reset: held bytes go too
    assert c.held(0) == 0
    c.forget(8)  # nothing held: state goes
    assert 8 not in c._sent
    c.forget(4)  # bytes still wait: state stays
    assert c.held(4) == 2
    assert c.release_all() == [(4, b"bb", True)]
    assert c.held(4) == 0 and c._sent == {}


def test_sender_applies_the_initial_credit_per_stream() -> None:
    c = SendCredit()
    assert c.send(0, b"x" * (INITIAL_CREDIT + 5), False) == (b"x" * INITIAL_CREDIT, False)
    assert c.send(4, b"y" * 5, False) == (b"y" * 5, False)  # another stream, own credit


def test_receiver_grants_a_window_past_consumption_with_hysteresis() -> None:
    r = ReceiveCredit(window=100, initial=100)
    assert r.limit(4) == 100
    assert r.first_due == 25
    assert r.consumed(4, 24) is None  # less than a quarter window of news
    assert r.consumed(4, 25) == 125
    assert r.limit(4) == 125 and r.due[4] == 50
    assert r.consumed(4, 40) is None
    assert r.consumed(4, 50) == 150
    r.forget(4)
    assert r.limit(4) == 100 and 4 not in r.due


@pytest.mark.parametrize(("window", "initial"), [(100, 100), (400, 100), (60, 100)])
def test_receiver_due_marks_exactly_when_a_record_would_be_sent(window: int,
                                                              initial: int) -> None:
    r = ReceiveCredit(window=window, initial=initial)
    for total in range(0, 2000, 7):
        due = total >= r.due.get(4, r.first_due)
        assert (r.consumed(4, total) is not None) == due, total


def test_the_example_of_docs_protocol_md_is_what_the_codec_writes() -> None:
    from pathlib import Path

    doc = (Path(__file__).resolve().parents[2] / "docs" / "protocol.md").read_text()
    example = "0104802800000880300000"
    assert f"Example: `{example}` is `01` (the tag)" in doc
    raw = bytes.fromhex(example)
    assert raw[:1] == TAG
    assert RecordReader().feed(raw[1:]) == [(4, 2_621_440), (8, 3_145_728)]
    assert raw == TAG + encode_record(4, 2_621_440) + encode_record(8, 3_145_728)
