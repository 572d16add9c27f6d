"""A relayed tunnel whose relay link breaks mid-transfer (quictun.aio.relink): the peer
re-opens its WebSocket and resumes the session there, the transfer completes intact. In
one process: a real relay, quictun.serve as a task, quictun.connect, relay-only (so the
relay link is the only path: if the session did not resume, no byte would move)."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
from collections.abc import AsyncIterator

import pytest

import quictun
from quictun.config import TunnelConfig
from quictun.proto.identity import Identity
from signal_server.server import RelayConfig, RelayServer

SECRET = "relay-resume-secret"


async def _hash_reply(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    h, n = hashlib.sha256(), 0
    while data := await reader.read(65536):
        h.update(data)
        n += len(data)
    writer.write(f"{h.hexdigest()} {n}\n".encode())
    await writer.drain()
    writer.close()


@pytest.fixture
async def world() -> AsyncIterator[RelayServer]:
    relay = RelayServer(RelayConfig(host="127.0.0.1", port=0))
    await relay.start()
    target = await asyncio.start_server(_hash_reply, "127.0.0.1", 0)
    port = target.sockets[0].getsockname()[1]
    task = asyncio.create_task(quictun.serve(
        "lib", forward=f"127.0.0.1:{port}", signal=relay.url, secret=SECRET, mode="relay",
        identity=Identity.generate(), on_event=lambda s: None, config=TunnelConfig()))
    for _ in range(200):
        if relay.stats.get("names", 0) >= 1:
            break
        await asyncio.sleep(0.05)
    try:
        yield relay
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        target.close()
        await relay.stop()


def _cut_client(relay: RelayServer, tunnel: quictun.Tunnel) -> None:
    ws = tunnel.signal._ws
    assert ws is not None
    ws.transport.abort()


def _cut_server(relay: RelayServer, tunnel: quictun.Tunnel) -> None:
    mm = relay.matchmaker
    assert mm is not None
    holder = mm.registry.get("lib")
    assert holder is not None and holder.conn_id is not None
    relay._peers[holder.conn_id].ws.transport.abort()


@pytest.mark.parametrize("cut", [_cut_client, _cut_server], ids=["client-link", "server-link"])
async def test_a_broken_relay_link_resumes_and_the_transfer_completes(world, cut) -> None:  # type: ignore[no-untyped-def]
    relay: RelayServer = world
    async with quictun.connect("lib", signal=relay.url, secret=SECRET, mode="relay",
                               identity=Identity.generate(), on_status=lambda s: None) as t:
        reader, writer = await t.open_connection()
        h, total = hashlib.sha256(), 0
        for i in range(24):
            block = os.urandom(256 * 1024)
            h.update(block)
            total += len(block)
            writer.write(block)
            await writer.drain()
            if i == 6:
                cut(relay, t)
        writer.write_eof()
        reply = await asyncio.wait_for(reader.readline(), 60)
        assert reply.decode().split() == [h.hexdigest(), str(total)]
        assert not t.closed
        assert relay.matchmaker is not None and relay.matchmaker.stats["sessions"] == 1
