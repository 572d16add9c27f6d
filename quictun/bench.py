"""Benchmark quictun on this machine: ``python -m quictun.bench [--quick] [--json PATH]``.

Measures, in one run (see docs/benchmark.md for the method and results):

1. the QUIC engine ceiling (two in-memory connections in one process, no sockets);
2. tunnel throughput through real ``serve``/``connect`` processes and a real relay;
3. the same, relayed (``--relay-only``);
4. time to first byte of a fresh ``connect --stdio`` process;
5. added round-trip latency vs direct TCP;
6. peak RSS of ``serve`` and ``connect`` feeding a slow reader;
7. the relay: memory per idle peer and pairings per second (``signal_server.loadtest``);
8. for scale: ssh ``-L`` forwarding and raw loopback TCP.

``--lever NAME=VALUE`` (repeatable) runs the quictun processes through a small wrapper
that patches them first (``uvloop=1``, ``datagram=1452``, ``cc=cubic``,
``window_mb=8``, ``send_high_kb=4096``); ``--only tunnel`` restricts a run to items 2-3.
``--profile DIR`` writes cProfile data of the tunnel processes to DIR.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import resource
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

PY = sys.executable
SECRET = "bench-secret"

# The wrapper every quictun process runs through: applies QUICTUN_BENCH_PATCH levers,
# optionally profiles into QUICTUN_BENCH_PROFILE, then calls the real CLI.
WRAPPER = r"""
import json, os, sys
patch = json.loads(os.environ.get("QUICTUN_BENCH_PATCH") or "{}")
if patch.get("uvloop"):
    import asyncio, uvloop
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
import quictun.api as api, quictun.quicconn as qc, quictun.forward as fw
if "datagram" in patch:
    api.MAX_DATAGRAM = int(patch["datagram"])
if "window_mb" in patch:
    w = int(float(patch["window_mb"]) * 1024 * 1024)
    qc.STREAM_WINDOW = api.STREAM_WINDOW = w
    qc.CONNECTION_WINDOW = api.CONNECTION_WINDOW = 4 * w
if "send_high_kb" in patch:
    fw.SEND_HIGH = int(patch["send_high_kb"]) * 1024
    fw.SEND_LOW = fw.SEND_HIGH // 4
if "cc" in patch:
    _orig = api._quic_config
    def _cfg(*a, **k):
        cfg = _orig(*a, **k)
        cfg.congestion_control_algorithm = patch["cc"]
        return cfg
    api._quic_config = _cfg
from quictun.cli import main
prof_path = os.environ.get("QUICTUN_BENCH_PROFILE")
if prof_path:
    import cProfile
    prof = cProfile.Profile()
    prof.enable()
    try:
        main()
    finally:
        prof.disable()
        prof.dump_stats(prof_path)
else:
    main()
