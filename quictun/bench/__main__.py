"""Benchmark quictun on this machine: ``python -m quictun.bench [--quick] [--json PATH]``.

Measures, in one run (see docs/benchmark.md for the method and results):

1. the QUIC engine ceiling (two in-memory connections in one process, no sockets);
2. tunnel throughput through real ``serve``/``connect`` processes and a real relay;
3. the same, relayed (``--relay-only``);
4. time to first byte of a fresh ``connect --stdio`` process;
5. added round-trip latency vs direct TCP;
6. peak RSS of ``serve`` and ``connect`` feeding a slow reader;
7. the relay: memory per idle peer and pairings per second (``quictun.bench.loadtest``);
8. for scale: ssh ``-L`` forwarding and raw loopback TCP.

``--lever NAME=VALUE`` (repeatable) runs the quictun processes through a small wrapper
that patches them first (``uvloop=1``, ``datagram=1452`` (QUIC's starting size),
``fixed=1350`` (one datagram size everywhere, path MTU discovery off), ``pmtu_max=N``
(largest size probed; 0: no discovery), ``relay_dgram=N``, ``offload=off|gso|gro|auto``,
``cc=cubic``, ``window_mb=8``, ``send_high_kb=4096``, ``ack_delay_ms=25``); ``--only
tunnel`` restricts a run to items 2-3. Tunnel results carry CPU seconds per GB per end.
``--profile DIR`` writes cProfile data of the tunnel processes to DIR.
"""

from __future__ import annotations

import hashlib
import json
import os
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

from .pyenv import like_a_user
from .rig import (
    PY,
    Proc,
    Rig,
    cpu_seconds,
    mbps,
    parse_levers,
    ping_pong,
    push_and_verify,
    status_kib,
)


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


def _engine_classes(kind: str) -> tuple[Any, Any, Any]:
    """(events module, QuicConfiguration, QuicConnection) for an engine_ceiling kind."""
    if kind == "qh3":
        from qh3.quic import events as ev_mod
        from qh3.quic.configuration import QuicConfiguration as Cfg
        from qh3.quic.connection import QuicConnection as Conn
    else:
        from aioquic.quic import events as ev_mod  # type: ignore[no-redef]
        from aioquic.quic.configuration import QuicConfiguration as Cfg  # type: ignore[assignment]
        from aioquic.quic.connection import QuicConnection as Conn  # type: ignore[assignment]

        if kind == "flowcontrolled":
            from ..quic import engines
            from ..quic.flow import connection_class

            Conn = connection_class(engines.get("aioquic"))  # type: ignore[misc]
    return ev_mod, Cfg, Conn


def _engine_configs(cfg_class: Any, certs: tuple[str, str], datagram: int) -> tuple[Any, Any]:
    import ssl

    from ..config import TunnelConfig

    cfg = TunnelConfig()
    ccfg = cfg_class(is_client=True, alpn_protocols=["bench"], max_datagram_size=datagram,
                     max_stream_data=cfg.stream_window, max_data=cfg.connection_window)
    ccfg.verify_mode = ssl.CERT_NONE
    scfg = cfg_class(is_client=False, alpn_protocols=["bench"], max_datagram_size=datagram,
                     max_stream_data=cfg.stream_window, max_data=cfg.connection_window)
    scfg.load_cert_chain(certs[0], certs[1])
    return ccfg, scfg


def engine_ceiling(kind: str, nbytes: int, certs: tuple[str, str],
                   datagram: int = 1350) -> dict[str, Any]:
    """Push ``nbytes`` over one stream between two in-memory connections (MB/s)."""
    ev_mod, Cfg, Conn = _engine_classes(kind)
    ccfg, scfg = _engine_configs(Cfg, certs, datagram)
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
    return {"bytes": nbytes, "seconds": round(dt, 3), "mb_s": mbps(nbytes, dt),
            "sha256_ok": ok}


