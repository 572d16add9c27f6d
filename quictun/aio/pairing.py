"""Pairing with a short code: ``serve --pair`` hands a ticket to ``quictun pair CODE``.

The serving side (:class:`PairingHost`, run by :class:`~quictun.aio.server.Server`)
holds the relay name ``pair-N`` next to its own for :data:`~quictun.proto.pairing.LIFETIME`
seconds and answers exchanges there with the code as the SPAKE2 secret (kind ``pair``):
at most :data:`~quictun.proto.pairing.DEFAULT_ATTEMPTS` of them, single use. When the
client's sealed hello opens (it typed the right code), the server seals the durable
ticket (relay URL, name, secret, fingerprint, box key) into one more box and remembers
the client as known. No punching, no QUIC: the whole exchange rides the relay.

The connecting side is :func:`pair`: it checks that the ticket names the same identity
and box key the exchange proved, and returns it (the CLI stores it).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Callable

from ..errors import AuthError, TunnelError, printable
from ..proto import pake
from ..proto import signalling as sigproto
from ..proto.exchange import ClientExchange, ServerExchange
from ..proto.identity import Identity, fingerprint_of_raw
from ..proto.offer import OfferError, TicketGrant
from ..proto.pairing import PairingCode, PairingSlot, describe_odds
from ..proto.ticket import Ticket, TicketError
from ..proto.ticket import decode as decode_ticket
from .relay import RelayError, SignalClient

__all__ = ["PairingHost", "pair"]

log = logging.getLogger("quictun")


def _now_ms() -> int:
    return int(time.time() * 1000)


class PairingHost:
    """The serving side of one pairing code (see the module docstring).

    ``ticket`` is the text handed over; ``send`` sends one relay message; ``emit`` logs
    one line; ``paired(fp)`` is called with the client's fingerprint on success.
    """

    def __init__(self, code: PairingCode, ticket: Ticket, identity: Identity, *,
                 send: Callable[[sigproto.Message], object], emit: Callable[[str], None],
                 paired: Callable[[str], None], timeout: float = 20.0) -> None:
        self.code = code
        self.name = code.relay_name
        self.ticket = ticket
        self._identity = identity
        self._send = send
        self._emit = emit
        self._paired = paired
        self._timeout = timeout
        self._prepared = pake.prepare(code.secret, self.name, pake.KIND_PAIR, "server")
        self._box_private, self._box_key = pake.box_keypair(identity.private_bytes())
        self.slot = PairingSlot.new(code, time.monotonic())
        self._pending: dict[int, tuple[ServerExchange, asyncio.TimerHandle]] = {}
        self._expiry: asyncio.TimerHandle | None = None
        self._released = False  # the name was given back (burned, expired or paired)

    def live(self) -> bool:
        """True while the code can still admit an exchange (the name is worth holding)."""
        return self.slot.live(time.monotonic()) or bool(self._pending)

    def announce(self) -> str:
        """The lines ``serve --pair`` prints: the code, its limits, the odds."""
        return (f"pairing code for {self.ticket.name!r}: {self.code}  (single use, valid "
                f"{self.slot.expires - time.monotonic():.0f} s, {self.slot.attempts_left} "
                f"tries; a guesser's odds: {describe_odds(self.slot.attempts_left)})\n"
                f"on the other machine: quictun pair   (then type the code)")

    def incoming(self, inc: sigproto.Incoming) -> None:
        """An offer on ``pair-N``: one attempt of the slot, answered at once. An offer
        that is not a pairing offer (malformed, another version, ``connect pair-N``) is
        refused first and costs no attempt: no guess of the code happened."""
        try:
            ex = ServerExchange.receive(self._prepared, self._box_private, name=self.name,
                                        offer_obj=inc.offer, now_ms=_now_ms())
        except OfferError as exc:
            self._send(sigproto.Reject(inc.session, f"{self.name} is a pairing code's "
                                       f"name, use `quictun pair` ({exc.message})",
                                       sigproto.REJECT_MALFORMED))
            return
        now = time.monotonic()
        self.slot, refused = self.slot.admit(now)
        if refused is not None:
            self._emit(f"refused a pairing attempt: {refused}")
            self._send(sigproto.Reject(inc.session, refused, sigproto.REJECT_BUSY))
            return
        try:
            answer = ex.answer(self._identity.fingerprint, [], os.urandom(pake.RANDOM_SIZE),
                               _now_ms(), box_key=self._box_key)
        except (OfferError, pake.PakeError) as exc:  # e.g. not a group element
            self._send(sigproto.Reject(inc.session, str(exc), sigproto.REJECT_MALFORMED))
            return
        timer = asyncio.get_running_loop().call_later(self._timeout, self._failed,
                                                      inc.session, "no sealed hello")
        self._pending[inc.session] = (ex, timer)
        self._send(sigproto.Answer(inc.session, answer))

    def owns(self, session: int) -> bool:
        return session in self._pending

    def data(self, m: sigproto.Data) -> None:
        """The client's sealed hello: the right code opens it, and the ticket goes back."""
        ex, timer = self._pending.pop(m.session)
        timer.cancel()
        try:
            hello = ex.client_hello(m.data, _now_ms())
        except (pake.PakeError, OfferError):
            self._pending[m.session] = (ex, timer)  # so that _failed finds it
            self._failed(m.session, "wrong pairing code")
            return
        self.slot = self.slot.succeeded(time.monotonic())
        fp = fingerprint_of_raw(hello.public)
        self._send(sigproto.Data(m.session, ex.grant(self.ticket.encode())))
        self._send(sigproto.Close(m.session, "paired"))
        self._released = True  # the server gives the name back (its ``paired``)
        if self._expiry is not None:
            self._expiry.cancel()
        self._paired(fp)
        self._emit(f"paired client {fp[:16]} for {self.ticket.name!r}; the code is used up")

    def closed(self, session: int) -> None:
        if session in self._pending:
            self._failed(session, "the client did not confirm: a wrong code, or it gave up")

    def _failed(self, session: int, why: str) -> None:
        entry = self._pending.pop(session, None)
        if entry is None:
            return
        entry[1].cancel()
        left = self.slot.attempts_left if self.slot.state == "open" else 0
        self._emit(f"failed pairing attempt ({why}); {left} tries left for code "
                   f"{self.code.number}-…")
        self._send(sigproto.Close(session, "pairing failed"))
        self._release_if_dead()

    def arm(self) -> None:
        """Release the code's name on the relay when the code expires (call once its
        name is registered, in the running loop)."""
        if self._expiry is None:
            wait = max(0.0, self.slot.expires - time.monotonic())
            self._expiry = asyncio.get_running_loop().call_later(wait, self._release_if_dead)

    def _release_if_dead(self) -> None:
        """A burned or expired code can never work: give its name back at once."""
        if self._released or self.live():
            return
        self._released = True
        if self._expiry is not None:
            self._expiry.cancel()
        self._emit(f"pairing code {self.code.number}-… can no longer be used "
                   f"({self.slot.state if self.slot.state != 'open' else 'expired'}); "
                   "run serve --pair again for a new one")
        self._send(sigproto.Unregister(self.name))


