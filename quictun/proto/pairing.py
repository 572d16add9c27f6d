"""Short pairing codes such as ``7-aardvark-zucchini`` (pure).

Theory of operation
-------------------
``quictun serve NAME --pair`` makes a code from fresh randomness (:func:`generate`),
holds the relay name :attr:`PairingCode.relay_name` (``pair-7``) for a short while and
answers exchanges on it with the code as the PAKE secret (kind ``pair``).
``quictun pair CODE`` parses what a person typed (:func:`parse`), connects to that relay
name and runs the exchange; the server then hands over a ticket inside the encrypted
channel.

The number only says where to meet: the relay sees it. The two words are the secret:
:data:`CODE_SPACE` = 1296² = 1,679,616 equally likely pairs (20.7 bits). Because the
PAKE gives an attacker one guess per exchange and nothing to test offline, the odds of a
stranger (or the relay) getting in with one code are ``attempts / CODE_SPACE``: with the
default :data:`DEFAULT_ATTEMPTS` = 3 exchanges per code, 1 in 559,872
(:func:`attack_odds`). magic-wormhole's default code (2 words of the PGP list, 16 bits)
gives 1 in 65,536 per attempt by the same reckoning.

A :class:`PairingSlot` is the serving side's state for one code: single use, expires
after :data:`LIFETIME` seconds, and admits at most ``attempts`` exchanges (each one
charged when it starts, since a guesser learns its answer even if it never confirms).

:func:`parse` forgives what people do: any case, spaces or other separators
(``7 Aardvark.zucchini``), a number glued to the first word, a word typed by its first
three letters or more (every word's three-letter prefix is unique), and one wrong,
missing, extra or swapped letter in a word when exactly one word is that close. Anything else
raises :class:`PairingCodeError` with one line that says what to fix.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace

from .wordlist import WORDS

__all__ = [
    "NUMBER_MAX",
    "CODE_SPACE",
    "DEFAULT_ATTEMPTS",
    "LIFETIME",
    "RANDOM_SIZE",
    "PairingCodeError",
    "PairingCode",
    "PairingSlot",
    "generate",
    "parse",
    "attack_odds",
    "describe_odds",
]

NUMBER_MAX = 999  # numbers 1..999: short to say, enough slots for a busy relay
WORDS_PER_CODE = 2
CODE_SPACE = len(WORDS) ** WORDS_PER_CODE
DEFAULT_ATTEMPTS = 3
LIFETIME = 600.0  # seconds a code stays valid
RANDOM_SIZE = 32  # bytes of randomness :func:`generate` wants
RELAY_PREFIX = "pair-"
_INDEX = {w: i for i, w in enumerate(WORDS)}
_BY_PREFIX = {w[:3]: w for w in WORDS}
_SEPARATORS = re.compile(r"[\s\-_.,:;/+~'\"`]+")
_GLUED = re.compile(r"^(\d+)([a-z])")


class PairingCodeError(ValueError):
    """Text that is not a pairing code; the message (one line) says what to fix."""


@dataclass(frozen=True)
class PairingCode:
    """A parsed or generated code. ``str(code)`` is its canonical text, which is also
    the PAKE secret (so every accepted spelling of a code yields the same secret)."""

    number: int
    words: tuple[str, ...]

    def __post_init__(self) -> None:
        if not 1 <= self.number <= NUMBER_MAX or len(self.words) != WORDS_PER_CODE \
                or not all(w in _INDEX for w in self.words):
            raise PairingCodeError("not a pairing code")

    def __str__(self) -> str:
        return "-".join([str(self.number), *self.words])

    @property
    def relay_name(self) -> str:
        """The relay name the serving side holds for this code (``pair-7``)."""
        return f"{RELAY_PREFIX}{self.number}"

    @property
    def secret(self) -> str:
        return str(self)


def _draw(stream: list[int], n: int) -> int:
    """A uniform integer in [0, n) from 16-bit values of ``stream`` (rejection sampling)."""
    limit = (1 << 16) - (1 << 16) % n
    while stream:
        v = stream.pop(0)
        if v < limit:
            return v % n
    raise ValueError(f"generate() ran out of randomness; pass {RANDOM_SIZE} fresh bytes")


def generate(rand: bytes) -> PairingCode:
    """A uniformly random code from ``rand`` (:data:`RANDOM_SIZE` fresh random bytes).

    Raises:
        ValueError: ``rand`` is too short (or, with odds below 2^-90, all of it was
            rejected by the sampling).
    """
    if len(rand) < RANDOM_SIZE:
        raise ValueError(f"generate() needs {RANDOM_SIZE} random bytes")
    stream = [int.from_bytes(rand[i:i + 2], "big") for i in range(0, len(rand) - 1, 2)]
    number = 1 + _draw(stream, NUMBER_MAX)
    words = tuple(WORDS[_draw(stream, len(WORDS))] for _ in range(WORDS_PER_CODE))
    return PairingCode(number, words)


def _edits1(typed: str, word: str) -> bool:
    """True if ``word`` is one substitution, insertion, deletion or swap of two adjacent
    letters away from ``typed``."""
    if abs(len(typed) - len(word)) > 1 or typed == word:
        return False
    if len(typed) == len(word):
        diff = [k for k, (a, b) in enumerate(zip(typed, word, strict=True)) if a != b]
        return len(diff) == 1 or (len(diff) == 2 and diff[1] == diff[0] + 1
                                  and typed[diff[0]] == word[diff[1]]
                                  and typed[diff[1]] == word[diff[0]])
    short, long_ = sorted((typed, word), key=len)
    pairs = enumerate(zip(short, long_[: len(short)], strict=True))
    i = next((k for k, (a, b) in pairs if a != b), len(short))
    return short[i:] == long_[i + 1:]


def _word(typed: str) -> str:
    if typed in _INDEX:
        return typed
    if len(typed) >= 3 and typed.isalpha():
        whole = _BY_PREFIX.get(typed[:3])
        if whole is not None and whole.startswith(typed):
            return whole
    close = [w for w in WORDS if _edits1(typed, w)]
    if len(close) == 1:
        return close[0]
    hint = f" (did you mean {' or '.join(close[:3])}?)" if close else ""
    raise PairingCodeError(f"{typed!r} is not a word of a pairing code{hint}; check the "
                           "code on the serving machine")


def parse(text: str) -> PairingCode:
    """The code a person typed, normalised (see the module doc).

    Raises:
        PairingCodeError: not a code; the message says which part is wrong.
    """
    if not isinstance(text, str) or len(text) > 200:
        raise PairingCodeError("a pairing code looks like 7-aardvark-zucchini")
    t = _SEPARATORS.sub("-", text.strip().lower()).strip("-")
    t = _GLUED.sub(r"\1-\2", t)
    parts = [p for p in t.split("-") if p]
    if len(parts) != 1 + WORDS_PER_CODE or not (parts[0].isascii() and parts[0].isdigit()):
        raise PairingCodeError(f"a pairing code is a number and {WORDS_PER_CODE} words, "
                               "like 7-aardvark-zucchini")
    number = int(parts[0])
    if not 1 <= number <= NUMBER_MAX:
        raise PairingCodeError(f"a pairing code's number is 1-{NUMBER_MAX}, not {number}")
    return PairingCode(number, tuple(_word(w) for w in parts[1:]))


def attack_odds(attempts: int = DEFAULT_ATTEMPTS) -> float:
    """The probability that someone who does not know a code gets in before it dies,
    given ``attempts`` exchanges allowed per code: one guess each, no offline test."""
    if attempts < 0:
        raise ValueError("attempts must be >= 0")
    return min(1.0, attempts / CODE_SPACE)


def describe_odds(attempts: int = DEFAULT_ATTEMPTS) -> str:
    """:func:`attack_odds` for people: ``"1 in 559,872"``."""
    p = attack_odds(attempts)
    return "none" if p == 0 else f"1 in {round(1 / p):,}"


@dataclass(frozen=True)
class PairingSlot:
    """The serving side's state for one code. Every method returns a new slot.

    ``state`` is ``open``, ``used`` (a client paired), ``burned`` (attempts exhausted)
    or ``expired``.
    """

    code: PairingCode
    expires: float
    attempts_left: int
    state: str = "open"

    @classmethod
    def new(cls, code: PairingCode, now: float, lifetime: float = LIFETIME,
            attempts: int = DEFAULT_ATTEMPTS) -> PairingSlot:
        return cls(code, now + lifetime, attempts)

    def _aged(self, now: float) -> PairingSlot:
        return replace(self, state="expired") if self.state == "open" and \
            now >= self.expires else self

    def admit(self, now: float) -> tuple[PairingSlot, str | None]:
        """Start an exchange at ``now``. Returns (new slot, None) when admitted (one
        attempt is charged), else (new slot, reason for the log and the reject)."""
        s = self._aged(now)
        if s.state != "open":
            return s, f"pairing code {s.code.number}-… is {s.state}"
        left = s.attempts_left - 1
        return replace(s, attempts_left=left, state="open" if left > 0 else "burned"), None

    def succeeded(self, now: float) -> PairingSlot:
        """The admitted exchange confirmed: the code is used up (single use)."""
        return replace(self, state="used")

    def live(self, now: float) -> bool:
        """True while the slot can still admit an exchange."""
        return self._aged(now).state == "open"
