"""Several real ``quictun-signal`` instances sharing one real redis-server (started per
test on a free loopback port): names, sessions and relayed data across instances, an
ownership race, an instance killed mid-session, Redis killed and restarted, the
cluster-wide address cap, metrics and JSON logs."""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from clusterkit import (
    MB,
    Client,
    RedisServer,
    Relay,
    expected,
    hash_through,
    parse_prometheus,
    redis_skip_reason,
    spawn_qt,
)
from helpers import PY, Proc, TcpServer, base_env, free_port, hash_then_reply
from websockets.exceptions import ConnectionClosed

from quictun.proto import signalling as sp

pytestmark = pytest.mark.skipif(redis_skip_reason() is not None,
                                reason=redis_skip_reason() or "")


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path)
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def cluster(tmp_path: Path, redis_server: RedisServer) -> Iterator[Callable[..., Relay]]:
    """Start relay instances on ``redis_server``: ``cluster("a", "--peer-link", "off")``."""
    relays: list[Relay] = []

    def start(tag: str, *extra: str, **kw: object) -> Relay:
        r = Relay(tmp_path, tag, redis_server.url, *extra, **kw)  # type: ignore[arg-type]
        relays.append(r)
        return r

    try:
        yield start
    finally:
        for r in relays:
            r.stop()


@pytest.fixture
def procs() -> Iterator[list[Proc]]:
    started: list[Proc] = []
    try:
        yield started
    finally:
        for p in started:
            p.stop()


@pytest.fixture
def target() -> Iterator[TcpServer]:
    s = TcpServer(hash_then_reply)
    try:
        yield s
    finally:
        s.close()


def _serve(tmp: Path, procs: list[Proc], url: str, port: int, name: str = "box") -> Proc:
    p = spawn_qt(tmp, ["serve", name, "--forward", f"127.0.0.1:{port}", "--signal", url],
                 home="srv", tag=f"serve-{name}")
    procs.append(p)
    p.wait_for(f"serving '{name}'")
    return p


def _connect(tmp: Path, procs: list[Proc], url: str, name: str = "box",
             tag: str = "connect") -> tuple[Proc, int]:
    p = spawn_qt(tmp, ["connect", name, "--listen", "127.0.0.1:0", "--relay-only",
                       "--signal", url], home="cli", tag=tag)
    procs.append(p)
    m = p.wait_for(r"listening on 127\.0\.0\.1:(\d+)")
    return p, int(m.group(1))


def _wait(cond: Callable[[], object], what: str, timeout: float = 30.0) -> object:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = cond()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def test_two_instances_serve_on_one_connect_through_the_other(
        tmp_path: Path, cluster, procs, target) -> None:
    a, b = cluster("a"), cluster("b")
    _serve(tmp_path, procs, a.url, target.port)
    conn, port = _connect(tmp_path, procs, b.url)
    payload = os.urandom(4 * MB)
    assert hash_through(port, payload) == expected(payload)
    assert "path=relay" in conn.text() and "path=direct" not in conn.text()
    # the session is one on each side, bytes entered on both, over the direct link
    assert a.metric("cross_instance_sessions") == b.metric("cross_instance_sessions") == 1
    assert b.metric("relayed_bytes_total") >= len(payload)
    assert a.metric("relayed_bytes_total") > 0
    assert b.metric("peer_link_bytes_total", direction="out") >= len(payload)
    assert a.metric("pairings_total") == 1 and b.metric("sessions_total") == 1
    assert b.metric("pubsub_messages_total", direction="out") == 0


def test_three_instances_over_pubsub(tmp_path: Path, cluster, procs, target) -> None:
    relays = [cluster(t, "--peer-link", "off") for t in ("a", "b", "c")]
    _serve(tmp_path, procs, relays[0].url, target.port)
    for i, relay in enumerate(relays[1:]):
        _conn, port = _connect(tmp_path, procs, relay.url, tag=f"connect-{i}")
        payload = os.urandom(1 * MB + i)
        assert hash_through(port, payload) == expected(payload)
        assert relay.metric("pubsub_messages_total", direction="out") > 0
    assert relays[0].metric("cross_instance_sessions") == 2
    assert relays[0].metric("peer_links") == 0


