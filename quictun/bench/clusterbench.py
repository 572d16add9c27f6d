"""Measure a relay cluster: idle peers over two instances, pairings and relayed MB/s on
one instance versus across two, and how long a name takes to be reachable again after
its instance dies.

Run ``python -m quictun.bench.clusterbench`` (``--json`` for one JSON object). It
starts its own ``redis-server`` (Debian's package) on a free loopback port and the
relay instances as child processes (``python -m signal_server --redis ...``), so RSS is
measured per process from ``/proc``. Raw WebSocket clients speak the relay protocol
(docs/protocol.md): the figures are the relay's, not QUIC's. Relayed traffic is sent
by one child process and received by another, with a window of frames in flight
acknowledged through the relay (as QUIC's ACKs would), so nothing is dropped.

This is a measurement tool, not a test: it asserts nothing about the numbers.
"""

from __future__ import annotations

import asyncio
import json
import multiprocessing as mp
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import click

from quictun.proto import signalling as sp

from .loadtest import _hello, _raise_fd_limit, _recv, register, rss_kib

FRAME_PACKETS = 13  # ~16 KiB per WebSocket message, as clients batch (RELAY_BATCH_BYTES)
PACKET = 1252
WINDOW = 64  # frames in flight
ACK_EVERY = 16


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of ``pid`` so far (Linux ``/proc``), 0 if unknown."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return 0.0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Rig:
    """A redis-server and relay instances, all children of this process."""

    def __init__(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="qt-clusterbench-"))
        self.redis_port = _free_port()
        self.redis: subprocess.Popen[bytes] | None = None
        self.relays: dict[str, tuple[subprocess.Popen[str], str]] = {}

    @property
    def redis_url(self) -> str:
        return f"redis://127.0.0.1:{self.redis_port}/0"

    def start_redis(self) -> None:
        if shutil.which("redis-server") is None:
            raise click.ClickException("redis-server is not installed (apt-get install "
                                       "redis-server)")
        self.redis = subprocess.Popen(
            ["redis-server", "--port", str(self.redis_port), "--bind", "127.0.0.1",
             "--save", "", "--appendonly", "no", "--dir", str(self.dir)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.redis_port), 0.5) as s:
                    s.sendall(b"PING\r\n")
                    if s.recv(16).startswith(b"+PONG"):
                        return
            except OSError:
                time.sleep(0.05)
        raise click.ClickException("redis-server did not start")

    def redis_memory(self) -> int:
        with socket.create_connection(("127.0.0.1", self.redis_port), 2) as s:
            s.sendall(b"INFO memory\r\n")
            data = b""
            while b"used_memory:" not in data or not data.endswith(b"\r\n"):
                data += s.recv(65536)
        m = re.search(rb"used_memory:(\d+)", data)
        return int(m.group(1)) if m else 0

    def start_relay(self, tag: str, *extra: str, redis: bool = True) -> str:
        argv = [sys.executable, "-m", "signal_server", "--host", "127.0.0.1", "--port", "0",
                "--connect-rate", "0", "--register-rate", "0",
                "--max-per-ip", "100000", *extra]
        env = dict(os.environ)
        if redis:
            env["QUICTUN_SIGNAL_REDIS"] = self.redis_url
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                text=True, env=env)
        assert proc.stdout is not None
        line = proc.stdout.readline()
        match = re.search(r"(ws://\S+?/)", line)
        if not match:
            proc.kill()
            raise click.ClickException(f"relay did not start: {line!r}")
        self.relays[tag] = (proc, match.group(1))
        return match.group(1)

    def pid(self, tag: str) -> int:
        return self.relays[tag][0].pid

    def kill(self, tag: str) -> None:
        proc, _ = self.relays.pop(tag)
        proc.send_signal(signal.SIGKILL)
        proc.wait()

    def stop_relays(self) -> None:
        for proc, _ in self.relays.values():
            proc.terminate()
        for proc, _ in self.relays.values():
            proc.wait()
        self.relays.clear()

    def close(self) -> None:
        self.stop_relays()
        if self.redis is not None:
            self.redis.terminate()
            self.redis.wait()
        shutil.rmtree(self.dir, ignore_errors=True)


# --- idle peers ------------------------------------------------------------------------


