"""The README's "Several relays as one (Redis)" commands work as printed: one Redis, two
relays, `serve` on the first, `connect` through the second, bytes through the tunnel
(ports swapped for free ones, sshd for a hashing target; nothing else changed)."""

from __future__ import annotations

import os
import re
import shlex
import sys
from pathlib import Path

import pytest
from clusterkit import (
    RedisServer,
    expected,
    hash_through,
    http_get,
    parse_prometheus,
    redis_skip_reason,
)
from helpers import Proc, TcpServer, base_env, free_port, hash_then_reply

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent

pytestmark = pytest.mark.skipif(redis_skip_reason() is not None,
                                reason=redis_skip_reason() or "")


def _commands(doc: Path, title: str) -> list[str]:
    text = doc.read_text()
    start = text.index(f"\n## {title}\n")
    end = text.find("\n## ", start + 1)
    block = re.search(r"```sh\n(.*?)```", text[start:end], re.S)
    assert block, f"no sh block in {title!r}"
    return [ln for ln in block.group(1).splitlines() if ln.strip()]


@pytest.mark.parametrize("doc,title", [
    (ROOT / "README.md", "Several relays as one (Redis)"),
    (ROOT / "docs" / "relay-cluster.md", "Try it on one machine"),
])
def test_cluster_commands_work_as_printed(tmp_path: Path, doc: Path, title: str) -> None:
    lines = _commands(doc, title)
    assert len(lines) == 6 and lines[-1].startswith("ssh -p 2222 "), lines
    target = TcpServer(hash_then_reply)
    ports = {"6379": str(free_port()), "8765": str(free_port()), "8766": str(free_port()),
             "2222": str(free_port()), "127.0.0.1:22 ": f"127.0.0.1:{target.port} "}
    procs: list[Proc] = []
    redis: RedisServer | None = None
    try:
        for i, line in enumerate(lines[:5]):
            for old, new in ports.items():
                line = line.replace(old, new)
            words = shlex.split(line)
            env = base_env(tmp_path / f"home{i}", secret=None)
            while "=" in words[0]:
                key, value = words.pop(0).split("=", 1)
                env[key] = value
            if words[0] == "redis-server":
                port = words[words.index("--port") + 1]
                redis = RedisServer(tmp_path, int(port))  # the same command, and a PING
                assert words[1:] == ["--port", port, "--save", "", "--appendonly", "no"]
                continue
            words[0] = str(BIN / words[0])  # quictun / quictun-signal of this install
            p = Proc(words, env=env, log=tmp_path / f"cmd{i}.log")
            procs.append(p)
            p.wait_for({"quictun-signal": "listening on", "quictun": "serving 'box'|listening on"}
                       [Path(words[0]).name], timeout=30)
        payload = os.urandom(500_000)
        assert hash_through(int(ports["2222"]), payload) == expected(payload)
        # the second relay's metrics show the session crossing between the two
        status, text = http_get(f"http://127.0.0.1:{ports['8766']}/metrics")
        fams = parse_prometheus(text)
        assert fams["quictun_signal_cross_instance_sessions"][()] == 1, status
    finally:
        for p in reversed(procs):
            p.stop()
        if redis is not None:
            redis.stop()
        target.close()
