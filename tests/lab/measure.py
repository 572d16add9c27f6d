"""Measure quictun in the network lab: paths, time to first byte, throughput, rebinding.

Not a test (pytest does not collect it). Run from the repository root, as root::

    python3 -m tests.lab.measure [--json PATH] [--markdown PATH] [--cases NAME,...]

For every lab case (see ``CASES``) it starts the relay (wan), a small service and
``quictun serve`` (host A), then:

- ``quictun connect --listen`` (host B): the first and the final ``path=`` line and the time
  from process start until ``path=direct`` (if ever); a 5 MB download with the lab's
  counters reset first (direct UDP bytes on the wan, or on the LAN for ``same-lan``, versus
  TCP bytes to/from the relay); a 10 MB download timed (MB/s, SHA-256 verified), with the
  CPU seconds per GB of each end (``/proc/PID/stat``) and the last direct datagram size
  connect logged (path MTU discovery). ``QUICTUN_UDP_OFFLOAD=off|gso|gro|auto`` in the
  environment reaches every quictun process (the GSO/GRO lever).
- time to first byte, 3 times: wall time from starting a fresh ``quictun connect NAME
  --stdio`` (serve already registered) until an echoed line comes back; median reported.

Extra runs: NAT rebinding during a paced transfer (cone<->cone, 3 times) and the fast
start comparison (cone<->cone and symmetric<->symmetric): TTFB with ``relay_after`` 0.0
(shipped), 0.5 and 1.0 s, through a ``python3 -c`` wrapper that patches the path manager's
``PathConfig`` before calling ``quictun.cli.main()``.

Progress goes to stderr, the tables to stdout. Takes about 5 minutes.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from quictun.bench.rig import cpu_seconds

from .netlab import Lab, LabProcess, SiteSpec, lab_available, sweep_stale_namespaces
from .service import SERVICE

REPO = Path(__file__).resolve().parents[2]
MB = 1024 * 1024
COUNTER_SIZE = 5 * MB
THROUGHPUT_SIZE = 10 * MB
TTFB_RUNS = 3
SERVICE_PORT = 7000
LISTEN_PORT = 7001
NAME = "labsvc"
SECRET = "lab-secret-measure-6a1f"
PREFIX = "qtm"
# Rebinding: the new masquerade ranges (inside 20000-29999, outside the hosts' ephemeral
# ports); alternate halves so that every repetition really moves the public port.
REBIND_RANGES = ((20000, 24999), (25000, 29999), (20000, 24999))
PACE_RATE = 1 * MB  # bytes per second of the paced rebinding transfer
PACE_SIZE = 10 * MB
STALL_GAP = 0.3  # seconds without data that count as a stall (paced chunks come every 16 ms)
RELAY_AFTER = (0.0, 0.5, 1.0)

PATH_LINE = re.compile(r"path=(direct|relay|none)(?:\s+local=(\S+)\s+remote=(\S+))?")

# The forwarded service in host A (per connection, a header line):
#   DOWN n         -> send random.Random(n).randbytes(n)
#   PACE n rate    -> the same bytes, paced at `rate` bytes/s in 16 KiB chunks
#   ECHO           -> echo lines until EOF

# Client in host B through `connect --listen`: one JSON line. mode "down": time the
# download; mode "pace": also the arrival times (CLOCK_MONOTONIC, shared by all namespaces).
CLIENT = r"""
import hashlib, json, random, socket, sys, time
port, mode, n = int(sys.argv[1]), sys.argv[2], int(sys.argv[3])
t0 = time.monotonic()
c = socket.create_connection(("127.0.0.1", port), timeout=120)
if mode == "pace":
    c.sendall(b"PACE %d %s\n" % (n, sys.argv[4].encode()))
else:
    c.sendall(b"DOWN %d\n" % n)
c.shutdown(socket.SHUT_WR)
h, got, first, arrivals = hashlib.sha256(), 0, None, []
try:
    while chunk := c.recv(262144):
        now = time.monotonic()
        if first is None:
            first = now
        h.update(chunk); got += len(chunk)
        if mode == "pace":
            arrivals.append((now, got))
except OSError as exc:
    print(json.dumps({"ok": False, "error": str(exc), "bytes": got}), flush=True)
    sys.exit(1)
end = time.monotonic()
ok = got == n and h.digest() == hashlib.sha256(random.Random(n).randbytes(n)).digest()
print(json.dumps({"ok": ok, "bytes": got, "t0": t0, "first": first, "end": end,
                  "arrivals": arrivals}), flush=True)