async def idle_peers(rig: Rig, urls: list[str], peers: int) -> dict[str, Any]:
    """``peers`` connections spread over ``urls``, each holding one name."""
    pids = [rig.relays[t][0].pid for t in rig.relays]
    rss0 = [rss_kib(p) or 0 for p in pids]
    mem0 = rig.redis_memory()
    clients = []
    t0 = time.perf_counter()
    for start in range(0, peers, 100):
        batch = [urls[i % len(urls)] for i in range(start, min(peers, start + 100))]
        clients += await asyncio.gather(*(_hello(u) for u in batch))
    for start in range(0, peers, 500):
        group = clients[start : start + 500]
        await asyncio.gather(*(ws.send(register(ws, f"idle-{start + i}"))
                               for i, ws in enumerate(group)))
        for ws in group:
            msg = await _recv(ws)
            assert isinstance(msg, sp.Registered), msg
    setup = time.perf_counter() - t0
    await asyncio.sleep(2.0)
    rss1 = [rss_kib(p) or 0 for p in pids]
    mem1 = rig.redis_memory()
    per_instance = peers / len(urls)
    out = {
        "peers": peers, "instances": len(urls), "setup_seconds": round(setup, 2),
        "kib_per_peer": [round((b - a) / per_instance, 2) for a, b in zip(rss0, rss1, strict=True)],
        "rss_mib": [round(b / 1024, 1) for b in rss1],
        "redis_bytes_per_name": round((mem1 - mem0) / peers, 1),
        "redis_used_mib": round(mem1 / 2**20, 2),
    }
    await asyncio.gather(*(ws.close() for ws in clients))
    return out


# --- pairings --------------------------------------------------------------------------


async def _pair_setup(owner_url: str, connector_url: str) -> tuple[Any, Any, str]:
    owner, connector = await _hello(owner_url), await _hello(connector_url)
    name = "bench-" + os.urandom(4).hex()
    await owner.send(register(owner, name))
    await _recv(owner)
    return owner, connector, name


async def _pair_loop(owner: Any, connector: Any, name: str, n: int,
                     times: list[float]) -> None:
    offer = {"cands": ["192.0.2.1:4433", "[2001:db8::1]:4433"], "fp": "ab" * 32}
    for _ in range(n):
        t = time.perf_counter()
        await connector.send(sp.encode(sp.Connect(name=name, offer=offer)))
        incoming = await _recv(owner)
        assert isinstance(incoming, sp.Incoming), incoming
        await owner.send(sp.encode(sp.Answer(session=incoming.session, answer=offer)))
        answer, go = await asyncio.gather(_recv(connector), _recv(owner))
        assert isinstance(answer, sp.Answer) and isinstance(go, sp.Go)
        times.append(time.perf_counter() - t)
        await connector.send(sp.encode(sp.Close(session=answer.session, reason="bench")))
        await _recv(owner)  # closed


