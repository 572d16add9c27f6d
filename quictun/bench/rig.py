"""The harness under ``python -m quictun.bench``: child processes, a TCP target, a
relay plus quictun processes in a scratch directory (:class:`Rig`), and the two probes
the measurements share (:func:`push_and_verify`, :func:`ping_pong`).

Every quictun process runs through :data:`WRAPPER`, which applies the benchmark's
``--lever`` patches (JSON in ``QUICTUN_BENCH_PATCH``) and optionally profiles into
``QUICTUN_BENCH_PROFILE`` before calling the real CLI.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

PY = sys.executable
SECRET = "bench-secret"

# The wrapper every quictun process runs through: turns the QUICTUN_BENCH_PATCH levers into
# a TunnelConfig, optionally profiles into QUICTUN_BENCH_PROFILE, then calls the real CLI
# with that config (main(obj={"config": ...})): nothing is monkeypatched.
WRAPPER = r"""
import json, os, sys
patch = json.loads(os.environ.get("QUICTUN_BENCH_PATCH") or "{}")
if patch.get("uvloop"):
    import asyncio, uvloop
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
from quictun.config import TunnelConfig
cfg = TunnelConfig.from_environment(os.environ)
if "datagram" in patch:  # QUIC's starting size (and a direct path's without discovery)
    cfg = cfg.replace(max_datagram=int(patch["datagram"]))
if "fixed" in patch:  # one size everywhere, path MTU discovery off (quictun before it)
    n = int(patch["fixed"])
    cfg = cfg.replace(max_datagram=n, pmtu=None, relay_datagram_size=n)
if "pmtu_max" in patch:  # largest size probed; 0: no discovery
    import dataclasses
    from quictun.config import PmtuConfig
    n = int(patch["pmtu_max"])
    cfg = cfg.replace(pmtu=dataclasses.replace(cfg.pmtu or PmtuConfig(), max_size=n)
                      if n else None)
if "relay_dgram" in patch:
    cfg = cfg.replace(relay_datagram_size=int(patch["relay_dgram"]))
if "offload" in patch:  # auto | off | gso | gro (quictun/aio/udpio.py)
    cfg = cfg.replace(udp_offload=patch["offload"])
if "window_mb" in patch:
    w = int(float(patch["window_mb"]) * 1024 * 1024)
    cfg = cfg.replace(stream_window=w, connection_window=4 * w)
if "ack_delay_ms" in patch:
    cfg = cfg.replace(peer_max_ack_delay=float(patch["ack_delay_ms"]) / 1000)
