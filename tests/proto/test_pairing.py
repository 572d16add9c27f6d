"""quictun/proto/pairing.py and wordlist.py: codes, parsing, odds, the serving slot."""

from __future__ import annotations

import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from quictun.proto import pairing
from quictun.proto.pairing import PairingCode, PairingCodeError, PairingSlot
from quictun.proto.wordlist import WORDS


def test_the_word_list_has_the_properties_parsing_relies_on() -> None:
    assert len(WORDS) == len(set(WORDS)) == 1296
    assert all(w.isascii() and w.isalpha() and w.islower() for w in WORDS)
    assert len({w[:3] for w in WORDS}) == 1296  # a unique three-letter prefix each


def test_generate_is_uniform_over_its_input_and_parses_back() -> None:
    code = pairing.generate(bytes(range(32)))
    assert code == pairing.generate(bytes(range(32)))  # randomness comes from outside
    for _ in range(200):
        code = pairing.generate(os.urandom(pairing.RANDOM_SIZE))
        assert 1 <= code.number <= pairing.NUMBER_MAX and all(w in WORDS for w in code.words)
        assert pairing.parse(str(code)) == code
        assert code.relay_name == f"pair-{code.number}" and code.secret == str(code)
    with pytest.raises(ValueError):
        pairing.generate(b"\x00" * 8)
    with pytest.raises(ValueError, match="ran out"):
        pairing.generate(b"\xff" * 32)  # every 16-bit draw rejected


def test_generate_reaches_both_ends_of_every_range() -> None:
    first = pairing.generate(bytes(32))
    assert first.number == 1 and first.words == (WORDS[0], WORDS[0])
    limit_n = 65536 - 65536 % 999
    limit_w = 65536 - 65536 % 1296
    top = (limit_n - 1).to_bytes(2, "big") + ((limit_w - 1).to_bytes(2, "big") * 2)
    last = pairing.generate(top + bytes(26))
    assert last.number == 999 and last.words == (WORDS[-1], WORDS[-1])


@pytest.mark.parametrize("typed", [
    "7-aardvark-zucchini", "  7-aardvark-zucchini\n", "7 aardvark zucchini",
    "7-Aardvark-ZUCCHINI", "7_aardvark.zucchini", "7--aardvark  -  zucchini",
    "7aardvark-zucchini", "007-aardvark-zucchini", '"7-aardvark-zucchini"',
    "7-aar-zuc", "7-aardv-zucchi",  # prefixes
    "7-ardvark-zucchini", "7-aardvrak-zucchini",  # a missing letter, two letters swapped
    "7-aardvarks-zucchini", "7-aardvark-zuchini", "7-aardvaek-zucchini",  # typos
    "7,aardvark;zucchini", "7/aardvark/zucchini",
])
def test_parse_forgives_what_people_type(typed: str) -> None:
    assert pairing.parse(typed) == PairingCode(7, ("aardvark", "zucchini"))


@pytest.mark.parametrize("typed,match", [
    ("", "number and 2 words"), ("aardvark-zucchini", "number and 2 words"),
    ("7-aardvark", "number and 2 words"), ("7-aardvark-zucchini-acid", "number and 2 words"),
    ("0-aardvark-zucchini", "1-999"), ("1000-aardvark-zucchini", "1-999"),
    ("7-qqq-zucchini", "'qqq' is not a word"), ("7-aardvark-zz", "'zz' is not a word"),
    ("7-yogo-zucchini", "did you mean pogo or yoyo"),  # one letter from two words
    ("x" * 300, "looks like"),
])
def test_parse_refuses_with_a_reason(typed: str, match: str) -> None:
    with pytest.raises(PairingCodeError, match=match):
        pairing.parse(typed)


def test_every_accepted_spelling_is_the_same_secret() -> None:
    spellings = ["12 Acid Zombie", "12-acid-zombie", "12-aci-zom", "12-acdi-zombie"]
    assert {pairing.parse(s).secret for s in spellings} == {"12-acid-zombie"}


def test_attack_odds_as_magic_wormhole_states_them() -> None:
    assert pairing.CODE_SPACE == 1_679_616
    assert pairing.attack_odds(1) == 1 / 1_679_616
    assert pairing.attack_odds(pairing.DEFAULT_ATTEMPTS) == 3 / 1_679_616
    assert pairing.describe_odds(3) == "1 in 559,872"
    assert pairing.describe_odds(1) == "1 in 1,679,616"
    assert pairing.describe_odds(0) == "none"
    assert pairing.attack_odds(10**9) == 1.0


# -- the serving side's slot ----------------------------------------------------------------
CODE = PairingCode(7, ("aardvark", "zucchini"))


def test_a_slot_admits_its_attempts_then_burns() -> None:
    slot = PairingSlot.new(CODE, now=0.0)
    for i in range(pairing.DEFAULT_ATTEMPTS):
        slot, why = slot.admit(1.0 + i)
        assert why is None
    assert slot.state == "burned" and not slot.live(5.0)
    slot, why = slot.admit(5.0)
    assert why is not None and "burned" in why


def test_a_slot_is_single_use_and_expires() -> None:
    slot, why = PairingSlot.new(CODE, now=0.0).admit(1.0)
    assert why is None
    used = slot.succeeded(2.0)
    assert used.state == "used" and used.admit(3.0)[1] is not None
    fresh = PairingSlot.new(CODE, now=0.0, lifetime=60.0)
    assert fresh.live(59.9) and not fresh.live(60.0)
    expired, why = fresh.admit(60.0)
    assert expired.state == "expired" and why is not None and "expired" in why


# -- fuzzing -----------------------------------------------------------------------------------
@settings(max_examples=300, deadline=None)
@given(st.text(max_size=60))
def test_parse_raises_only_pairing_code_error(text: str) -> None:
    try:
        code = pairing.parse(text)
    except PairingCodeError as e:
        assert str(e)
    else:
        assert pairing.parse(str(code)) == code


@settings(max_examples=200, deadline=None)
@given(st.binary(min_size=32, max_size=32), st.lists(st.sampled_from([" ", "-", ".", "  "]),
                                                      min_size=2, max_size=2),
       st.booleans())
def test_any_code_with_any_separators_and_case_parses_back(rand: bytes, seps: list[str],
                                                           upper: bool) -> None:
    try:
        code = pairing.generate(rand)
    except ValueError:
        return
    text = f"{code.number}{seps[0]}{code.words[0]}{seps[1]}{code.words[1]}"
    assert pairing.parse(text.upper() if upper else text) == code


def test_a_non_ascii_digit_is_a_clear_error() -> None:
    """'²'.isdigit() is true but int('²') fails: still one PairingCodeError."""
    with pytest.raises(PairingCodeError):
        pairing.parse("²-aardvark-zucchini")
