"""Failover between relay instances behind one hostname (DNS round robin), in a network
namespace where ``relay.test`` resolves to three addresses, each served by a real
``quictun-signal`` instance sharing one real redis-server. Real ``quictun serve`` and
``quictun connect --listen --relay-only`` use ``ws://relay.test:8765/``. Needs root
(namespaces, nftables); skipped with the reason otherwise."""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from clusterkit import MB, QT, RedisServer, Relay, redis_skip_reason
from dnsns import ADDRESSES, HOSTNAME, DnsNamespace
from helpers import PY, Proc, base_env
from lab.netlab import lab_available

pytestmark = pytest.mark.lab
PORT = 8765
TARGET = 7000
NSPROCS = str(Path(__file__).with_name("nsprocs.py"))


def _skip_reason() -> str | None:
    return lab_available() or redis_skip_reason()


@pytest.fixture
def ns() -> Iterator[DnsNamespace]:
    reason = _skip_reason()
    if reason:
        pytest.skip(f"needs root, nft and redis-server: {reason}")
    with DnsNamespace() as space:
        yield space


def _send(ns: DnsNamespace, port: int, size: int) -> dict[str, str]:
    r = subprocess.run(ns.wrap() + [PY, NSPROCS, "send", str(port), str(size)],
                       capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def _eventually_sent(ns: DnsNamespace, port: int, size: int, timeout: float = 90.0) -> None:
    """A transfer through ``port`` with the hash intact, retried while the tunnel is
    being re-established (the listener refuses connections meanwhile)."""
    deadline = time.monotonic() + timeout
    last: dict[str, str] = {}
    while time.monotonic() < deadline:
        last = _send(ns, port, size)
        if last["got"] == last["expected"]:
            return
        time.sleep(0.5)
    raise AssertionError(f"no intact transfer through the tunnel: {last}")


def test_failover_across_the_addresses_of_one_hostname(tmp_path: Path, ns: DnsNamespace) -> None:
    wrap = ns.wrap()
    redis = RedisServer(tmp_path, wrap=wrap)
    started: list[Proc] = []
    relays: dict[str, Relay] = {}
    try:
        for i, addr in enumerate(ADDRESSES):
            relays[addr] = Relay(tmp_path, f"r{i}", redis.url, host=addr, port=PORT,
                                 wrap=wrap)
        url = f"ws://{HOSTNAME}:{PORT}/"
        target = Proc(wrap + [PY, NSPROCS, "target", str(TARGET)],
                      env=base_env(tmp_path / "t"), log=tmp_path / "target.log")
        started.append(target)
        target.wait_for("target ready")
        serve = Proc(wrap + QT + ["serve", "box", "--forward", f"127.0.0.1:{TARGET}",
                                  "--signal", url],
                     env=base_env(tmp_path / "srv"), log=tmp_path / "serve.log")
        started.append(serve)
        serve.wait_for("serving 'box'")
        conn = Proc(wrap + QT + ["connect", "box", "--listen", "127.0.0.1:2222",
                                 "--relay-only", "--signal", url],
                    env=base_env(tmp_path / "cli"), log=tmp_path / "connect.log")
        started.append(conn)
        conn.wait_for("listening on 127.0.0.1:2222")
        _eventually_sent(ns, 2222, 2 * MB, timeout=30)

        # kill the instance holding the name, in the middle of a transfer
        holder = redis.command("HGET", "quictun:name:box", "inst")
        victim = next(r for r in relays.values() if r.instance == holder)
        big = subprocess.Popen(wrap + [PY, NSPROCS, "send", "2222", str(400 * MB)],
                               stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        time.sleep(1.0)
        victim.kill()
        out, _ = big.communicate(timeout=120)
        interrupted = json.loads(out)
        assert interrupted["got"] != interrupted["expected"]  # that transfer was cut
        serve.wait_for("lost the relay", timeout=30)
        deadline = time.monotonic() + 60
        while len(re.findall(r"serving 'box'", serve.text())) < 2:
            assert time.monotonic() < deadline, serve.text()
            time.sleep(0.1)
        new_holder = redis.command("HGET", "quictun:name:box", "inst")
        assert new_holder not in (None, "", holder)
        _eventually_sent(ns, 2222, 2 * MB)

        # a machine that vanishes without a refusal: SYNs to the first address vanish;
        # a fresh client still gets through on another address within its timeout
        first = ns.resolved()[0]
        ns.blackhole(first, PORT)
        probe = os.urandom(300_000)
        r = subprocess.run(wrap + QT + ["connect", "box", "--stdio", "--relay-only",
                                        "--signal", url],
                           input=probe, capture_output=True, timeout=90,
                           env=base_env(tmp_path / "cli2"))
        want = f"{hashlib.sha256(probe).hexdigest()} {len(probe)}"
        assert r.stdout.decode().strip() == want, r.stderr.decode()
        # nothing stays claimed by the dead instance
        deadline = time.monotonic() + 30
        while redis.command("EXISTS", f"quictun:inst:{victim.instance}") != 0:
            assert time.monotonic() < deadline, "the dead instance's record never expired"
            time.sleep(0.2)
    finally:
        for p in reversed(started):
            p.stop()
        for relay in relays.values():
            relay.stop()
        redis.stop()