"""


# --------------------------------------------------------------------------- helpers
def _mbps(nbytes: int, seconds: float) -> float:
    return round(nbytes / seconds / 1e6, 1) if seconds > 0 else 0.0


def _status_kib(pid: int, key: str) -> int | None:
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _cpu_seconds(pid: int) -> float:
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
    return {"bytes": len(payload), "seconds": round(dt, 3), "mb_s": _mbps(len(payload), dt),
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


# --------------------------------------------------------------------------- 1. engine
def _cert_files(d: Path) -> tuple[str, str]:
    import datetime as dt

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "quictun")])
    now = dt.datetime.now(dt.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(1)
            .not_valid_before(now - dt.timedelta(days=1))
            .not_valid_after(now + dt.timedelta(days=30))
            .sign(key, hashes.SHA256()))
    cf, kf = d / "cert.pem", d / "key.pem"
    cf.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    kf.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                     serialization.PrivateFormat.PKCS8,
                                     serialization.NoEncryption()))
    return str(cf), str(kf)


def engine_ceiling(kind: str, nbytes: int, certs: tuple[str, str],
                   datagram: int = 1350) -> dict[str, Any]:
    """Push ``nbytes`` over one stream between two in-memory connections (MB/s)."""
    import ssl

    if kind == "qh3":
        from qh3.quic import events as ev_mod
        from qh3.quic.configuration import QuicConfiguration as Cfg
        from qh3.quic.connection import QuicConnection as Conn
    else:
        from aioquic.quic import events as ev_mod  # type: ignore[no-redef]
        from aioquic.quic.configuration import QuicConfiguration as Cfg  # type: ignore[assignment]
        from aioquic.quic.connection import QuicConnection as Conn  # type: ignore[assignment]

        if kind == "flowcontrolled":
            from quictun import engines
            from quictun.quicconn import connection_class

            Conn = connection_class(engines.get("aioquic"))  # type: ignore[misc]
    from quictun.quicconn import CONNECTION_WINDOW, STREAM_WINDOW

    ccfg = Cfg(is_client=True, alpn_protocols=["bench"], max_datagram_size=datagram,
               max_stream_data=STREAM_WINDOW, max_data=CONNECTION_WINDOW)
    ccfg.verify_mode = ssl.CERT_NONE
    scfg = Cfg(is_client=False, alpn_protocols=["bench"], max_datagram_size=datagram,
               max_stream_data=STREAM_WINDOW, max_data=CONNECTION_WINDOW)
    scfg.load_cert_chain(certs[0], certs[1])
    ca, sa = ("10.0.0.1", 1), ("10.0.0.2", 2)
    client = Conn(configuration=ccfg)
    client.connect(sa, now=time.monotonic())
    server: Any = None
    fc = kind == "flowcontrolled"
    h = hashlib.sha256()
    received = 0
    done = False
    payload = os.urandom(1 << 20)

    def drain(conn: Any) -> None:
        nonlocal received, done
        while (e := conn.next_event()) is not None:
            if isinstance(e, ev_mod.StreamDataReceived) and conn is server:
                if e.data:
                    h.update(e.data)
                    received += len(e.data)
                    if fc:
                        conn.delivered(e.stream_id, len(e.data))
                        conn.consume(e.stream_id, len(e.data))
                if e.end_stream:
                    done = True

    sid: int | None = None
    sent = 0
    want = hashlib.sha256()
    t0 = 0.0
    deadline = time.monotonic() + 120
    while not done and time.monotonic() < deadline:
        now = time.monotonic()
        if sid is None and server is not None and client._handshake_complete:
            sid = client.get_next_available_stream_id()
            t0 = time.perf_counter()
        if sid is not None and sent < nbytes:
            while sent < nbytes and sent - received < 2 * (1 << 20):  # bounded in flight
                chunk = payload[: min(len(payload), nbytes - sent)]
                sent += len(chunk)
                want.update(chunk)
                client.send_stream_data(sid, chunk, end_stream=sent >= nbytes)
        for data, _ in client.datagrams_to_send(now):
            if server is None:
                # long header: flags(1) version(4) dcid_len(1) dcid
                server = Conn(configuration=scfg,
                              original_destination_connection_id=data[6:6 + data[5]])
            server.receive_datagram(data, ca, now)
        drain(client)
        if server is not None:
            drain(server)
            for data, _ in server.datagrams_to_send(now):
                client.receive_datagram(data, sa, now)
            drain(client)
            t = server.get_timer()
            if t is not None and t <= now:
                server.handle_timer(now)
        t = client.get_timer()
        if t is not None and t <= now:
            client.handle_timer(now)
    dt = time.perf_counter() - t0
    ok = done and received == nbytes and h.hexdigest() == want.hexdigest()
    return {"bytes": nbytes, "seconds": round(dt, 3), "mb_s": _mbps(nbytes, dt),
            "sha256_ok": ok}


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
        env.update(QUICTUN_HOME=str(self.work / home), QUICTUN_SECRET=SECRET,
                   PYTHONUNBUFFERED="1", QUICTUN_BENCH_PATCH=json.dumps(self.patch))
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


def rss_under_slow_reader(rig: Rig, nbytes: int) -> dict[str, Any]:
    serve = rig.serve("rss")
    conn, port = rig.listen("rss")
    peak = {"serve": 0, "connect": 0}
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            for k, p in (("serve", serve), ("connect", conn)):
                v = _status_kib(p.p.pid, "VmRSS") or 0
                peak[k] = max(peak[k], v)
            time.sleep(0.05)

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    res = push_and_verify(port, os.urandom(nbytes), b"S")
    stop.set()
    th.join()
    res["serve_vmhwm_kib"] = _status_kib(serve.p.pid, "VmHWM")
    res["connect_vmhwm_kib"] = _status_kib(conn.p.pid, "VmHWM")
    res["serve_rss_peak_sampled_kib"] = peak["serve"]
    res["connect_rss_peak_sampled_kib"] = peak["connect"]
    res["peak_mb"] = round(max(res["serve_vmhwm_kib"] or 0, res["connect_vmhwm_kib"] or 0)
                           / 1024, 1)
    return res


def tunnel_throughput(rig: Rig, nbytes: int, relay_only: bool,
                      name: str) -> tuple[dict[str, Any], Proc, int]:
    serve = rig.serve(name, profile=f"serve-{name}")
    extra = ["--relay-only"] if relay_only else []
    conn, port = rig.listen(name, *extra, profile=f"connect-{name}")
    push_and_verify(port, os.urandom(256 * 1024))  # warm up: path up, windows open
    payload = os.urandom(nbytes)
    c0, s0 = _cpu_seconds(conn.p.pid), _cpu_seconds(serve.p.pid)
    res = push_and_verify(port, payload)
    res["connect_cpu_s"] = round(_cpu_seconds(conn.p.pid) - c0, 2)
    res["serve_cpu_s"] = round(_cpu_seconds(serve.p.pid) - s0, 2)
    if relay_only:
        res["relay_cpu_s_total"] = round(_cpu_seconds(rig.relay.p.pid), 2)
    return res, conn, port


# --------------------------------------------------------------------------- 7. relay
def relay_load(peers: int, pairings: int) -> dict[str, Any]:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = 2 * peers + 512
    if soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(want, hard), hard))
    r = subprocess.run([PY, "-m", "signal_server.loadtest", "--peers", str(peers),
                        "--pairings", str(pairings), "--json"],
                       capture_output=True, text=True, timeout=600)
    if r.returncode != 0:
        return {"error": r.stderr[-1000:]}
    res: dict[str, Any] = json.loads(r.stdout.strip().splitlines()[-1])
    if res.get("pairing_ms_mean"):
        res["pairings_per_s"] = round(1000 / res["pairing_ms_mean"], 1)
    return res


# --------------------------------------------------------------------------- 8. ssh
def ssh_throughput(work: Path, target_port: int, nbytes: int) -> dict[str, Any]:
    sshd, ssh, keygen = (shutil.which("sshd") or "/usr/sbin/sshd"), shutil.which("ssh"), \
        shutil.which("ssh-keygen")
    if os.geteuid() != 0 or not os.path.exists(sshd) or not ssh or not keygen:
        return {"skipped": "needs root and openssh-server/openssh-client"}
    d = work / "ssh"
    d.mkdir()
    for k in ("host", "user"):
        subprocess.run([keygen, "-q", "-t", "ed25519", "-N", "", "-f", str(d / k)], check=True)
    shutil.copy(d / "user.pub", d / "authorized_keys")
    os.chmod(d, 0o700)
    Path("/run/sshd").mkdir(exist_ok=True)  # privilege-separation dir
    sport = _free_port()
    (d / "sshd_config").write_text(
        f"Port {sport}\nListenAddress 127.0.0.1\nHostKey {d / 'host'}\n"
        f"AuthorizedKeysFile {d / 'authorized_keys'}\nPidFile {d / 'sshd.pid'}\n"
        "PermitRootLogin prohibit-password\nPasswordAuthentication no\nUsePAM no\n"
        "StrictModes no\nAllowTcpForwarding yes\n")
    procs = [Proc([sshd, "-D", "-e", "-f", str(d / "sshd_config")], d / "sshd.log")]
    try:
        procs[0].wait_for("Server listening", 10)
        lport = _free_port()
        procs.append(Proc([ssh, "-N", "-i", str(d / "user"), "-p", str(sport),
                           "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
                           "-o", "ExitOnForwardFailure=yes", "-o", "BatchMode=yes",
                           "-L", f"127.0.0.1:{lport}:127.0.0.1:{target_port}",
                           "root@127.0.0.1"], d / "ssh.log"))
        deadline = time.monotonic() + 15
        while True:
            try:
                socket.create_connection(("127.0.0.1", lport), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline or procs[1].p.poll() is not None:
                    return {"skipped": "ssh -L did not come up: "
                            + (d / "ssh.log").read_text(errors="replace")[-500:]}
                time.sleep(0.1)
        push_and_verify(lport, os.urandom(256 * 1024))
        return push_and_verify(lport, os.urandom(nbytes))
    finally:
        for p in reversed(procs):
            p.stop()


def _free_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port: int = s.getsockname()[1]
    s.close()
    return port


# --------------------------------------------------------------------------- main
def _ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 2) if a and b else None


def run(quick: bool, size_mb: int | None, patch: dict[str, str], only: str | None,
        profile_dir: Path | None, log: Callable[[str], None]) -> dict[str, Any]:
    size = (size_mb or (5 if quick else 50)) * 1_000_000
    out: dict[str, Any] = {"quick": quick, "size_bytes": size, "levers": patch,
                           "python": sys.version.split()[0], "cpus": os.cpu_count()}
    work = Path(tempfile.mkdtemp(prefix="quictun-bench-"))
    try:
        if only in (None, "engine"):
            certs = _cert_files(work)
            engine: dict[str, Any] = {}
            for kind in ("flowcontrolled", "aioquic", "qh3"):
                try:
                    engine[kind] = engine_ceiling(kind, size, certs)
                except ImportError:
                    engine[kind] = {"skipped": "not importable"}
                log(f"engine {kind}: {engine[kind]}")
            out["engine"] = engine
        if only == "engine":
            return out
        rig = Rig(work, patch, profile_dir)
        try:
            direct, dconn, dport = tunnel_throughput(rig, size, False, "direct")
            out["tunnel_direct"] = direct
            log(f"tunnel direct: {direct}")
            relayed, _rconn, _ = tunnel_throughput(rig, size, True, "relayed")
            out["tunnel_relayed"] = relayed
            log(f"tunnel relayed: {relayed}")
            if only == "tunnel":
                return out
            ttfb = [rig.ttfb("direct") for _ in range(3 if quick else 5)]
            out["ttfb"] = {"samples_s": [round(t, 3) for t in ttfb],
                           "median_s": round(statistics.median(ttfb), 3)}
            log(f"ttfb: {out['ttfb']}")
            n = 50 if quick else 200
            out["latency"] = {"messages": n, "size": 64,
                              "tunnel_us": ping_pong(dport, n),
                              "direct_tcp_us": ping_pong(rig.target.port, n)}
            out["latency"]["added_us"] = round(out["latency"]["tunnel_us"]
                                               - out["latency"]["direct_tcp_us"], 1)
            log(f"latency: {out['latency']}")
            out["rss"] = rss_under_slow_reader(rig, (10 if quick else 50) * 1_000_000)
            log(f"rss: {out['rss']}")
            raw = os.urandom(size * (1 if quick else 4))
            out["raw_tcp"] = push_and_verify(rig.target.port, raw)
            log(f"raw tcp: {out['raw_tcp']}")
            out["ssh"] = ssh_throughput(work, rig.target.port, size)
            log(f"ssh: {out['ssh']}")
        finally:
            rig.close()
        peers = 500 if quick else 10_000
        out["relay"] = relay_load(peers, 50 if quick else 200)
        log(f"relay: {out['relay']}")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return out


def targets(out: dict[str, Any]) -> list[tuple[str, str, str, str]]:
    """(check, value, target, ratio/verdict) rows against the stated targets."""
    rows: list[tuple[str, str, str, str]] = []
    eng = out.get("engine", {}).get("flowcontrolled", {}).get("mb_s")
    d = out.get("tunnel_direct", {}).get("mb_s")
    r = out.get("tunnel_relayed", {}).get("mb_s")
    if d and eng:
        rows.append(("tunnel / engine ceiling", f"{d} / {eng} MB/s", ">= 1.0x",
                     f"{_ratio(d, eng)}x"))
    if d and r:
        rows.append(("relayed / direct", f"{r} / {d} MB/s", ">= 0.5x", f"{_ratio(r, d)}x"))
    if "ttfb" in out:
        t = out["ttfb"]["median_s"]
        rows.append(("TTFB (median)", f"{t} s", "<= 1.0 s", f"{_ratio(t, 1.0)}x"))
    if "rss" in out:
        p = out["rss"]["peak_mb"]
        rows.append(("peak RSS (max of serve, connect)", f"{p} MiB", "<= 100 MB",
                     f"{_ratio(p, 100.0)}x"))
    kib = out.get("relay", {}).get("kib_per_peer")
    if kib is not None:
        rows.append(("relay memory per idle peer", f"{kib} KiB", "<= 30 KB",
                     f"{_ratio(kib, 30.0)}x"))
    return rows


def table(out: dict[str, Any]) -> str:
    lines = ["| measurement | result |", "|---|---|"]

    def add(label: str, value: Any) -> None:
        lines.append(f"| {label} | {value} |")

    for kind, v in out.get("engine", {}).items():
        add(f"engine ceiling, {kind} (in-memory)",
            f"{v['mb_s']} MB/s, sha256 {'ok' if v['sha256_ok'] else 'FAIL'}"
            if "mb_s" in v else v.get("skipped"))
    for key, label in (("tunnel_direct", "tunnel direct"), ("tunnel_relayed", "tunnel relayed")):
        if key in out:
            v = out[key]
            add(label, f"{v['mb_s']} MB/s ({v['bytes'] // 1_000_000} MB in {v['seconds']} s, "
                f"cpu connect {v['connect_cpu_s']} s / serve {v['serve_cpu_s']} s), "
                f"sha256 {'ok' if v['sha256_ok'] else 'FAIL'}")
    if "ttfb" in out:
        add("TTFB, fresh connect --stdio (median)",
            f"{out['ttfb']['median_s']} s (samples {out['ttfb']['samples_s']})")
    if "latency" in out:
        v = out["latency"]
        add(f"RTT {v['messages']} x {v['size']} B (median)",
            f"tunnel {v['tunnel_us']} µs, direct TCP {v['direct_tcp_us']} µs, "
            f"added {v['added_us']} µs")
    if "rss" in out:
        v = out["rss"]
        add(f"peak RSS, {v['bytes'] // 1_000_000} MB into a ~3 MB/s reader",
            f"serve {v['serve_vmhwm_kib']} KiB, connect {v['connect_vmhwm_kib']} KiB "
            f"(VmHWM), sha256 {'ok' if v['sha256_ok'] else 'FAIL'}, {v['seconds']} s")
    if "raw_tcp" in out:
        add("raw loopback TCP", f"{out['raw_tcp']['mb_s']} MB/s")
    if "ssh" in out:
        v = out["ssh"]
        add("ssh -L forwarding", f"{v['mb_s']} MB/s" if "mb_s" in v else v.get("skipped"))
    if "relay" in out:
        v = out["relay"]
        add(f"relay, {v.get('peers')} idle peers",
            f"{v.get('kib_per_peer')} KiB/peer (RSS {v.get('rss_kib_before')} -> "
            f"{v.get('rss_kib_idle_peers')} KiB, connect {v.get('connect_seconds')} s); "
            f"pairing median {v.get('pairing_ms_median')} ms, "
            f"{v.get('pairings_per_s')} pairings/s" if "error" not in v else v["error"])
    rows = targets(out)
    if rows:
        lines += ["", "| target | measured | target | ratio |", "|---|---|---|---|"]
        lines += [f"| {a} | {b} | {c} | {d} |" for a, b, c, d in rows]
    return "\n".join(lines)


@click.command()
@click.option("--quick", is_flag=True, help="Tiny sizes; < 60 s (used by the test).")
@click.option("--json", "json_path", default="bench-results.json", show_default=True,
              type=click.Path(dir_okay=False, path_type=Path))
@click.option("--size-mb", type=int, default=None, help="Throughput payload (default 50, quick 5).")
@click.option("--lever", "levers", multiple=True, metavar="NAME=VALUE",
              help="Patch quictun processes: uvloop=1, datagram=N, cc=cubic, window_mb=N, "
                   "send_high_kb=N.")
@click.option("--only", type=click.Choice(["engine", "tunnel"]), default=None,
              help="Run only the engine ceiling, or only the tunnel throughputs.")
@click.option("--profile", "profile_dir", type=click.Path(file_okay=False, path_type=Path),
              default=None, help="Write cProfile data of serve/connect processes here.")
@click.option("-q", "--quiet", is_flag=True, help="No progress lines on stderr.")
def main(quick: bool, json_path: Path, size_mb: int | None, levers: tuple[str, ...],
         only: str | None, profile_dir: Path | None, quiet: bool) -> None:
    """Measure quictun's throughput, latency, memory and relay capacity on this machine."""
    patch = dict(lv.split("=", 1) for lv in levers)
    if profile_dir is not None:
        profile_dir = profile_dir.resolve()
        profile_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()

    def log(msg: str) -> None:
        if not quiet:
            print(f"[{time.monotonic() - t0:6.1f}s] {msg}", file=sys.stderr, flush=True)

    out = run(quick, size_mb, patch, only, profile_dir, log)
    out["wall_seconds"] = round(time.monotonic() - t0, 1)
    json_path.write_text(json.dumps(out, indent=2) + "\n")
    print(table(out))
    print(f"\n(wall {out['wall_seconds']} s; JSON in {json_path})")


if __name__ == "__main__":
    main()