def test_ownership_race_has_exactly_one_winner_per_name(
        cluster, redis_server: RedisServer) -> None:
    a, b = cluster("a"), cluster("b")
    names = [f"race-{i}" for i in range(40)]

    async def race() -> list[tuple[str, str]]:
        clients = [await Client.open(u) for u in (a.url, b.url) for _ in range(4)]
        owners = ["a1" * 32, "b2" * 32]

        async def claim(i: int, name: str) -> tuple[str, str]:
            side = i % 2  # clients 0-3 on a, 4-7 on b: one per instance per name
            c = clients[side * 4 + (hash(name) % 4)]
            await c.send(c.register(name, owners[side]))
            return name, owners[side]

        # both instances get the same name in the same instant, for every name
        await asyncio.gather(*(claim(i, n) for n in names for i in range(2)))
        outcomes: dict[str, list[str]] = {n: [] for n in names}
        for c in clients:
            while True:
                try:
                    msg = await c.recv(timeout=1.0)
                except TimeoutError:
                    break
                if isinstance(msg, sp.Registered):
                    outcomes[msg.name].append("ok")
                elif isinstance(msg, sp.Error):
                    assert msg.code == "name-taken", msg
                    name = re.search(r"'([^']+)'", msg.message).group(1)  # type: ignore[union-attr]
                    outcomes[name].append("taken")
        for c in clients:
            await c.close()
        return [(n, ",".join(sorted(v))) for n, v in outcomes.items()]

    results = asyncio.run(race())
    assert all(v == "ok,taken" for _n, v in results), results
    for name in names:  # and Redis holds exactly one owner for each
        record = redis_server.command("HGET", f"quictun:name:{name}", "owner")
        assert isinstance(record, str) and len(record) == 64


def test_instance_killed_mid_session_then_restarted(
        tmp_path: Path, cluster, redis_server: RedisServer, procs, target) -> None:
    port_a = free_port()
    a = cluster("a", port=port_a)
    b = cluster("b")
    serve = _serve(tmp_path, procs, a.url, target.port)
    conn, port = _connect(tmp_path, procs, b.url)
    payload = os.urandom(2 * MB)
    assert hash_through(port, payload) == expected(payload)
    import socket
    import threading

    # a transfer in flight when the holder's instance is SIGKILLed
    s = socket.create_connection(("127.0.0.1", port), timeout=30)
    stop = threading.Event()

    def pump() -> None:
        chunk = os.urandom(64 * 1024)
        try:
            while not stop.is_set():
                s.sendall(chunk)
        except OSError:
            pass

    t = threading.Thread(target=pump, daemon=True)
    t.start()
    _wait(lambda: b.metric("relayed_bytes_total") > len(payload) + MB, "traffic")
    a.kill()
    # B ends its half (the link closed), the connector notices and starts retrying
    conn.wait_for(r"tunnel to 'box' closed", timeout=60)
    serve.wait_for("lost the relay", timeout=30)
    assert b.metric("cross_instance_sessions") == 0
    stop.set()
    s.close()
    t.join(5)
    # nothing stays claimed by the dead instance: its record expires by itself
    _wait(lambda: redis_server.command("EXISTS", f"quictun:inst:{a.instance}") == 0,
          "the dead instance's record to expire")
    # systemd restarts it on its port: serve re-registers there, connect gets through
    a2 = cluster("a2", port=port_a)
    _wait(lambda: len(re.findall(r"serving 'box'", serve.text())) >= 2, "re-registration",
          timeout=60)
    owner_inst = redis_server.command("HGET", "quictun:name:box", "inst")
    assert owner_inst == a2.instance

    def roundtrip_ok() -> bool:
        try:
            again = os.urandom(1 * MB)
            return hash_through(port, again) == expected(again)
        except OSError:
            return False

    _wait(roundtrip_ok, "a working tunnel through the restarted instance", timeout=90)


