"""Pairing codes end to end: a real relay, ``quictun.serve(pairing=...)``, ``pair()``."""

from __future__ import annotations

import asyncio
import contextlib
import os

import pytest

import quictun
from quictun.aio.client import open_tunnel
from quictun.aio.pairing import pair
from quictun.errors import AuthError, TunnelError
from quictun.proto import pairing
from quictun.proto.identity import Identity
from quictun.proto.pake import box_key_of
from quictun.proto.ticket import Ticket
from quictun.proto.wordlist import WORDS
from signal_server.server import RelayConfig, RelayServer


async def _echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    while data := await reader.read(65536):
        writer.write(data)
        await writer.drain()
    writer.close()


@pytest.fixture
async def host():  # type: ignore[no-untyped-def]
    """(relay, code, server identity, events) with ``serve("home", pairing=...)`` up."""
    relay = RelayServer(RelayConfig(host="127.0.0.1", port=0))
    await relay.start()
    target = await asyncio.start_server(_echo, "127.0.0.1", 0)
    port = target.sockets[0].getsockname()[1]
    ident = Identity.generate()
    code = pairing.generate(os.urandom(32))
    ticket = Ticket(url=relay.url, name="home", secret="the-durable-secret",
                    fingerprint=ident.fingerprint, box_key=box_key_of(ident))
    events: list[str] = []
    task = asyncio.create_task(quictun.serve(
        "home", forward=f"127.0.0.1:{port}", signal=relay.url, secret=ticket.secret,
        identity=ident, on_event=events.append, pairing=(code, ticket)))
    for _ in range(100):
        if relay.stats.get("names", 0) >= 2:  # home and pair-N
            break
        await asyncio.sleep(0.05)
    try:
        yield relay, code, ident, events
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        target.close()
        await relay.stop()


def _wrong(code: pairing.PairingCode) -> pairing.PairingCode:
    """The same number with another second word: a guess."""
    other = next(w for w in WORDS if w != code.words[1])
    return pairing.PairingCode(code.number, (code.words[0], other))


async def test_the_right_code_gives_a_ticket_that_connects(host) -> None:  # type: ignore[no-untyped-def]
    relay, code, ident, events = host
    typed = pairing.parse(str(code).upper().replace("-", "  "))  # as a person types it
    t = await pair(typed, signal=relay.url, identity=Identity.generate(),
                   on_status=lambda s: None)
    assert (t.name, t.fingerprint, t.box_key) == ("home", ident.fingerprint, box_key_of(ident))
    assert t.secret == "the-durable-secret"
    assert any("paired client" in e for e in events)
    # the ticket works, and the client is now known to the server (its hint is trusted)
    tun = await open_tunnel("home", signal=t.url, secret=t.secret, pin=t.fingerprint,
                            box_key=t.box_key, identity=Identity.generate(),
                            on_status=lambda s: None)
    try:
        reader, writer = await tun.open_connection()
        writer.write(b"paired\n")
        assert await reader.readline() == b"paired\n"
        writer.close()
    finally:
        await tun.close()
    # single use: the code's name is gone
    with pytest.raises(TunnelError, match="nobody offers pairing code"):
        await pair(code, signal=relay.url, identity=Identity.generate(),
                   on_status=lambda s: None)


async def test_wrong_codes_cost_a_try_each_and_burn_the_code(host) -> None:  # type: ignore[no-untyped-def]
    relay, code, _ident, events = host
    for _ in range(pairing.DEFAULT_ATTEMPTS):
        with pytest.raises(AuthError, match="wrong pairing code"):
            await pair(_wrong(code), signal=relay.url, identity=Identity.generate(),
                       on_status=lambda s: None)
    for _ in range(100):  # the server logs each failure when it learns of it
        if sum("failed pairing attempt" in e for e in events) >= pairing.DEFAULT_ATTEMPTS:
            break
        await asyncio.sleep(0.05)
    # burned: the server gave the code's name back, so even the right code finds nobody
    assert any("can no longer be used (burned)" in e for e in events), events
    with pytest.raises(TunnelError, match="nobody offers pairing code"):
        await pair(code, signal=relay.url, identity=Identity.generate(),
                   on_status=lambda s: None)
    assert not any("paired client" in e for e in events)


async def test_connect_to_a_pairing_name_is_told_and_costs_no_try(host) -> None:  # type: ignore[no-untyped-def]
    relay, code, _ident, events = host
    with pytest.raises(AuthError, match=f"{code.relay_name} is a pairing code's name, use "
                                        "`quictun pair`"):
        async with quictun.connect(code.relay_name, signal=relay.url, secret="whatever",
                                   identity=Identity.generate(), on_status=lambda s: None):
            pass
    assert not any("failed pairing attempt" in e for e in events)
    t = await pair(code, signal=relay.url, identity=Identity.generate(),
                   on_status=lambda s: None)  # all three tries were left
    assert t.name == "home"


async def test_a_pairing_number_in_use_is_replaced_before_it_is_shown() -> None:
    relay = RelayServer(RelayConfig(host="127.0.0.1", port=0))
    await relay.start()
    ident, other = Identity.generate(), Identity.generate()
    code = pairing.generate(os.urandom(32))
    ticket = Ticket(url=relay.url, name="home", secret="the-durable-secret",
                    fingerprint=ident.fingerprint, box_key=box_key_of(ident))
    shown: list[pairing.PairingCode] = []
    squatter = asyncio.create_task(quictun.serve(  # another server holds pair-N already
        code.relay_name, forward="127.0.0.1:9", signal=relay.url, secret="x" * 16,
        identity=other, on_event=lambda s: None))
    task = None
    try:
        for _ in range(100):
            if relay.stats.get("names", 0) >= 1:
                break
            await asyncio.sleep(0.05)
        task = asyncio.create_task(quictun.serve(
            "home", forward="127.0.0.1:9", signal=relay.url, secret=ticket.secret,
            identity=ident, on_event=lambda s: None, pairing=(code, ticket),
            on_pairing=shown.append))
        for _ in range(100):
            if shown:
                break
            await asyncio.sleep(0.05)
        assert len(shown) == 1 and shown[0].relay_name != code.relay_name, shown
        t = await pair(shown[0], signal=relay.url, identity=Identity.generate(),
                       on_status=lambda s: None)
        assert t.secret == ticket.secret
    finally:
        for tk in (squatter, task):
            if tk is not None:
                tk.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await tk
        await relay.stop()
