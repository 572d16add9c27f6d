"""One authenticated exchange through the relay, each side's steps in order (pure).

Theory of operation
-------------------
Protocol 2 (docs/protocol.md, "Peer protocol") authenticates the two peers with SPAKE2
(:mod:`quictun.proto.pake`) and seals everything else they tell each other through the
relay (:mod:`quictun.proto.offer`). This module strings those pieces together, one class
per side; the asyncio shells (``aio/client.py``, ``aio/server.py``) only carry the JSON
objects and call these methods. Randomness and the clock (ms since the epoch) are passed
in.

Connector (:class:`ClientExchange`)::

    ex = ClientExchange(prepared, identity, name=..., pin=..., box_key=..., rand=..., now_ms=...)
    connect(offer=ex.offer())                         # through the relay
    hello = ex.answer(answer_obj, now_ms)             # ServerHello: fp (pinned), cands
    data(ex.client_hello(cands, now_ms))              # our identity key and candidates

Server (:class:`ServerExchange`, one per offer)::

    ex = ServerExchange.receive(prepared, box_private, name=..., offer_obj=..., now_ms=...)
    ex.throttle_key                                   # charge a guess before any work
    answer(ex.answer(fp, cands, rand, now_ms))
    hello = ex.client_hello(data_obj, now_ms)         # ClientHello, or PakeError: a guess

Pairing (kind ``pair``, the secret a short code) runs the same steps with no candidates;
the server's ServerHello also carries its box key, and after the client's hello opened
the server sends one more box, the ticket (``data(ex.grant(ticket))`` ->
``ex.grant(data_obj)`` on the client).

A wrong secret on either side shows as a box that does not open (:class:`PakeError`);
nothing else tells a guesser whether its guess was right. Every method raises only
:class:`~quictun.proto.offer.OfferError` (version, malformed, stale) or
:class:`~quictun.proto.pake.PakeError` (authentication), each with one line for a log.
"""

from __future__ import annotations

from collections.abc import Container, Hashable
from dataclasses import dataclass

from . import offer as wire
from . import pake
from .identity import Identity, fingerprint_of_raw
from .offer import ClientHello, OfferError, ServerHello, TicketGrant

__all__ = ["ClientExchange", "ServerExchange", "MismatchedPin"]


class MismatchedPin(pake.PakeError):
    """The server proved the secret, but its identity is not the one the ticket names."""


class ClientExchange:
    """The connector's side of one exchange (see the module docstring).

    ``pin``: the server fingerprint a ticket names (None: accept the one the server
    proves, and pin it for QUIC). ``box_key``: the server's box key from a format-2 ticket
    (None: send no hint; the server then throttles us with strangers). ``rand``: 96 fresh
    random bytes.
    """

    def __init__(self, prepared: pake.Prepared, identity: Identity, *, name: str,
                 pin: str | None, box_key: bytes | None, rand: bytes, now_ms: int) -> None:
        if prepared.role != "client" or prepared.name != name:
            raise ValueError("prepared for another role or name")
        if len(rand) != pake.RANDOM_SIZE + 32:
            raise ValueError(f"ClientExchange needs {pake.RANDOM_SIZE + 32} random bytes")
        self.name = name
        self.identity = identity
        self.pin = pin
        self._started = pake.start(prepared, rand[:pake.RANDOM_SIZE])
        self._hint = None
        if box_key is not None:
            self._hint = pake.seal_hint(box_public=box_key, name=name,
                                        message=self._started.message,
                                        identity=identity.private_key, ts_ms=now_ms,
                                        rand=rand[pake.RANDOM_SIZE:])
        self.keys: pake.SessionKeys | None = None
        self.server: ServerHello | None = None

    def offer(self) -> dict[str, object]:
        """The JSON object for ``connect.offer``."""
        return wire.Offer(kind=self._started.prepared.kind, pake=self._started.message,
                          hint=self._hint).to_json()

    def answer(self, obj: object, now_ms: int) -> ServerHello:
        """Verify the server's answer; returns its (authenticated) ServerHello.

        Raises:
            OfferError: another version (``code`` version), malformed, or stale.
            PakeError: the box does not open: a wrong secret, or a relay or squatter
                answering in the server's place. :class:`MismatchedPin` when the server
                knows the secret but is not the ticket's.
        """
        ans = wire.decode_answer(obj)
        keys = pake.finish(self._started, ans.pake, self._hint or b"")
        hello = wire.decode_payload(keys.open(0, ans.box), ServerHello)
        assert isinstance(hello, ServerHello)
        wire.check_fresh(hello.ts_ms, now_ms)
        if self.pin is not None and hello.fingerprint != self.pin:
            raise MismatchedPin("the machine that knows the secret is not the one in the "
                                "ticket (fingerprint differs)")
        self.keys, self.server = keys, hello
        return hello

    def client_hello(self, cands: list[str], now_ms: int) -> dict[str, object]:
        """The JSON object for our first ``data`` message (box 0 of our direction)."""
        assert self.keys is not None, "answer() first"
        hello = ClientHello(self.identity.public_bytes, tuple(cands), now_ms)
        return wire.Data(0, self.keys.seal(0, wire.encode_payload(hello))).to_json()

    def grant(self, obj: object) -> TicketGrant:
        """Pairing: the server's second box, the ticket.

        Raises:
            PakeError: it does not open. OfferError: malformed, or not box 1.
        """
        assert self.keys is not None, "answer() first"
        data = wire.decode_data(obj)
        if data.n != 1:
            raise OfferError(wire.E_MALFORMED, "the ticket must come in box 1")
        grant = wire.decode_payload(self.keys.open(1, data.box), TicketGrant)
        assert isinstance(grant, TicketGrant)
        return grant