def test_redis_killed_and_restarted(tmp_path: Path, cluster, redis_server: RedisServer,
                                    procs, target) -> None:
    a, b = cluster("a"), cluster("b")
    _serve(tmp_path, procs, a.url, target.port)
    _conn, port = _connect(tmp_path, procs, b.url)
    payload = os.urandom(1 * MB)
    assert hash_through(port, payload) == expected(payload)
    redis_server.kill()
    _wait(lambda: a.get("/healthz")[0] == 503 and b.get("/healthz")[0] == 503,
          "/healthz to report the outage")
    assert a.metric("redis_up") == 0
    # the cross-instance session already established keeps working over its link
    again = os.urandom(1 * MB)
    assert hash_through(port, again) == expected(again)
    # a new connect through the holder's own instance still pairs
    small = os.urandom(100_000)
    r = subprocess.run([PY, "-m", "quictun", "connect", "box", "--stdio", "--relay-only",
                        "--signal", a.url], input=small, capture_output=True, timeout=60,
                       env=base_env(tmp_path / "cli2", "test-secret-phrase"))
    assert r.stdout.decode().strip() == expected(small), r.stderr.decode()
    # through the other instance: one clear line, no traceback
    r = subprocess.run([PY, "-m", "quictun", "connect", "box", "--stdio", "--signal", b.url],
                       input=b"", capture_output=True, timeout=60,
                       env=base_env(tmp_path / "cli3", "test-secret-phrase"))
    err = r.stderr.decode()
    assert r.returncode == 1 and "cannot reach its shared registry" in err, err
    assert "Traceback" not in err
    logged = a.proc.text()
    assert logged.count("lost Redis") == 1, logged
    # Redis comes back empty: the instances reconcile by themselves
    redis_server.start()
    _wait(lambda: a.get("/healthz")[0] == 200 and b.get("/healthz")[0] == 200,
          "/healthz to recover")
    _wait(lambda: redis_server.command("HGET", "quictun:name:box", "inst") == a.instance,
          "the name to be re-claimed")
    assert "is back after" in a.proc.text()
    _conn2, port2 = _connect(tmp_path, procs, b.url, tag="connect-after")
    last = os.urandom(1 * MB)
    assert hash_through(port2, last) == expected(last)


def test_address_cap_holds_across_instances(cluster) -> None:
    a = cluster("a", "--max-per-ip", "3")
    b = cluster("b", "--max-per-ip", "3")

    refused_retries = 0

    async def run() -> str:
        nonlocal refused_retries
        held = [await Client.open(a.url), await Client.open(a.url), await Client.open(b.url)]
        from websockets.asyncio.client import connect

        ws = await connect(b.url, proxy=None, compression=None)
        msg = sp.decode(await asyncio.wait_for(ws.recv(), 10))
        assert isinstance(msg, sp.Error)
        await ws.wait_closed()
        await held[0].close()  # one fewer on a: b admits one more (once a counted it)
        extra = None
        for _ in range(100):
            try:
                extra = await Client.open(b.url)
                break
            except (AssertionError, ConnectionClosed):
                # refused (error too-many-connections, or the close that follows it
                # already there when our hello goes out): not yet
                refused_retries += 1
                await asyncio.sleep(0.1)
        assert extra is not None
        for c in held[1:] + [extra]:
            await c.close()
        return msg.code

    assert asyncio.run(run()) == "too-many-connections"
    assert b.metric("errors_total", kind="too-many-per-ip") == 1 + refused_retries