async def pairings(owner_url: str, connector_url: str, count: int,
                   parallel: int) -> dict[str, float]:
    """connect -> incoming -> answer -> (answer, go): ``count`` sequential round trips
    by one pair (latency), then ``count`` spread over ``parallel`` pairs at once
    (throughput). Connections and names are set up before the clock starts."""
    owner, connector, name = await _pair_setup(owner_url, connector_url)
    seq: list[float] = []
    await _pair_loop(owner, connector, name, count, seq)
    pairs = await asyncio.gather(*(_pair_setup(owner_url, connector_url)
                                   for _ in range(parallel)))
    par: list[float] = []
    t0 = time.perf_counter()
    await asyncio.gather(*(_pair_loop(o, c, n, max(1, count // parallel), par)
                           for o, c, n in pairs))
    wall = time.perf_counter() - t0
    for o, c, _n in [(owner, connector, name), *pairs]:
        await o.close()
        await c.close()
    return {
        "sequential_ms_median": round(statistics.median(seq) * 1000, 3),
        "sequential_per_s": round(len(seq) / sum(seq), 1),
        "parallel_per_s": round(len(par) / wall, 1),
    }


def _median_of(runs: list[dict[str, float]]) -> dict[str, float]:
    return {k: statistics.median(r[k] for r in runs) for k in runs[0]}


# --- relayed throughput (two child processes) ------------------------------------------


def _frame(sid: int) -> bytes:
    return sp.encode_relay_batch(sid, [os.urandom(PACKET)] * FRAME_PACKETS)


async def _receiver(url: str, name: str, total: int, ready: Any, result: Any) -> None:
    ws = await _hello(url)
    await ws.send(register(ws, name))
    await _recv(ws)
    ready.send("registered")
    incoming = await _recv(ws)
    assert isinstance(incoming, sp.Incoming)
    await ws.send(sp.encode(sp.Answer(session=incoming.session, answer={})))
    sid, got, frames, t0 = incoming.session, 0, 0, 0.0
    while got < total:
        data = await asyncio.wait_for(ws.recv(), 30)
        if isinstance(data, str):
            continue
        if not t0:
            t0 = time.perf_counter()
        got += len(data) - 5
        frames += 1
        if frames % ACK_EVERY == 0:
            await ws.send(sp.encode_relay(sid, frames.to_bytes(8, "big")))
    elapsed = time.perf_counter() - t0
    await ws.send(sp.encode_relay(sid, frames.to_bytes(8, "big")))
    result.send({"bytes": got, "seconds": elapsed})
    await asyncio.sleep(0.5)
    await ws.close()


async def _sender(url: str, name: str, total: int) -> None:
    ws = await _hello(url)
    await ws.send(sp.encode(sp.Connect(name=name, offer={})))
    answer = await _recv(ws)
    assert isinstance(answer, sp.Answer), answer
    frame = _frame(answer.session)
    acked = sent = done = 0
    acks: asyncio.Queue[int] = asyncio.Queue()

    async def read_acks() -> None:
        async for data in ws:
            if isinstance(data, bytes):
                await acks.put(int.from_bytes(data[5:13], "big"))

    reader = asyncio.create_task(read_acks())
    while done < total:
        while sent - acked >= WINDOW:
            acked = max(acked, await acks.get())
        await ws.send(frame)
        sent += 1
        done += len(frame) - 5
    while acked < sent:
        acked = max(acked, await asyncio.wait_for(acks.get(), 30))
    reader.cancel()
    await ws.close()


def _run_receiver(url: str, name: str, total: int, ready: Any, result: Any) -> None:
    asyncio.run(_receiver(url, name, total, ready, result))


def _run_sender(url: str, name: str, total: int) -> None:
    asyncio.run(_sender(url, name, total))


def relayed_mb_per_s(receiver_url: str, sender_url: str, megabytes: int) -> float:
    """MB/s (10^6 bytes) of relayed frames from a sender on ``sender_url`` to a receiver
    on ``receiver_url``, each in its own process."""
    ctx = mp.get_context("spawn")
    name = "flow-" + os.urandom(4).hex()
    total = megabytes * 1_000_000
    ready_r, ready_w = ctx.Pipe(False)
    res_r, res_w = ctx.Pipe(False)
    recv_p = ctx.Process(target=_run_receiver, args=(receiver_url, name, total, ready_w, res_w))
    recv_p.start()
    if not ready_r.poll(30):
        recv_p.kill()
        raise click.ClickException("the receiver did not register")
    ready_r.recv()
    send_p = ctx.Process(target=_run_sender, args=(sender_url, name, total))
    send_p.start()
    if not res_r.poll(300):
        send_p.kill()
        recv_p.kill()
        raise click.ClickException("the relayed transfer did not finish")
    result = res_r.recv()
    send_p.join(30)
    recv_p.join(30)
    return round(result["bytes"] / result["seconds"] / 1e6, 1)


# --- failover --------------------------------------------------------------------------


async def reachable_again(rig: Rig, dead: str, survivor: str) -> dict[str, float]:
    """A holder on ``dead`` that re-registers on ``survivor`` as soon as it loses its
    relay, and a prober on ``survivor``: seconds from SIGKILL of ``dead`` to the
    holder's loss noticed, re-registered, and the first successful pairing."""
    dead_url, survivor_url = rig.relays[dead][1], rig.relays[survivor][1]
    name = "failover-" + os.urandom(4).hex()
    holder = await _hello(dead_url)
    await holder.send(register(holder, name))
    await _recv(holder)
    prober = await _hello(survivor_url)
    t_kill = time.perf_counter()
    rig.kill(dead)
    try:
        await asyncio.wait_for(holder.recv(), 30)
    except Exception:  # the connection dropped, as expected
        pass
    t_lost = time.perf_counter()
    holder = await _hello(survivor_url)
    await holder.send(register(holder, name))
    registered = await _recv(holder)
    assert isinstance(registered, sp.Registered), registered
    t_reg = time.perf_counter()
    await prober.send(sp.encode(sp.Connect(name=name, offer={})))
    incoming = await _recv(holder)
    assert isinstance(incoming, sp.Incoming)
    await holder.send(sp.encode(sp.Answer(session=incoming.session, answer={})))
    assert isinstance(await _recv(prober), sp.Answer)
    t_ok = time.perf_counter()
    await holder.close()
    await prober.close()
    return {"loss_noticed_s": round(t_lost - t_kill, 3),
            "reregistered_s": round(t_reg - t_kill, 3),
            "reachable_s": round(t_ok - t_kill, 3)}


async def session_end_noticed(rig: Rig, dead: str, survivor: str) -> float:
    """Seconds from SIGKILL of ``dead`` (holding one member of a session) to ``closed``
    reaching the other member on ``survivor``."""
    name = "peerdown-" + os.urandom(4).hex()
    holder = await _hello(rig.relays[dead][1])
    await holder.send(register(holder, name))
    await _recv(holder)
    connector = await _hello(rig.relays[survivor][1])
    await connector.send(sp.encode(sp.Connect(name=name, offer={})))
    incoming = await _recv(holder)
    await holder.send(sp.encode(sp.Answer(session=incoming.session, answer={})))
    await _recv(connector)
    t = time.perf_counter()
    rig.kill(dead)
    closed = await asyncio.wait_for(_recv(connector), 60)
    assert isinstance(closed, sp.Closed), closed
    took = time.perf_counter() - t
    await connector.close()
    return round(took, 3)


# --- driver ----------------------------------------------------------------------------


def run_all(peers: int, pairing_count: int, relay_mb: int, repeat: int) -> dict[str, Any]:
    """Every measurement; pairings and MB/s are the median of ``repeat`` runs."""
    out: dict[str, Any] = {"cpus": os.cpu_count(), "repeat": repeat}
    rig = Rig()

    def pair(o: str, c: str) -> dict[str, float]:
        return _median_of([asyncio.run(pairings(o, c, pairing_count, 16))
                           for _ in range(repeat)])

    def flow(r: str, s: str) -> dict[str, float]:
        """MB/s, and CPU milliseconds per MB spent by the relays and by Redis."""
        pids = [rig.pid(t) for t, (_p, u) in rig.relays.items() if u in (r, s)]
        redis_pid = rig.redis.pid if rig.redis else 0
        relay0, redis0 = sum(cpu_seconds(p) for p in pids), cpu_seconds(redis_pid)
        rates = [relayed_mb_per_s(r, s, relay_mb) for _ in range(repeat)]
        mb = relay_mb * repeat
        return {"mb_s": statistics.median(rates),
                "relay_cpu_ms_per_mb": round(
                    (sum(cpu_seconds(p) for p in pids) - relay0) * 1000 / mb, 2),
                "redis_cpu_ms_per_mb": round((cpu_seconds(redis_pid) - redis0) * 1000 / mb,
                                             2)}

    try:
        rig.start_redis()
        a, b = rig.start_relay("a"), rig.start_relay("b")
        if peers:
            out["idle"] = asyncio.run(idle_peers(rig, [a, b], peers))
        solo = rig.start_relay("solo", redis=False)
        c, d = (rig.start_relay(t, "--peer-link", "off") for t in ("c", "d"))
        out["pairings_standalone"] = pair(solo, solo)
        out["pairings_same_instance"] = pair(a, a)
        out["pairings_cross_link"] = pair(a, b)
        out["pairings_cross_pubsub"] = pair(c, d)
        out["relay_mb_s_standalone"] = flow(solo, solo)
        out["relay_mb_s_same_instance"] = flow(a, a)
        out["relay_mb_s_cross_link"] = flow(a, b)
        out["relay_mb_s_cross_pubsub"] = flow(c, d)
        out["failover"] = asyncio.run(reachable_again(rig, "a", "b"))
        rig.start_relay("e")
        out["peer_down_closed_s_link"] = asyncio.run(session_end_noticed(rig, "e", "b"))
        out["peer_down_closed_s_pubsub"] = asyncio.run(session_end_noticed(rig, "c", "d"))
        out["redis_used_mib_end"] = round(rig.redis_memory() / 2**20, 2)
    finally:
        rig.close()
    return out


@click.command()
@click.option("--peers", default=10000, show_default=True,
              help="Idle peers (each holding a name) over two instances; 0 skips.")
@click.option("--pairings", "pairing_count", default=400, show_default=True,
              help="Pairings per measurement.")
@click.option("--relay-mb", default=200, show_default=True, help="MB per relayed transfer.")
@click.option("--repeat", default=3, show_default=True,
              help="Runs per pairing/MB/s figure (the median is reported).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def main(peers: int, pairing_count: int, relay_mb: int, repeat: int, as_json: bool) -> None:
    """Measure a two-instance relay cluster on this machine (see the module docstring)."""
    _raise_fd_limit(2 * peers + 1024)
    result = run_all(peers, pairing_count, relay_mb, repeat)
    if as_json:
        print(json.dumps(result))
        return
    for key, value in result.items():
        print(f"{key:>28}: {value}")


if __name__ == "__main__":
    main()