@dataclass(frozen=True)
class _Known:
    """A hint that opened: who is connecting (by the server's box key), and when."""

    client_fp: str
    ephemeral: bytes


class ServerExchange:
    """The server's side of one exchange, from one ``incoming`` offer (see the module
    docstring). Build it with :meth:`receive`."""

    def __init__(self, prepared: pake.Prepared, offer: wire.Offer, known: _Known | None,
                 name: str) -> None:
        self._prepared = prepared
        self.offer = offer
        self._known = known
        self.name = name
        self.keys: pake.SessionKeys | None = None
        self._n_out = 0

    @classmethod
    def receive(cls, prepared: pake.Prepared, box_private: bytes, *, name: str,
                offer_obj: object, now_ms: int) -> ServerExchange:
        """Check an ``incoming`` offer before any PAKE work.

        Raises:
            OfferError: another protocol version (``code`` version: the client must
                upgrade), malformed, the wrong kind for this server, or a hint whose
                timestamp is stale (``code`` stale).
        """
        offer = wire.decode_offer(offer_obj)
        if offer.kind != prepared.kind:
            raise OfferError(wire.E_MALFORMED, f"this server takes {prepared.kind!r} "
                             f"exchanges, not {offer.kind!r}")
        known = None
        if offer.hint is not None:
            try:
                hint = pake.open_hint(box_private=box_private, name=name, message=offer.pake,
                                      hint=offer.hint)
            except pake.PakeError:
                hint = None  # not sealed to us, or forged: the client is a stranger
            if hint is not None:
                wire.check_fresh(hint.ts_ms, now_ms)
                known = _Known(fingerprint_of_raw(hint.client_public), hint.ephemeral)
        return cls(prepared, offer, known, name)

    @property
    def hinted_fp(self) -> str | None:
        """The fingerprint a valid hint names (not yet proven to know the secret)."""
        return self._known.client_fp if self._known else None

    @property
    def replay_id(self) -> bytes | None:
        """A unique id of the hint (its ephemeral key), for the replay memory."""
        return self._known.ephemeral if self._known else None

    def throttle_key(self, known_clients: Container[str]) -> Hashable:
        """Whose guess this is: a known client's own key when its hint names an identity
        that confirmed before, else the name's (strangers share one bucket)."""
        fp = self.hinted_fp
        if fp is not None and fp in known_clients:
            return ("client", fp)
        return ("name", self.name)

    def answer(self, fingerprint: str, cands: list[str], rand: bytes, now_ms: int, *,
               box_key: bytes | None = None) -> dict[str, object]:
        """Our answer: our SPAKE2 message and box 0 (our fingerprint and candidates, and
        our box key when pairing)."""
        started = pake.start(self._prepared, rand)
        self.keys = pake.finish(started, self.offer.pake, self.offer.hint or b"")
        hello = ServerHello(fingerprint, tuple(cands), now_ms, box_key)
        box = self.keys.seal(0, wire.encode_payload(hello))
        self._n_out = 1
        return wire.Answer(pake=started.message, box=box).to_json()

    def client_hello(self, obj: object, now_ms: int) -> ClientHello:
        """The client's first ``data``: its identity key and candidates.

        Raises:
            PakeError: the box does not open (a wrong guess of the secret), or the key is
                not the one its hint named.
            OfferError: malformed, or a stale timestamp.
        """
        assert self.keys is not None, "answer() first"
        data = wire.decode_data(obj)
        if data.n != 0:
            raise OfferError(wire.E_MALFORMED, "the client's first data must be box 0")
        hello = wire.decode_payload(self.keys.open(0, data.box), ClientHello)
        assert isinstance(hello, ClientHello)
        wire.check_fresh(hello.ts_ms, now_ms)
        if self._known is not None and fingerprint_of_raw(hello.public) != \
                self._known.client_fp:
            raise pake.PakeError("the client's identity is not the one its hint named")
        return hello

    def grant(self, ticket: str) -> dict[str, object]:
        """Pairing: box 1 of our direction, the ticket (after the client's hello opened)."""
        assert self.keys is not None and self._n_out == 1, "answer() first, once"
        self._n_out = 2
        box = self.keys.seal(1, wire.encode_payload(TicketGrant(ticket)))
        return wire.Data(1, box).to_json()