async def pair(code: PairingCode, *, signal: str, identity: Identity,
               on_status: Callable[[str], None] | None = None,
               timeout: float = 20.0) -> Ticket:
    """Run the pairing exchange for ``code`` against the relay ``signal``; returns the
    ticket the serving side handed over (checked against what the exchange proved).

    Raises:
        TunnelError: the relay cannot be reached, nobody holds the code's name, or the
            code is used up or expired; :class:`~quictun.errors.AuthError` for a wrong
            code (permanent: each try costs one of the code's few attempts).
    """
    status = on_status or (lambda s: log.info("%s", s))
    sc = SignalClient(signal)
    status(f"contacting the relay {signal}")
    await sc.open()
    try:
        return await _pair(code, sc, identity, status, timeout)
    finally:
        await sc.close()


async def _pair(code: PairingCode, sc: SignalClient, identity: Identity,
                status: Callable[[str], None], timeout: float) -> Ticket:
    prepared = pake.prepare(code.secret, code.relay_name, pake.KIND_PAIR, "client")
    ex = ClientExchange(prepared, identity, name=code.relay_name, pin=None, box_key=None,
                        rand=os.urandom(pake.RANDOM_SIZE + 32), now_ms=_now_ms())
    grant_box: asyncio.Future[sigproto.Data] = asyncio.get_running_loop().create_future()
    sc.on_message = lambda m: (isinstance(m, sigproto.Data) and not grant_box.done()
                               and grant_box.set_result(m))
    status(f"asking the relay for pairing code {code.number}")
    try:
        reply = await sc.request(
            sigproto.Connect(name=code.relay_name, offer=ex.offer()),
            lambda m: isinstance(m, sigproto.Answer | sigproto.Rejected), timeout=timeout)
    except RelayError as exc:
        if exc.code == sigproto.E_NO_SUCH_NAME:
            raise TunnelError(f"nobody offers pairing code {code.number} on this relay: "
                              "check the code and the relay (--signal), or start "
                              "`quictun serve NAME --pair` again") from None
        raise
    if isinstance(reply, sigproto.Rejected):
        raise TunnelError(f"pairing refused: {printable(reply.reason)}")
    assert isinstance(reply, sigproto.Answer)
    try:
        hello = ex.answer(reply.answer, _now_ms())
        await sc.send(sigproto.Data(reply.session, ex.client_hello([], _now_ms())))
        grant = ex.grant((await asyncio.wait_for(grant_box, timeout)).data)
    except (pake.PakeError, OfferError):
        with contextlib.suppress(TunnelError):
            await sc.send(sigproto.Close(reply.session, "wrong pairing code"))
        raise AuthError("wrong pairing code (or someone else answered for it); check the "
                        "words, or ask for a new code") from None
    except TimeoutError:
        raise TunnelError("the serving side did not send the ticket in time") from None
    return _checked(grant, hello.fingerprint, hello.box_key)


def _checked(grant: TicketGrant, fingerprint: str, box_key: bytes | None) -> Ticket:
    """The granted ticket, if it names the identity and box key the exchange proved."""
    try:
        t = decode_ticket(grant.ticket)
    except TicketError as exc:
        raise TunnelError(f"the serving side sent a bad ticket: {exc}") from None
    if t.fingerprint != fingerprint or t.box_key != box_key:
        raise AuthError("the ticket does not name the machine that answered the pairing "
                        "code; refusing it")
    return t
