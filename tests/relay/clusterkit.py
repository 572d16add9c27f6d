"""Real components for the relay-cluster tests: a redis-server per test on a free
loopback port, real ``quictun-signal`` instances, real ``quictun`` processes, raw
WebSocket clients, a strict Prometheus text parser. Everything started is stopped by its
owner (the fixtures in test_cluster_redis.py)."""

from __future__ import annotations

import asyncio
import hashlib
import os
import re
import shutil
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

from helpers import PY, Proc, base_env, free_port

from quictun.proto import signalling as sp

MB = 1024 * 1024


def redis_skip_reason() -> str | None:
    """Why the Redis tests cannot run here, or None."""
    if shutil.which("redis-server") is None:
        return "redis-server is not installed (apt-get install redis-server)"
    try:
        import redis  # noqa: F401
    except ImportError:
        return "the redis package is not installed (pip install 'quictun[redis]')"
    return None


class RedisServer:
    """``redis-server --port P --save '' --appendonly no`` on 127.0.0.1 (no persistence,
    so a restart is a Redis that forgot everything, the hard case)."""

    def __init__(self, workdir: Path, port: int | None = None, host: str = "127.0.0.1",
                 wrap: list[str] | None = None) -> None:
        self.port = port or free_port()
        self.host = host
        self.workdir = workdir
        self.wrap = wrap or []
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0
        self.start()

    @property
    def url(self) -> str:
        return f"redis://{self.host}:{self.port}/0"

    def start(self) -> None:
        self.starts += 1
        log = open(self.workdir / f"redis-{self.starts}.log", "wb")
        self.proc = subprocess.Popen(
            self.wrap + ["redis-server", "--port", str(self.port), "--bind", self.host,
                         "--save", "", "--appendonly", "no", "--dir", str(self.workdir)],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        log.close()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"redis-server exited: {self.log_text()}")
            try:
                if self.command("PING") == "PONG":
                    return
            except OSError:
                time.sleep(0.05)
        raise AssertionError(f"redis-server did not answer: {self.log_text()}")

    def log_text(self) -> str:
        return (self.workdir / f"redis-{self.starts}.log").read_text(errors="replace")

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, 9)
            self.proc.wait(5)

    def stop(self) -> None:
        self.kill()

    def command(self, *args: str) -> object:
        """One command over a raw socket (RESP), for checks from the test; inside a
        namespace (``wrap``) through ``redis-cli --no-raw``."""
        if self.wrap:
            r = subprocess.run(self.wrap + ["redis-cli", "--no-raw", "-h", self.host, "-p",
                                            str(self.port), *args],
                               capture_output=True, text=True, timeout=10)
            text = r.stdout.strip()
            if r.returncode != 0 or text.startswith("Could not connect"):
                raise OSError(r.stderr.strip() or text)
            if text.startswith("(integer) "):
                return int(text.split()[1])
            if text == "(nil)":
                return None
            return text[1:-1] if text.startswith('"') and text.endswith('"') else text
        out = f"*{len(args)}\r\n".encode() + b"".join(
            f"${len(a.encode())}\r\n".encode() + a.encode() + b"\r\n" for a in args)
        with socket.create_connection((self.host, self.port), timeout=3) as s:
            s.sendall(out)
            f = s.makefile("rb")
            return _read_resp(f)


def _read_resp(f) -> object:  # type: ignore[no-untyped-def]
    line = f.readline().rstrip(b"\r\n")
    kind, rest = line[:1], line[1:]
    if kind == b"+":
        return rest.decode()
    if kind == b"-":
        raise AssertionError(f"redis error: {rest.decode()}")
    if kind == b":":
        return int(rest)
    if kind == b"$":
        n = int(rest)
        if n < 0:
            return None
        data = f.read(n + 2)[:-2]
        return data.decode(errors="replace")
    if kind == b"*":
        n = int(rest)
        return None if n < 0 else [_read_resp(f) for _ in range(n)]
    raise AssertionError(f"bad RESP line {line!r}")


class Relay:
    """One real ``quictun-signal`` instance of a cluster."""

    def __init__(self, tmp: Path, tag: str, redis_url: str | None, *extra: str,
                 host: str = "127.0.0.1", port: int = 0, wrap: list[str] | None = None,
                 env: dict[str, str] | None = None) -> None:
        self.tag = tag
        argv = (wrap or []) + [PY, "-m", "signal_server", "--host", host, "--port", str(port),
                                "--connect-rate", "0", "--register-rate", "0",
                               *extra]
        environ = env or base_env(tmp / f"home-{tag}")
        if redis_url:
            environ = dict(environ, QUICTUN_SIGNAL_REDIS=redis_url)
        self.proc = Proc(argv, env=environ, log=tmp / f"relay-{tag}.log")
        m = self.proc.wait_for(r"listening on (wss?://\S+?/) .*?(?:cluster instance (\w+))?\)")
        self.url = m.group(1)
        self.instance = m.group(2)
        self.http = "http" + self.url[2:]

    def get(self, path: str) -> tuple[int, str]:
        return http_get(self.http + path.lstrip("/"))

    def metrics(self) -> dict[str, dict[tuple[tuple[str, str], ...], float]]:
        status, text = self.get("/metrics")
        assert status == 200, text
        return parse_prometheus(text)

    def metric(self, name: str, **labels: str) -> float:
        fam = self.metrics().get("quictun_signal_" + name, {})
        return fam.get(tuple(sorted(labels.items())), 0.0)

    def kill(self) -> None:
        os.killpg(self.proc.p.pid, 9)
        self.proc.p.wait(5)

    def stop(self) -> None:
        self.proc.stop()


