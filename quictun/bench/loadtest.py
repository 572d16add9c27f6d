"""Measure the relay: memory with many idle peers, and time per pairing.

Run ``python -m quictun.bench.loadtest --peers 1000 --pairings 200``. Without ``--url``
it starts ``python -m signal_server`` on 127.0.0.1 in a child process (so the server's
RSS is measured alone, from ``/proc/PID/status``), opens ``--peers`` WebSocket clients
that each complete ``hello``, then times ``--pairings`` sequential
connect -> incoming -> answer -> (answer + go) round trips between one owner and one
connector. Prints a summary, or one JSON object with ``--json`` (for benchmarks).

This is a measurement tool, not a test: it asserts nothing about the numbers.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import resource
import statistics
import subprocess
import sys
import time
from typing import Any

import click
from websockets.asyncio.client import ClientConnection, connect

from quictun.proto import signalling as sp
from quictun.proto.identity import Identity

IDENTITY = Identity.generate()  # the owner of every name the benchmark registers


def _raise_fd_limit(wanted: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))


def rss_kib(pid: int) -> int | None:
    """Resident set size of ``pid`` in KiB (Linux), or None if unavailable."""
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


async def _recv(ws: ClientConnection) -> sp.Message:
    data = await asyncio.wait_for(ws.recv(), 30)
    assert isinstance(data, str)
    return sp.decode(data)


async def _hello(url: str) -> ClientConnection:
    ws = await connect(url, proxy=None, open_timeout=60, compression=None)
    await ws.send(sp.encode(sp.Hello(v=sp.PROTOCOL_VERSION, token=None, agent="loadtest")))
    msg = await _recv(ws)
    if not isinstance(msg, sp.Welcome):
        raise RuntimeError(f"expected welcome, got {msg}")
    ws.challenge = msg.challenge  # type: ignore[attr-defined]
    return ws


def register(ws: ClientConnection, name: str) -> str:
    """The text of a ``register`` of ``name`` by this benchmark's identity, signed for the
    connection ``ws`` (whose welcome's challenge :func:`_hello` kept)."""
    challenge = bytes.fromhex(ws.challenge)  # type: ignore[attr-defined]
    sig = IDENTITY.sign(sp.register_signed(challenge, name))
    return sp.encode(sp.Register(name=name, key=IDENTITY.public_bytes.hex(), sig=sig.hex()))


async def open_idle_peers(url: str, count: int, batch: int = 100) -> list[ClientConnection]:
    """Open ``count`` connections that each completed hello/welcome."""
    peers: list[ClientConnection] = []
    for start in range(0, count, batch):
        n = min(batch, count - start)
        peers.extend(await asyncio.gather(*(_hello(url) for _ in range(n))))
    return peers


async def time_pairings(url: str, pairings: int) -> list[float]:
    """Seconds per connect -> answer -> (answer, go) round trip, ``pairings`` times."""
    owner = await _hello(url)
    connector = await _hello(url)
    name = "bench-" + os.urandom(4).hex()
    await owner.send(register(owner, name))
    await _recv(owner)
    offer = {"cands": ["192.0.2.1:4433", "[2001:db8::1]:4433"], "fp": "ab" * 32}
    times: list[float] = []
    try:
        for _ in range(pairings):
            t0 = time.perf_counter()
            await connector.send(sp.encode(sp.Connect(name=name, offer=offer)))
            incoming = await _recv(owner)
            assert isinstance(incoming, sp.Incoming)
            await owner.send(sp.encode(sp.Answer(session=incoming.session, answer=offer)))
            answer, go = await asyncio.gather(_recv(connector), _recv(owner))
            times.append(time.perf_counter() - t0)
            assert isinstance(answer, sp.Answer) and isinstance(go, sp.Go)
            await connector.send(sp.encode(sp.Close(session=incoming.session, reason="bench")))
            await _recv(owner)  # closed
    finally:
        await owner.close()
        await connector.close()
    return times


async def run_loadtest(
    peers: int, pairings: int, url: str | None = None, pid: int | None = None
) -> dict[str, Any]:
    """Run both measurements against ``url`` (server process ``pid`` for RSS)."""
    result: dict[str, Any] = {"peers": peers, "pairings": pairings}
    result["rss_kib_before"] = rss_kib(pid) if pid else None
    t0 = time.perf_counter()
    clients = await open_idle_peers(url, peers) if peers else []
    result["connect_seconds"] = round(time.perf_counter() - t0, 3)
    await asyncio.sleep(1.0)  # let the server settle
    result["rss_kib_idle_peers"] = rss_kib(pid) if pid else None
    if result["rss_kib_before"] and result["rss_kib_idle_peers"] and peers:
        delta = result["rss_kib_idle_peers"] - result["rss_kib_before"]
        result["kib_per_peer"] = round(delta / peers, 2)
    times = await time_pairings(url, pairings) if pairings else []
    if times:
        ordered = sorted(times)
        result["pairing_ms_mean"] = round(statistics.fmean(times) * 1000, 3)
        result["pairing_ms_median"] = round(statistics.median(times) * 1000, 3)
        result["pairing_ms_p95"] = round(ordered[int(len(ordered) * 0.95) - 1] * 1000, 3)
    await asyncio.gather(*(ws.close() for ws in clients))
    return result


def _start_server(max_per_ip: int) -> tuple[subprocess.Popen[str], str]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "signal_server", "--host", "127.0.0.1", "--port", "0",
         "--connect-rate", "0", "--register-rate", "0"]
        + ["--max-per-ip", str(max_per_ip)],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    match = re.search(r"(ws://\S+?/)", line)
    if not match:
        proc.kill()
        raise RuntimeError(f"relay did not start: {line!r}")
    return proc, match.group(1)


@click.command()
@click.option("--peers", default=1000, show_default=True, help="Idle hello'd connections.")
@click.option("--pairings", default=200, show_default=True, help="Timed pairings.")
@click.option("--url", default=None, help="Use a running relay instead of starting one.")
@click.option("--pid", type=int, default=None, help="PID of that relay, for RSS.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def main(peers: int, pairings: int, url: str | None, pid: int | None, as_json: bool) -> None:
    """Measure relay RSS with idle peers and the time per pairing."""
    _raise_fd_limit(2 * peers + 256)
    proc = None
    if url is None:
        proc, url = _start_server(peers + 16)
        pid = proc.pid
    try:
        result = asyncio.run(run_loadtest(peers, pairings, url, pid))
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait()
    if as_json:
        print(json.dumps(result))
        return
    for key, value in result.items():
        print(f"{key:>22}: {value}")


if __name__ == "__main__":
    main()