def rss_under_slow_reader(rig: Rig, nbytes: int) -> dict[str, Any]:
    serve = rig.serve("rss")
    conn, port = rig.listen("rss")
    peak = {"serve": 0, "connect": 0}
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            for k, p in (("serve", serve), ("connect", conn)):
                v = status_kib(p.p.pid, "VmRSS") or 0
                peak[k] = max(peak[k], v)
            time.sleep(0.05)

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    res = push_and_verify(port, os.urandom(nbytes), b"S")
    stop.set()
    th.join()
    res["serve_vmhwm_kib"] = status_kib(serve.p.pid, "VmHWM")
    res["connect_vmhwm_kib"] = status_kib(conn.p.pid, "VmHWM")
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
    c0, s0 = cpu_seconds(conn.p.pid), cpu_seconds(serve.p.pid)
    res = push_and_verify(port, payload)
    res["connect_cpu_s"] = round(cpu_seconds(conn.p.pid) - c0, 2)
    res["serve_cpu_s"] = round(cpu_seconds(serve.p.pid) - s0, 2)
    gb = nbytes / 1e9
    res["cpu_s_per_gb"] = {"connect": round(res["connect_cpu_s"] / gb, 1),
                           "serve": round(res["serve_cpu_s"] / gb, 1)}
    if relay_only:
        res["relay_cpu_s_total"] = round(cpu_seconds(rig.relay.p.pid), 2)
    return res, conn, port


# --------------------------------------------------------------------------- 2b. lab
LAB_CASES = {"fw-v4": "direct", "cone-udpblk": "relayed"}  # tests/lab/measure.py names


def lab_throughput() -> dict[str, Any]:
    """Tunnel throughput between network namespaces behind emulated routers, by running
    ``python3 -m tests.lab.measure`` (a subprocess: the package does not import tests).

    Needs root, ``nft`` and a source checkout (``tests/lab`` next to the package); else
    ``{"skipped": reason}``. Per case: path reached, MB/s of a 10 MB download, SHA-256.
    """
    repo = Path(__file__).resolve().parent.parent
    if os.geteuid() != 0 or shutil.which("nft") is None:
        return {"skipped": "needs root and nft (the network lab)"}
    if not (repo / "tests" / "lab" / "measure.py").exists():
        return {"skipped": "needs a source checkout with tests/lab"}
    with tempfile.TemporaryDirectory(prefix="quictun-bench-lab-") as d:
        out = Path(d) / "lab.json"
        r = subprocess.run([PY, "-m", "tests.lab.measure", "--cases", ",".join(LAB_CASES),
                            "--json", str(out)], cwd=repo, capture_output=True, text=True,
                           timeout=600)
        if r.returncode != 0 or not out.exists():
            return {"error": (r.stderr or r.stdout)[-1000:]}
        cases = json.loads(out.read_text())["cases"]
    res: dict[str, Any] = {}
    for c in cases:
        res[LAB_CASES.get(c["name"], c["name"])] = {
            "case": c["title"], "path": c.get("final_path"), "mb_s": c.get("mbps"),
            "sha256_ok": c.get("throughput_sha_ok")}
    return res


# --------------------------------------------------------------------------- 7. relay
def relay_load(peers: int, pairings: int) -> dict[str, Any]:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = 2 * peers + 512
    if soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(want, hard), hard))
    r = subprocess.run([PY, "-m", "quictun.bench.loadtest", "--peers", str(peers),
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
            if not quick:
                out["lab"] = lab_throughput()
                log(f"lab: {out['lab']}")
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
    for key, v in out.get("lab", {}).items():
        if isinstance(v, dict) and "mb_s" in v:
            add(f"lab tunnel {key} ({v['case']}, namespaces + nftables)",
                f"{v['mb_s']} MB/s over path={v['path']}, 10 MB, "
                f"sha256 {'ok' if v['sha256_ok'] else 'FAIL'}")
        else:
            add("lab tunnel", f"{key}: {v}")
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
              help="Patch quictun processes: uvloop=1, datagram=N, fixed=N, pmtu_max=N, "
                   "relay_dgram=N, offload=off|gso|gro|auto, cc=cubic, window_mb=N, "
                   "send_high_kb=N, ack_delay_ms=N.")
@click.option("--only", type=click.Choice(["engine", "tunnel"]), default=None,
              help="Run only the engine ceiling, or only the tunnel throughputs.")
@click.option("--profile", "profile_dir", type=click.Path(file_okay=False, path_type=Path),
              default=None, help="Write cProfile data of serve/connect processes here.")
@click.option("-q", "--quiet", is_flag=True, help="No progress lines on stderr.")
def main(quick: bool, json_path: Path, size_mb: int | None, levers: tuple[str, ...],
         only: str | None, profile_dir: Path | None, quiet: bool) -> None:
    """Measure quictun's throughput, latency, memory and relay capacity on this machine."""
    try:
        patch = parse_levers(levers)
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None
    if like_a_user() and not quiet:
        print("PYTHONDONTWRITEBYTECODE was set: dropped, so every process starts from cached "
              "bytecode as on a user's machine", file=sys.stderr)
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