"""

# `quictun connect` with PathConfig.relay_after = argv[1]; the rest is quictun's argv. The
# CLI takes its tunables from main(obj={"config": ...}) (quictun/cli/main.py).
RELAY_AFTER_WRAPPER = r"""
import dataclasses, os, sys
sys.path.insert(0, %(repo)r)
relay_after = float(sys.argv.pop(1))
from quictun.config import TunnelConfig
from quictun.cli.main import main
cfg = TunnelConfig.from_environment(os.environ)
cfg = cfg.replace(paths=dataclasses.replace(cfg.paths, relay_after=relay_after))
print(f"measure-wrapper relay_after={cfg.paths.relay_after}", file=sys.stderr, flush=True)
sys.argv[0] = "quictun"
sys.exit(main(obj={"config": cfg}))
"""


def log(msg: str) -> None:
    print(f"[measure {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


@dataclass
class Case:
    name: str
    title: str
    a: SiteSpec
    b: SiteSpec
    same_lan: bool = False
    family: int = 4
    loss: int = 0
    udp_timeout: int | None = None
    idle: float = 0.0
    direct_wait: float = 10.0  # how long the --listen connect may take to go direct
    hops: int = 0  # >0: drop IPv4 with TTL <= hops on the wan (emulated internet routers)
    rebinding: bool = False
    fast_start: bool = False
    uplink_mtu: int = 0  # >0: site a's uplink MTU, ICMP "too big" filtered (a black hole)
    lan_mtu: int = 0  # >0 (same_lan only): the LAN's MTU, e.g. 9000


def _v4(kind: str, **kw: Any) -> SiteSpec:
    return SiteSpec(kind, ipv6=False, **kw)  # IPv4 only: the NAT must be traversed


CASES = [
    Case("fw-v4", "firewall<->firewall IPv4", _v4("firewall"), _v4("firewall")),
    Case("fw-v6", "firewall<->firewall IPv6-only", SiteSpec("firewall", ipv4=False),
         SiteSpec("firewall", ipv4=False), family=6),
    Case("cone", "cone<->cone", _v4("cone"), _v4("cone"), rebinding=True, fast_start=True),
    Case("same-lan", "same LAN (one cone router)", SiteSpec("cone"), SiteSpec("cone"),
         same_lan=True),
    Case("sym", "symmetric<->symmetric", _v4("symmetric"), _v4("symmetric"),
         direct_wait=20.0, fast_start=True),
    Case("cone-udpblk", "cone<->udp-blocked", _v4("cone"), _v4("udp-blocked")),
    Case("cone-sym", "cone<->symmetric", _v4("cone"), _v4("symmetric"), direct_wait=20.0),
    Case("cone-acceptwan", "cone<->cone, routers accept wan input",
         _v4("cone", drop_wan_input=False), _v4("cone", drop_wan_input=False)),
    Case("cone-acceptwan-hops", "cone<->cone, routers accept wan input, 4 emulated hops",
         _v4("cone", drop_wan_input=False), _v4("cone", drop_wan_input=False), hops=4),
    Case("cone-loss10", "cone<->cone, 10% UDP loss on the wan", _v4("cone"), _v4("cone"),
         loss=10),
    Case("cone-idle", "cone<->cone, udp conntrack timeout 5 s, 20 s idle", _v4("cone"),
         _v4("cone"), udp_timeout=5, idle=20.0),
    Case("cone-mtu1280", "cone<->cone, 1280-MTU uplink at a, ICMP too-big filtered",
         _v4("cone"), _v4("cone"), uplink_mtu=1280),
    Case("fw-v6-mtu1280", "firewall<->firewall IPv6, 1280-MTU uplink, ICMP filtered",
         SiteSpec("firewall", ipv4=False), SiteSpec("firewall", ipv4=False), family=6,
         uplink_mtu=1280),
    Case("same-lan-jumbo", "same LAN with a 9000-byte MTU", SiteSpec("cone"),
         SiteSpec("cone"), same_lan=True, lan_mtu=9000),
]


def emulate_internet_hops(lab: Lab, hops: int) -> None:
    """Drop, on the wan bridge, IPv4 packets whose TTL would die within ``hops`` routers
    (the lab's routers are adjacent; copied from test_lab_hardnat)."""
    lab.run(lab.wan_ns, ["nft", "-f", "-"], check=True, input=f"""
table bridge qlab_hops {{
  chain forward_chain {{
    type filter hook forward priority -10; policy accept;
    ether type ip ip ttl <= {hops} drop
  }}
}}
""")


def startup_baseline(runs: int = 3) -> float:
    """Median seconds to start Python and import quictun's CLI and API (no network)."""
    times = []
    for _ in range(runs):
        t = time.monotonic()
        subprocess.run([sys.executable, "-c", "import quictun.cli.main, quictun.aio.client"],
                       cwd=REPO, check=True, env={**os.environ, "PYTHONPATH": str(REPO)})
        times.append(time.monotonic() - t)
    return statistics.median(times)


class Watch:
    """Timestamp every line a LabProcess writes to stderr (polled every 10 ms)."""

    def __init__(self, proc: LabProcess, t0: float) -> None:
        self.proc = proc
        self.t0 = t0
        self.lines: list[tuple[float, str]] = []
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        offset, partial = 0, b""
        while True:
            stopping = self._stop.is_set()
            try:
                with open(self.proc.stderr_path, "rb") as f:
                    f.seek(offset)
                    data = f.read()
            except OSError:
                data = b""
            if data:
                now = time.monotonic()
                offset += len(data)
                partial += data
                *complete, partial = partial.split(b"\n")
                with self._lock:
                    for raw in complete:
                        self.lines.append((now, raw.decode(errors="replace")))
            if stopping:
                return
            time.sleep(0.01)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(2.0)

    def paths(self) -> list[tuple[float, str, str | None]]:
        """[(seconds since t0, kind, remote)] for every path line so far."""
        with self._lock:
            lines = list(self.lines)
        out = []
        for t, line in lines:
            m = PATH_LINE.search(line)
            if m:
                out.append((t - self.t0, m.group(1), m.group(3)))
        return out

    def wait_path(self, kind: str | None, timeout: float, *, after: float = -1.0,
                  remote_re: str | None = None) -> tuple[float, str, str | None] | None:
        """The first path line (of ``kind``, later than ``after`` s) within ``timeout``."""
        deadline = time.monotonic() + timeout
        while True:
            for p in self.paths():
                if p[0] > after and (kind is None or p[1] == kind) and (
                        remote_re is None or (p[2] and re.search(remote_re, p[2]))):
                    return p
            if time.monotonic() > deadline or not self.proc.alive:
                return None
            time.sleep(0.02)


class Rig:
    """Relay + service + `quictun serve` (host A); `quictun connect` runs in host B."""

    def __init__(self, lab: Lab, workdir: Path, family: int) -> None:
        self.lab = lab
        self.workdir = workdir
        self.signal = lab.signal_url6 if family == 6 else lab.signal_url
        self.quictun = workdir / "quictun"
        self.quictun.write_text(
            f"#!{sys.executable}\nimport sys\nsys.path.insert(0, {str(REPO)!r})\n"
            "from quictun.cli.main import main\nsys.argv[0] = 'quictun'\nsys.exit(main())\n"
        )
        self.quictun.chmod(0o755)
        self.wrapper = RELAY_AFTER_WRAPPER % {"repo": str(REPO)}

    def env(self, site: str) -> dict[str, str]:
        home = self.workdir / f"home-{site}"
        home.mkdir(exist_ok=True)
        # the lab's addresses (198.18.0.0/15) are not global: QUICTUN_LAB relaxes the
        # checks that protect real networks (birthday targets), see quictun/config.py
        return {"QUICTUN_SECRET": SECRET, "QUICTUN_HOME": str(home), "PYTHONPATH": str(REPO),
                "QUICTUN_LAB": "1"}

    def start(self) -> None:
        lab = self.lab
        relay = lab.spawn(lab.relay_ns,
                          [sys.executable, "-m", "signal_server", "--port", str(lab.relay_port),
                           "--stun-port2", str(lab.relay_port + 1)],
                          env={"PYTHONPATH": str(REPO)}, cwd=REPO, name="relay")
        svc = lab.spawn_python(lab.host_a_ns, SERVICE, str(SERVICE_PORT), name="service")
        relay.wait_for_line(r"listening", timeout=20)
        svc.wait_for_line("service listening", timeout=10)
        serve = lab.spawn(lab.host_a_ns,
                          [str(self.quictun), "serve", NAME, "--forward",
                           f"127.0.0.1:{SERVICE_PORT}", "--signal", self.signal],
                          env=self.env("a"), name="serve")
        serve.wait_for_line(r"serving", timeout=20)
        self.serve = serve

    def connect_argv(self, *args: str, relay_after: float | None = None) -> list[str]:
        tail = ["connect", NAME, *args, "--signal", self.signal]
        if relay_after is None:
            return [str(self.quictun), *tail]
        return [sys.executable, "-c", self.wrapper, str(relay_after), *tail]

    def connect_listen(self) -> tuple[LabProcess, Watch]:
        t0 = time.monotonic()
        proc = self.lab.spawn(self.lab.host_b_ns,
                              self.connect_argv("--listen", f"127.0.0.1:{LISTEN_PORT}"),
                              env=self.env("b"), name="connect")
        watch = Watch(proc, t0)
        proc.wait_for_line(r"listening on", timeout=30)
        return proc, watch

    def client(self, mode: str, n: int, *extra: str, timeout: float = 180.0) -> dict[str, Any]:
        r = self.lab.run_python(self.lab.host_b_ns, CLIENT, str(LISTEN_PORT), mode, str(n),
                                *extra, timeout=timeout, check=False)
        for line in r.stdout.splitlines():
            if line.startswith("{"):
                return json.loads(line)
        return {"ok": False, "error": (r.stdout + r.stderr)[-500:], "bytes": 0}

    def spawn_client(self, mode: str, n: int, *extra: str) -> LabProcess:
        return self.lab.spawn_python(self.lab.host_b_ns, CLIENT, str(LISTEN_PORT), mode,
                                     str(n), *extra, name=f"client-{mode}")

    def ttfb(self, *, relay_after: float | None = None, direct_cap: float = 0.0,
             timeout: float = 30.0) -> dict[str, Any]:
        """One fresh `connect --stdio`: seconds until the echoed line is back (and, waiting
        at most ``direct_cap`` s from start, until path=direct)."""
        probe = b"ttfb-probe-%d" % time.monotonic_ns()
        t0 = time.monotonic()
        proc = self.lab.spawn(self.lab.host_b_ns,
                              self.connect_argv("--stdio", relay_after=relay_after),
                              env=self.env("b"), stdin=subprocess.PIPE, name="stdio")
        watch = Watch(proc, t0)
        res: dict[str, Any] = {"ttfb": None, "direct_at": None, "first_path": None,
                               "path_at_echo": None, "relay_after": relay_after}
        try:
            assert proc.popen.stdin is not None
            proc.popen.stdin.write(b"ECHO\n" + probe + b"\n")
            proc.popen.stdin.flush()
            deadline = t0 + timeout
            while time.monotonic() < deadline and proc.alive:
                if probe in proc.stdout_path.read_bytes():
                    res["ttfb"] = time.monotonic() - t0
                    kinds = PATH_LINE.findall(proc.stderr_path.read_text(errors="replace"))
                    res["path_at_echo"] = kinds[-1][0] if kinds else None
                    break
                time.sleep(0.005)
            if res["ttfb"] is not None and direct_cap > 0:
                watch.wait_path("direct", max(0.0, t0 + direct_cap - time.monotonic()))
            paths = watch.paths()
            if paths:
                res["first_path"] = paths[0][1]
            d = next((p for p in paths if p[1] == "direct"), None)
            res["direct_at"] = d[0] if d else None
            if relay_after is not None:
                res["patched"] = any("measure-wrapper relay_after=" in line
                                     for _, line in watch.lines)
            if res["ttfb"] is None:
                res["error"] = proc.tail(15)
        finally:
            proc.stop(timeout=2.0)
            watch.stop()
        return res


def _median(xs: list[float | None]) -> float | None:
    vals = [x for x in xs if x is not None]
    return statistics.median(vals) if vals else None


def _classify(direct: int, relay: int, size: int) -> str:
    if direct >= size and relay < size // 10:
        return "direct"
    if relay >= size and direct < size // 10:
        return "relay"
    return "mixed"


def analyse_pace(res: dict[str, Any], t_flush: float) -> dict[str, Any]:
    """Stalls in a paced transfer's arrivals after ``t_flush``."""
    arr = res.get("arrivals") or []
    before = [a for a in arr if a[0] <= t_flush]
    prev_t = before[-1][0] if before else t_flush
    stalls = []
    for t, _ in arr[len(before):]:
        if t - prev_t > STALL_GAP:
            stalls.append((prev_t - t_flush, t - t_flush))
        prev_t = t
    first_after = next((a[0] - t_flush for a in arr if a[0] > t_flush), None)
    return {
        "bytes_before_flush": before[-1][1] if before else 0,
        "stalls": [[round(a, 3), round(b, 3)] for a, b in stalls],
        # data flows again: end of the first stall after the flush (no stall: first arrival)
        "resume": round(stalls[0][1], 3) if stalls else (
            round(first_after, 3) if first_after is not None else None),
        "stalled_total": round(sum(b - max(a, 0.0) for a, b in stalls), 3),
    }


def relay_tcp_retrans(lab: Lab, peer_ip: str) -> int:
    """Total TCP retransmissions of the relay's connections to ``peer_ip`` (``ss -ti``)."""
    r = lab.run(lab.relay_ns, ["ss", "-tin", "state", "established",
                               f"( sport = :{lab.relay_port} )"])
    total = 0
    for m in re.finditer(rf"{re.escape(peer_ip)}:\d+[^\n]*\n([^\n]*)", r.stdout):
        rt = re.search(r"retrans:\d+/(\d+)", m.group(1))
        total += int(rt.group(1)) if rt else 0
    return total


def run_rebinding(rig: Rig, watch: Watch) -> list[dict[str, Any]]:
    lab = rig.lab
    reps = []
    for i, (lo, hi) in enumerate(REBIND_RANGES):
        xfer = rig.spawn_client("pace", PACE_SIZE, str(PACE_RATE))
        time.sleep(2.0)  # ~2 MB delivered at the pace
        old = [p for p in watch.paths() if p[1] == "direct"]
        old_remote = old[-1][2] if old else None
        retrans0 = relay_tcp_retrans(lab, lab.router_a_wan_ip4)
        lab.set_masquerade_ports("a", lo, hi)
        t_flush = time.monotonic()
        lab.flush_conntrack("a")
        after = t_flush - watch.t0
        port_re = rf"^{re.escape(lab.router_a_wan_ip4)}:({lo // 1000}\d{{3}}|2\d{{4}})$"
        new = watch.wait_path("direct", 40.0, after=after, remote_re=port_re)
        try:
            xfer.wait(timeout=120)
        except subprocess.TimeoutExpired:
            xfer.stop()
        out = xfer.output("stdout")
        res = json.loads(out.strip().splitlines()[-1]) if out.strip() else {"ok": False}
        changes = [(round(t - after, 3), k, r) for t, k, r in watch.paths() if t > after]
        rep = {
            "rep": i + 1, "range": [lo, hi], "old_remote": old_remote,
            "new_remote": new[2] if new else None,
            "direct_again": round(new[0] - after, 3) if new else None,
            "path_changes": changes[:8],
            "sha_ok": bool(res.get("ok")), "bytes": res.get("bytes"),
            "relay_tcp_retrans_to_a": relay_tcp_retrans(lab, lab.router_a_wan_ip4) - retrans0,
            **analyse_pace(res, t_flush),
        }
        if new and new[2] and int(new[2].rsplit(":", 1)[1]) not in range(lo, hi + 1):
            rep["note"] = "new port outside the configured range"
        log(f"  rebinding {i + 1}: resume {rep['resume']} s, direct again "
            f"{rep['direct_again']} s ({old_remote} -> {rep['new_remote']}), "
            f"sha ok {rep['sha_ok']}")
        reps.append(rep)
    return reps


def run_case(case: Case, workroot: Path) -> dict[str, Any]:
    out: dict[str, Any] = {"name": case.name, "title": case.title}
    t_case = time.monotonic()
    workdir = workroot / case.name
    (workdir / "logs").mkdir(parents=True)
    with Lab(case.a, case.b, same_lan=case.same_lan, prefix=PREFIX,
             logdir=str(workdir / "logs")) as lab:
        rig = Rig(lab, workdir, case.family)
        if case.loss:
            lab.set_loss(case.loss)
        if case.hops:
            emulate_internet_hops(lab, case.hops)
        if case.udp_timeout is not None:
            for site in ("a", "b"):
                lab.set_udp_timeout(site, case.udp_timeout)
        if case.uplink_mtu:
            lab.set_uplink_mtu("a", case.uplink_mtu)
        if case.lan_mtu:
            lab.set_lan_mtu(case.lan_mtu)
        rig.start()
        proc, watch = rig.connect_listen()
        try:
            first = watch.wait_path(None, 30.0)
            direct = watch.wait_path("direct", case.direct_wait)
            out["first_path"] = first[1] if first else None
            out["first_path_at"] = round(first[0], 3) if first else None
            out["direct_at"] = round(direct[0], 3) if direct else None
            out["direct_remote"] = direct[2] if direct else None
            if case.idle:
                idle = lab.spawn_python(lab.host_b_ns, IDLE_CLIENT, str(LISTEN_PORT),
                                        str(case.idle), name="idle")
                idle.wait(timeout=case.idle + 60)
                out["idle"] = idle.output("stdout").strip().splitlines()[-1:] or ["no output"]
                out["idle_path_changes"] = [(round(t, 2), k) for t, k, _ in watch.paths()
                                            if direct and t > direct[0]]
            lab.reset_counters()
            res5 = rig.client("down", COUNTER_SIZE, timeout=300)
            d_bytes = lab.lan_udp_bytes() if case.same_lan else lab.direct_udp_bytes()
            r_bytes = lab.relay_tcp_bytes()
            out["counters"] = {"direct_udp": d_bytes, "relay_tcp": r_bytes,
                               "sha_ok": res5["ok"],
                               "path": _classify(d_bytes, r_bytes, COUNTER_SIZE)}
            if case.same_lan:
                out["counters"]["wan_udp"] = lab.direct_udp_bytes()
            cpu0 = (cpu_seconds(proc.pid), cpu_seconds(rig.serve.pid))
            res10 = rig.client("down", THROUGHPUT_SIZE, timeout=300)
            gb = THROUGHPUT_SIZE / 1e9
            out["cpu_s_per_gb"] = {
                "connect": round((cpu_seconds(proc.pid) - cpu0[0]) / gb, 1),
                "serve": round((cpu_seconds(rig.serve.pid) - cpu0[1]) / gb, 1)}
            if res10["ok"]:
                out["mbps"] = round(THROUGHPUT_SIZE / MB / (res10["end"] - res10["t0"]), 2)
            else:
                out["mbps"] = None
            out["throughput_sha_ok"] = res10["ok"]
            paths = watch.paths()
            out["final_path"] = paths[-1][1] if paths else None
            sizes = re.findall(r"datagram size (\d+) bytes \(path=direct", proc.output())
            out["datagram_size"] = int(sizes[-1]) if sizes else None
            out["path_lines"] = len(paths)
            if case.rebinding:
                out["rebinding"] = run_rebinding(rig, watch)
            if not res10["ok"] or not res5["ok"]:
                out["error"] = {"5MB": res5.get("error"), "10MB": res10.get("error")}
        finally:
            proc.stop()
            watch.stop()
        cap = 0.0
        if out.get("direct_at") is not None:
            cap = max(3.0, 1.5 * out["direct_at"])
        runs = [rig.ttfb(direct_cap=cap) for _ in range(TTFB_RUNS)]
        out["ttfb_runs"] = [round(r["ttfb"], 3) if r["ttfb"] is not None else None
                            for r in runs]
        out["ttfb"] = _median([r["ttfb"] for r in runs])
        out["ttfb_path_at_echo"] = [r["path_at_echo"] for r in runs]
        out["ttfb_direct_at"] = [round(r["direct_at"], 3) if r["direct_at"] is not None
                                 else None for r in runs]
        errs = [r["error"] for r in runs if r.get("error")]
        if errs:
            out["ttfb_errors"] = errs[:1]
        if case.fast_start:
            out["fast_start"] = run_fast_start(rig)
        if case.loss:
            out["loss_dropped_packets"] = lab.loss_dropped_packets()
    out["seconds"] = round(time.monotonic() - t_case, 1)
    return out


IDLE_CLIENT = r"""
import socket, sys, time
c = socket.create_connection(("127.0.0.1", int(sys.argv[1])), timeout=60)
f = c.makefile("rb")
c.sendall(b"ECHO\nping1\n")
assert f.readline() == b"ping1\n"
time.sleep(float(sys.argv[2]))
t = time.monotonic()
c.sendall(b"ping2\n")
ok = f.readline() == b"ping2\n"
print(f"echo after idle {'ok' if ok else 'FAILED'} in {time.monotonic() - t:.3f} s", flush=True)
"""


def run_fast_start(rig: Rig) -> dict[str, Any]:
    runs: dict[str, list[dict[str, Any]]] = {str(ra): [] for ra in RELAY_AFTER}
    for _ in range(TTFB_RUNS):
        for ra in RELAY_AFTER:  # interleaved, so drift hits every setting alike
            runs[str(ra)].append(rig.ttfb(relay_after=ra))
    out: dict[str, Any] = {}
    for ra, rs in runs.items():
        out[ra] = {
            "ttfb_runs": [round(r["ttfb"], 3) if r["ttfb"] is not None else None for r in rs],
            "ttfb": _median([r["ttfb"] for r in rs]),
            "path_at_echo": [r["path_at_echo"] for r in rs],
            "patched": all(r.get("patched") for r in rs),
        }
    medians = sorted((v["ttfb"], ra) for ra, v in out.items() if v["ttfb"] is not None)
    out["best"] = medians[0][1]
    # "clear" only if the best median beats the next by more than the best's own spread
    spread = [x for x in out[medians[0][1]]["ttfb_runs"] if x is not None]
    out["clear"] = len(medians) > 1 and (
        medians[1][0] - medians[0][0] > max(0.05, max(spread) - min(spread)))
    log("  fast start: " + ", ".join(f"relay_after={ra}: {v['ttfb']:.3f} s"
                                     for ra, v in out.items() if isinstance(v, dict)
                                     and v["ttfb"] is not None))
    return out


# ------------------------------------------------------------------------------ reporting
def _f(x: float | None, digits: int = 2, unit: str = "") -> str:
    return "-" if x is None else f"{x:.{digits}f}{unit}"


def render(results: dict[str, Any]) -> str:
    lines = ["| case | first path (at s) | final path "
             "| 5 MB counters: direct UDP / relay TCP (=> path) "
             "| TTFB median (3 runs) | path=direct at | 10 MB MB/s |",
             "|---|---|---|---|---|---|---|"]
    for c in results["cases"]:
        if "crashed" in c:
            lines.append(f"| {c['title']} | ERROR: {c['crashed'][:80]} | | | | | |")
            continue
        cnt = c.get("counters", {})
        runs = ", ".join(_f(x) for x in c.get("ttfb_runs", []))
        ctr = (f"{cnt.get('direct_udp', 0) / MB:.1f} MB / {cnt.get('relay_tcp', 0) / MB:.1f} MB "
               f"({cnt.get('path')}{'' if cnt.get('sha_ok') else ', SHA FAILED'})")
        direct_at = _f(c.get("direct_at"), 2, " s") if c.get("direct_at") is not None \
            else "never"
        mbps = _f(c.get("mbps"), 1) + ("" if c.get("throughput_sha_ok") else " (SHA FAILED)")
        first = f"{c.get('first_path')} ({_f(c.get('first_path_at'))})"
        if c.get("direct_remote"):
            direct_at += f" ({c['direct_remote']})"
        lines.append(f"| {c['title']} | {first} | {c.get('final_path')} | {ctr} "
                     f"| {_f(c.get('ttfb'), 2, ' s')} ({runs}) | {direct_at} | {mbps} |")
    out = ["### Paths, time to first byte, throughput", "", *lines, "",
           f"Python start-up + `import quictun.cli.main, quictun.aio.client` alone: "
           f"{_f(results['meta'].get('startup_baseline'), 2, ' s')} (median of 3; part of "
           "every TTFB).", ""]
    notes = []
    for c in results["cases"]:
        if c.get("cpu_s_per_gb"):
            cpu = c["cpu_s_per_gb"]
            notes.append(f"- {c['title']}: direct datagram size {c.get('datagram_size')}, "
                         f"CPU s/GB connect {cpu['connect']}, serve {cpu['serve']}")
        if c.get("idle"):
            notes.append(f"- {c['title']}: {c['idle'][0]}; path changes during the idle "
                         f"period: {c.get('idle_path_changes') or 'none'}")
        if c.get("loss_dropped_packets") is not None:
            notes.append(f"- {c['title']}: {c['loss_dropped_packets']} UDP packets dropped "
                         "by the loss rule")
        if c.get("ttfb_direct_at") and any(x is not None for x in c["ttfb_direct_at"]):
            notes.append(f"- {c['title']}: fresh `--stdio` runs: path at echo "
                         f"{c['ttfb_path_at_echo']}, path=direct at "
                         f"{[_f(x) for x in c['ttfb_direct_at']]} s")
        elif c.get("ttfb_path_at_echo"):
            notes.append(f"- {c['title']}: fresh `--stdio` runs: path at echo "
                         f"{c['ttfb_path_at_echo']}, never direct")
        if c.get("ttfb_errors"):
            notes.append(f"- {c['title']}: a TTFB run failed: "
                         f"`{c['ttfb_errors'][0].splitlines()[-1][:200]}`")
    if notes:
        out += ["Per case details:", "", *notes, ""]
    reb = next((c.get("rebinding") for c in results["cases"] if c.get("rebinding")), None)
    if reb:
        out += ["### NAT rebinding (cone<->cone, site A moved and its conntrack flushed "
                f"during a {PACE_SIZE // MB} MB transfer paced at {PACE_RATE // MB} MB/s)", "",
                "| rep | new UDP range | data flows again after flush | path=direct again "
                "after flush | old -> new remote (as seen by B) | stalls (s after flush) "
                "| relay->A TCP retransmissions | SHA-256 |", "|---|---|---|---|---|---|---|---|"]
        for r in reb:
            stalls = "; ".join(f"no data from {a:+.2f} to {b:+.2f}" for a, b in r["stalls"]) \
                or f"none > {STALL_GAP} s"
            lines_ok = "ok" if r["sha_ok"] else f"FAILED ({r['bytes']} bytes)"
            out.append(f"| {r['rep']} | {r['range'][0]}-{r['range'][1]} "
                       f"| {_f(r['resume'], 2, ' s')} | {_f(r['direct_again'], 2, ' s')} "
                       f"| {r['old_remote']} -> {r['new_remote']} | {stalls} "
                       f"| {r.get('relay_tcp_retrans_to_a')} | {lines_ok} |")
        out += ["", "Path lines after each flush (s after flush, kind, remote):", ""]
        for r in reb:
            out.append(f"- rep {r['rep']}: {r['path_changes']}")
        out.append("")
    fs = [(c["title"], c["fast_start"]) for c in results["cases"] if c.get("fast_start")]
    if fs:
        out += ["### Fast start: TTFB by `PathConfig.relay_after` (connect side, patched by "
                "a wrapper)", "",
                "| case | " + " | ".join(f"relay_after={ra} s" for ra in RELAY_AFTER)
                + " | lowest |", "|---|" + "---|" * (len(RELAY_AFTER) + 1)]
        for title, f in fs:
            cells = []
            for ra in RELAY_AFTER:
                v = f[str(ra)]
                runs = ", ".join(_f(x) for x in v["ttfb_runs"])
                cells.append(f"{_f(v['ttfb'], 2, ' s')} ({runs}; path at echo: "
                             f"{'/'.join(str(p) for p in v['path_at_echo'])})")
            verdict = f"relay_after={f['best']}" + ("" if f.get("clear") else
                                                     " (within noise)")
            out.append(f"| {title} | " + " | ".join(cells) + f" | {verdict} |")
        out.append("")
    return "\n".join(out)


MARKER = "<!-- end of generated results: notes below are kept when the file is regenerated -->"


def write_markdown(path: Path, results: dict[str, Any], tables: str) -> None:
    kept = ""
    if path.exists():
        text = path.read_text()
        if MARKER in text:
            kept = text.split(MARKER, 1)[1]
    meta = results["meta"]
    head = [
        "# Network lab results", "",
        f"Measured {meta['date']} with `{meta['command']}` (as root, from the repository "
        f"root; {meta['seconds']:.0f} s wall time) at commit `{meta['commit']}`"
        f"{' plus uncommitted changes' if meta['dirty'] else ''}; kernel {meta['kernel']}, "
        f"Python {meta['python']}, {meta['cpus']} CPUs.", "",
        "Setup: `tests/lab/netlab.py` namespaces (relay in the wan, `quictun serve` in host "
        "A forwarding a local service, `quictun connect` in host B). TTFB = wall time from "
        "starting a fresh `quictun connect NAME --stdio` until the first line echoed by the "
        "service is back (serve already registered; includes Python start-up). `path=direct "
        "at` = seconds from the start of `quictun connect --listen` until its first "
        "`path=direct` line. The 5 MB counters are the lab's nftables counters reset before "
        "the download (`same LAN`: UDP bridged host<->host on the LAN). Throughput: 10 MB "
        "downloaded from the service through the tunnel, SHA-256 checked.", "",
        tables, MARKER,
    ]
    path.write_text("\n".join(head) + (kept if kept else "\n"))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python3 -m tests.lab.measure", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", metavar="PATH", help="write all results as JSON here")
    ap.add_argument("--markdown", metavar="PATH",
                    help="write the tables to this markdown file (e.g. docs/lab-results.md)")
    ap.add_argument("--cases", help="comma separated case names (default: all): "
                    + ",".join(c.name for c in CASES))
    args = ap.parse_args(argv)
    reason = lab_available()
    if reason:
        print(f"network lab unavailable: {reason}", file=sys.stderr)
        return 2
    cases = CASES
    if args.cases:
        wanted = args.cases.split(",")
        unknown = set(wanted) - {c.name for c in CASES}
        if unknown:
            ap.error(f"unknown cases: {sorted(unknown)}")
        cases = [c for c in CASES if c.name in wanted]
    sweep_stale_namespaces(PREFIX)
    t_start = time.monotonic()
    baseline = startup_baseline()
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO,
                            capture_output=True, text=True).stdout.strip()
    dirty = bool(subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                                cwd=REPO, capture_output=True, text=True).stdout.strip())
    command = "python3 -m tests.lab.measure" + "".join(
        f" {shlex.quote(a)}" for a in (argv if argv is not None else sys.argv[1:]))
    results: dict[str, Any] = {"meta": {
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "command": command, "commit": commit, "dirty": dirty,
        "kernel": platform.release(), "python": platform.python_version(),
        "cpus": os.cpu_count(), "startup_baseline": baseline}, "cases": []}
    tmp = tempfile.mkdtemp(prefix="quictun-measure-")
    if True:
        for case in cases:
            log(f"case {case.name}: {case.title}")
            try:
                res = run_case(case, Path(tmp))
            except Exception as exc:  # one broken case must not lose the others
                res = {"name": case.name, "title": case.title,
                       "crashed": f"{type(exc).__name__}: {exc}"}
                log(f"  CRASHED: {res['crashed'][:2000]}")
            else:
                log(f"  first {res.get('first_path')} final {res.get('final_path')} "
                    f"direct at {res.get('direct_at')} ttfb {_f(res.get('ttfb'), 3)} "
                    f"MB/s {res.get('mbps')} counters {res.get('counters')} "
                    f"({res['seconds']} s)")
            results["cases"].append(res)
    sweep_stale_namespaces(PREFIX)
    if any("crashed" in c for c in results["cases"]):
        log(f"logs of the crashed case(s) kept in {tmp}")
    else:
        shutil.rmtree(tmp, ignore_errors=True)
    results["meta"]["seconds"] = round(time.monotonic() - t_start, 1)
    tables = render(results)
    print(tables)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    if args.markdown:
        write_markdown(Path(args.markdown), results, tables)
    return 0 if not any("crashed" in c for c in results["cases"]) else 1


if __name__ == "__main__":
    sys.exit(main())