def test_metrics_and_json_logs(tmp_path: Path, cluster) -> None:
    a = cluster("a", "--log-format", "json")
    standalone = Relay(tmp_path, "solo", None)
    try:
        for relay in (a, standalone):
            status, text = relay.get("/metrics")
            assert status == 200
            fams = parse_prometheus(text)
            for name in ("peers_connected", "names_held", "sessions", "relayed_bytes_total",
                         "relayed_packets_total", "pairings_total", "rejects_total",
                         "errors_total"):
                assert "quictun_signal_" + name in fams, name
        assert "quictun_signal_redis_rtt_seconds" in a.metrics()
        assert a.metric("redis_up") == 1
        assert "quictun_signal_redis_up" not in standalone.metrics()
        assert standalone.get("/healthz") == (200, "OK\n")
    finally:
        standalone.stop()
    lines = [ln for ln in a.proc.text().splitlines()  # stderr; the stdout line aside
             if ln.strip() and not ln.startswith("quictun-signal listening on")]
    assert lines and all(json.loads(ln)["level"] for ln in lines), lines[:3]
    assert any("joined the cluster" in json.loads(ln)["msg"] for ln in lines)


def test_cli_errors_are_one_line(tmp_path: Path) -> None:
    closed = free_port()
    env = base_env(tmp_path / "h")
    argv = [PY, "-m", "signal_server", "--host", "127.0.0.1", "--port", "0"]
    r = subprocess.run(argv + ["--redis", f"redis://:s3cret@127.0.0.1:{closed}/0"],
                       capture_output=True, text=True, env=env, timeout=60)
    assert r.returncode == 1
    lines = [ln for ln in r.stderr.splitlines() if "error:" in ln]
    assert len(lines) == 1 and "cannot reach Redis" in lines[0], r.stderr
    assert "s3cret" not in r.stderr and "Traceback" not in r.stderr
    assert "process list" in r.stderr  # the password-on-the-command-line warning
    r = subprocess.run(argv + ["--redis", "bogus://x"], capture_output=True, text=True,
                       env=env, timeout=60)
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    assert "Redis URL" in r.stderr


def test_peer_link_refuses_strangers(cluster, redis_server: RedisServer) -> None:
    import socket

    from signal_server import peerwire as pw
    from signal_server.peerlink import split_hostport

    a = cluster("a")
    record = json.loads(str(redis_server.command("GET", f"quictun:inst:{a.instance}")))
    host, port = split_hostport(record["link"])
    for first in (pw.frame(pw.encode_hello(pw.LinkHello("intruder", "0" * 32))),
                  pw.frame(b"\x00{}"), b""):  # a wrong token, no hello, silence
        with socket.create_connection((host, port), timeout=10) as s:
            s.sendall(first)
            s.settimeout(15)
            assert s.recv(100) == b""  # closed on us
    assert "wrong token" in a.proc.text() and "no hello" in a.proc.text()


def test_a_sigtermed_instance_leaves_the_cluster_before_it_exits(
        tmp_path: Path, cluster, redis_server: RedisServer, procs, target) -> None:
    """`systemctl stop` on one instance: before it exits it closes its clients, releases
    the names it held (kept for their owners, held by nobody) and withdraws its record,
    so the other instances never send anyone to it; the connector through the other
    instance hears at once that the session ended."""
    import signal

    a, b = cluster("a"), cluster("b")
    serve = _serve(tmp_path, procs, a.url, target.port)
    conn, port = _connect(tmp_path, procs, b.url)
    payload = os.urandom(MB)
    assert hash_through(port, payload) == expected(payload)
    assert redis_server.command("HGET", "quictun:name:box", "inst") == a.instance
    os.kill(a.proc.p.pid, signal.SIGTERM)
    assert a.proc.p.wait(30) == 0
    # at the moment it is gone, nothing in Redis points at it any more
    assert redis_server.command("EXISTS", f"quictun:inst:{a.instance}") == 0
    assert redis_server.command("HGET", "quictun:name:box", "inst") == ""
    assert "stopping on SIGTERM" in a.proc.text() and "Traceback" not in a.proc.text()
    serve.wait_for("lost the relay")
    conn.wait_for(r"tunnel to 'box' closed", timeout=60)