def http_get(url: str) -> tuple[int, str]:
    """(status, body) of a GET, ignoring proxy variables."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(url, timeout=5) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


_SAMPLE = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? (\S+)$')
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"(?:,|$)')


def parse_prometheus(text: str) -> dict[str, dict[tuple[tuple[str, str], ...], float]]:
    """Strictly parse the text format: every sample's family has HELP and TYPE lines
    first, labels are well formed, values are numbers. Raises AssertionError."""
    assert text.endswith("\n"), "exposition must end with a newline"
    families: dict[str, dict[tuple[tuple[str, str], ...], float]] = {}
    typed: dict[str, str] = {}
    helped: set[str] = set()
    for line in text.splitlines():
        if line.startswith("# HELP "):
            helped.add(line.split(" ", 3)[2])
            continue
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ")
            assert kind in ("counter", "gauge", "histogram", "summary", "untyped"), line
            assert name in helped, f"TYPE before HELP: {line}"
            typed[name] = kind
            families.setdefault(name, {})
            continue
        assert not line.startswith("#") and line, f"unexpected line {line!r}"
        m = _SAMPLE.match(line)
        assert m, f"malformed sample {line!r}"
        name, labels_text, value = m.groups()
        assert name in typed, f"sample without TYPE: {line!r}"
        labels: list[tuple[str, str]] = []
        if labels_text:
            pos = 0
            while pos < len(labels_text):
                lm = _LABEL.match(labels_text, pos)
                assert lm, f"malformed labels in {line!r}"
                labels.append((lm.group(1), lm.group(2)))
                pos = lm.end()
        if typed[name] == "counter":
            assert float(value) >= 0, line
        families[name][tuple(sorted(labels))] = float(value)
    return families


# --- quictun processes -----------------------------------------------------------------

QT = [PY, "-m", "quictun"]


def spawn_qt(tmp: Path, args: list[str], *, home: str, tag: str, secret: str = "test-secret-phrase",
             wrap: list[str] | None = None) -> Proc:
    return Proc((wrap or []) + QT + args, env=base_env(tmp / home, secret),
                log=tmp / f"{tag}.log")


def hash_through(port: int, payload: bytes, host: str = "127.0.0.1") -> str:
    """Send ``payload`` through a local ``connect --listen`` port to a hash_then_reply
    target; return the reply line (sha256 hex and byte count)."""
    with socket.create_connection((host, port), timeout=60) as s:
        s.settimeout(120)
        def send() -> None:
            try:
                s.sendall(payload)
                s.shutdown(socket.SHUT_WR)
            except OSError:  # the listener refused us (tunnel down): the reply is empty
                pass

        t = threading.Thread(target=send)
        t.start()
        reply = b""
        while not reply.endswith(b"\n"):
            chunk = s.recv(4096)
            if not chunk:
                break
            reply += chunk
        t.join()
    return reply.decode().strip()


def expected(payload: bytes) -> str:
    return f"{hashlib.sha256(payload).hexdigest()} {len(payload)}"


# --- raw WebSocket clients (the relay protocol itself) --------------------------------


class Client:
    """One raw relay client (a WebSocket speaking docs/protocol.md)."""

    def __init__(self, ws) -> None:  # type: ignore[no-untyped-def]
        self.ws = ws
        self.challenge: str | None = None

    @classmethod
    async def open(cls, url: str) -> Client:
        from websockets.asyncio.client import connect

        ws = await connect(url, proxy=None, compression=None, open_timeout=10)
        c = cls(ws)
        await c.send(sp.Hello(v=2, token=None, agent="test"))
        welcome = await c.recv()
        assert isinstance(welcome, sp.Welcome), welcome
        c.challenge = welcome.challenge
        return c

    def register(self, name: str, owner: str) -> sp.Register:
        """A ``register`` of ``name`` by the owner ``owner``, signed for this connection."""
        from helpers import signed_register

        return signed_register(name, owner, self.challenge)

    async def send(self, msg: sp.Message) -> None:
        await self.ws.send(sp.encode(msg))

    async def recv(self, timeout: float = 10.0) -> sp.Message:
        while True:
            data = await asyncio.wait_for(self.ws.recv(), timeout)
            if isinstance(data, str):
                return sp.decode(data)

    async def recv_bin(self, timeout: float = 10.0) -> bytes:
        while True:
            data = await asyncio.wait_for(self.ws.recv(), timeout)
            if isinstance(data, bytes):
                return data

    async def close(self) -> None:
        await self.ws.close()