if "send_high_kb" in patch:
    high = int(patch["send_high_kb"]) * 1024
    cfg = cfg.replace(send_high=high, send_low=high // 4)
if "cc" in patch:
    cfg = cfg.replace(congestion_control=patch["cc"])
from quictun.cli.main import main
prof_path = os.environ.get("QUICTUN_BENCH_PROFILE")
if prof_path:
    import cProfile
    prof = cProfile.Profile()
    prof.enable()
    try:
        main(obj={"config": cfg})
    finally:
        prof.disable()
        prof.dump_stats(prof_path)
else:
    main(obj={"config": cfg})
"""


# The levers WRAPPER knows (``--lever NAME=VALUE`` of both benchmarks), with what each sets.
LEVERS = {
    "uvloop": "1: uvloop's event loop",
    "datagram": "N: QUIC's starting datagram size (max_datagram)",
    "fixed": "N: one datagram size everywhere, path MTU discovery off",
    "pmtu_max": "N: largest size path MTU discovery probes (0: no discovery)",
    "relay_dgram": "N: datagram size on the relayed path",
    "offload": "off|gso|gro|auto: UDP GSO/GRO (udp_offload)",
    "cc": "NAME: congestion control (e.g. cubic)",
    "window_mb": "N: stream window in MB (connection window 4x)",
    "send_high_kb": "N: send buffer high-water mark in KiB",
    "ack_delay_ms": "N: the peer's max ACK delay",
}


def parse_levers(levers: list[str] | tuple[str, ...]) -> dict[str, str]:
    """``NAME=VALUE`` strings as the patch :data:`WRAPPER` reads. Raises ValueError, with
    one line naming the known levers, for a malformed or unknown one."""
    patch: dict[str, str] = {}
    for lv in levers:
        name, eq, value = lv.partition("=")
        if not eq or name not in LEVERS or not value:
            raise ValueError(f"bad --lever {lv!r}: use NAME=VALUE with NAME one of "
                             f"{', '.join(LEVERS)}")
        patch[name] = value
    return patch


# --------------------------------------------------------------------------- helpers
def mbps(nbytes: int, seconds: float) -> float:
    return round(nbytes / seconds / 1e6, 1) if seconds > 0 else 0.0


def status_kib(pid: int, key: str) -> int | None:
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def cpu_seconds(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return 0.0


class Proc:
    """A child process with stderr captured to a file."""

    def __init__(self, argv: list[str], log: Path, env: dict[str, str] | None = None,
                 stdin: int | None = subprocess.DEVNULL, stdout: int | None = None) -> None:
        self.log = log
        self._f = open(log, "wb")
        self.p = subprocess.Popen(argv, env=env, stdin=stdin,
                                  stdout=stdout if stdout is not None else self._f,
                                  stderr=self._f, start_new_session=True)

    def wait_for(self, pattern: str, timeout: float = 30.0) -> re.Match[str]:
        deadline = time.monotonic() + timeout
        rx = re.compile(pattern)
        while time.monotonic() < deadline:
            m = rx.search(self.log.read_text(errors="replace"))
            if m:
                return m
            if self.p.poll() is not None:
                break
            time.sleep(0.02)
        raise RuntimeError(f"{pattern!r} not seen ({self.p.poll()}):\n"
                           + self.log.read_text(errors="replace")[-2000:])

    def stop(self, sig: int = 15) -> None:
        if self.p.poll() is None:
            try:
                os.killpg(self.p.pid, sig)
                self.p.wait(10)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                try:
                    os.killpg(self.p.pid, 9)
                except ProcessLookupError:
                    pass
                self.p.wait(5)
        self._f.close()


class Target:
    """A threaded TCP server on loopback. The first byte picks the behaviour:
    ``H`` hash until EOF then reply ``<sha256> <n>\\n``; ``S`` the same, draining at
    ``slow_rate`` bytes/s; ``E`` echo."""

    def __init__(self, slow_rate: float = 3e6) -> None:
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(128)
        self.port: int = self.sock.getsockname()[1]
        self.slow_rate = slow_rate
        threading.Thread(target=self._loop, daemon=True).start()

    def _loop(self) -> None:
        while True:
            try:
                c, _ = self.sock.accept()
            except OSError:
                return
            c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            threading.Thread(target=self._run, args=(c,), daemon=True).start()

    def _run(self, c: socket.socket) -> None:
        try:
            mode = c.recv(1)
            if mode == b"E":
                while data := c.recv(65536):
                    c.sendall(data)
            elif mode in (b"H", b"S"):
                h = hashlib.sha256()
                n = 0
                chunk = 65536 if mode == b"S" else 1 << 20
                while data := c.recv(chunk):
                    h.update(data)
                    n += len(data)
                    if mode == b"S":
                        time.sleep(len(data) / self.slow_rate)
                c.sendall(f"{h.hexdigest()} {n}\n".encode())
        except OSError:
            pass
        finally:
            c.close()

    def close(self) -> None:
        self.sock.close()


def push_and_verify(port: int, payload: bytes, mode: bytes = b"H",
                    timeout: float = 300.0) -> dict[str, Any]:
    """Send ``payload`` to ``port``, half-close, read the digest; time and verify."""
    want = hashlib.sha256(payload).hexdigest()
    t0 = time.perf_counter()
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(mode)
        view = memoryview(payload)
        for i in range(0, len(payload), 1 << 20):
            s.sendall(view[i:i + (1 << 20)])
        s.shutdown(socket.SHUT_WR)
        reply = b""
        while not reply.endswith(b"\n"):
            data = s.recv(4096)
            if not data:
                break
            reply += data
    dt = time.perf_counter() - t0
    parts = reply.decode(errors="replace").split()
    ok = len(parts) == 2 and parts[0] == want and int(parts[1]) == len(payload)
    return {"bytes": len(payload), "seconds": round(dt, 3), "mb_s": mbps(len(payload), dt),
            "sha256_ok": ok}


def ping_pong(port: int, count: int, size: int = 64) -> float:
    """Median round trip in µs of ``count`` ``size``-byte messages through an echo."""
    msg = b"x" * size
    times: list[float] = []
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        s.sendall(b"E")
        for _ in range(count + 5):
            t0 = time.perf_counter()
            s.sendall(msg)
            got = 0
            while got < size:
                data = s.recv(size - got)
                if not data:
                    raise RuntimeError("echo closed")
                got += len(data)
            times.append(time.perf_counter() - t0)
    return round(statistics.median(times[5:]) * 1e6, 1)




# --------------------------------------------------------------------------- tunnel rig
class Rig:
    """A relay, a target server, and quictun processes in a scratch directory."""

    def __init__(self, work: Path, patch: dict[str, str], profile_dir: Path | None) -> None:
        self.work = work
        self.patch = patch
        self.profile_dir = profile_dir
        self.procs: list[Proc] = []
        self.target = Target()
        relay = Proc([PY, "-m", "signal_server", "--host", "127.0.0.1", "--port", "0",
                      "--max-per-ip", "1000"], work / "relay.log", env=self._env("relay"))
        self.procs.append(relay)
        self.relay = relay
        self.url = relay.wait_for(r"listening on (ws://127\.0\.0\.1:\d+/)").group(1)

    def _env(self, home: str, profile: str | None = None) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items()
               if not k.startswith("QUICTUN_") and k.lower() not in
               ("http_proxy", "https_proxy", "all_proxy")}
        # loopback tunnels: no router to ask for port mappings (QUICTUN_PORTMAP=0)
        env.update(QUICTUN_HOME=str(self.work / home), QUICTUN_SECRET=SECRET,
                   PYTHONUNBUFFERED="1", QUICTUN_BENCH_PATCH=json.dumps(self.patch),
                   QUICTUN_PORTMAP="0")
        if os.environ.get("QUICTUN_ENGINE"):  # the QUIC engine under test (engines.py)
            env["QUICTUN_ENGINE"] = os.environ["QUICTUN_ENGINE"]
        if profile and self.profile_dir is not None:
            env["QUICTUN_BENCH_PROFILE"] = str(self.profile_dir / f"{profile}.prof")
        return env

    def qt(self, args: list[str], log: str, home: str, **kw: Any) -> Proc:
        p = Proc([PY, "-c", WRAPPER, *args], self.work / f"{log}.log",
                 env=self._env(home, kw.pop("profile", None)), **kw)
        self.procs.append(p)
        return p

    def serve(self, name: str, profile: str | None = None) -> Proc:
        p = self.qt(["serve", name, "--forward", f"127.0.0.1:{self.target.port}",
                     "--signal", self.url], f"serve-{name}", f"srv-{name}", profile=profile)
        p.wait_for("serving")
        return p

    def listen(self, name: str, *extra: str, profile: str | None = None) -> tuple[Proc, int]:
        p = self.qt(["connect", name, "--listen", "127.0.0.1:0", "--signal", self.url,
                     *extra], f"connect-{name}{'-'.join(extra)}", "cli", profile=profile)
        port = int(p.wait_for(r"listening on 127\.0\.0\.1:(\d+)").group(1))
        return p, port

    def ttfb(self, name: str) -> float:
        """Seconds from spawning ``connect --stdio`` to an echoed line on its stdout."""
        line = b"hello quictun\n"
        t0 = time.perf_counter()
        p = subprocess.Popen([PY, "-c", WRAPPER, "connect", name, "--stdio", "--signal",
                              self.url], env=self._env("cli"), stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        assert p.stdin is not None and p.stdout is not None
        p.stdin.write(b"E" + line)
        p.stdin.flush()
        got = p.stdout.readline()
        dt = time.perf_counter() - t0
        p.stdin.close()
        try:
            p.wait(10)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
        if got != line:
            raise RuntimeError(f"stdio echo returned {got!r}")
        return dt

    def close(self) -> None:
        for p in reversed(self.procs):
            p.stop(2 if self.profile_dir is not None else 15)
        self.target.close()
