"""The network lab of the side-by-side benchmark (:mod:`quictun.bench.compare`).

:class:`CompareLab` builds ``tests/lab/netlab.py``'s two-site lab with both sites stateful
firewalls (no NAT, IPv4), then adds:

* a guard in every namespace (nftables, output and forward hooks): any packet to an
  address outside the lab's ranges (127/8, 198.18/15; ::1, 2001:db8::/32; link-local,
  multicast and broadcast, which no lab router forwards: quictun's UPnP discovery sends
  SSDP to 239.255.255.250 on the LAN) is counted in ``qtbench_guard/outside``, its
  address remembered, and dropped (:meth:`CompareLab.outside` must report 0);
* a hole in site A's firewall for TCP to the sink and to sshd, so the references a user
  would otherwise pick (raw TCP, ``ssh -L``) can reach host A at all (quictun and
  holesail need no hole: they punch);
* the relay (``quictun-signal``) in the wan namespace, the TCP sink (:data:`SINK_CODE`) in
  host A, an OpenSSH server in host A, and (when holesail is installed) a local HyperDHT
  in the wan namespace.

Probes run inside host B (:data:`CLIENT_CODE`): push N bytes and check the sink's
SHA-256, or time a fresh client process until its first echoed byte. Process accounting
(CPU seconds, RSS) reads ``/proc`` from here: network namespaces share the PID space.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.lab.netlab import Lab, LabProcess, SiteSpec

from . import holesail as hs
from .rig import WRAPPER, cpu_seconds, status_kib

REPO = Path(__file__).resolve().parents[2]
SINK_PORT = 7000
SSH_PORT = 2222
DHT_PORT = 49737
DHT_NODES = 4  # ordinary nodes beside the bootstrapper

# host A: a threaded TCP sink on 0.0.0.0:PORT. The first byte picks the behaviour: "H" hash
# until EOF, then reply "<sha256> <count>\n"; "S" the same, reading 64 KiB at a time at
# RATE bytes/s (the slow reader); "E" echo until EOF.
SINK_CODE = r"""
import hashlib, socket, sys, threading, time
port, rate = int(sys.argv[1]), float(sys.argv[2])
def run(c):
    try:
        mode = c.recv(1)
        if mode == b"E":
            while data := c.recv(65536):
                c.sendall(data)
        elif mode in (b"H", b"S"):
            h, n = hashlib.sha256(), 0
            size = 65536 if mode == b"S" else 1 << 20
            while data := c.recv(size):
                h.update(data); n += len(data)
                if mode == b"S":
                    time.sleep(len(data) / rate)
            c.sendall(f"{h.hexdigest()} {n}\n".encode())
    except OSError:
        pass
    finally:
        c.close()
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", port)); s.listen(128)
print("sink listening", port, flush=True)
while True:
    c, _ = s.accept()
    threading.Thread(target=run, args=(c,), daemon=True).start()
"""

# host B: one probe, one JSON line on stdout.
#   push HOST PORT N MODE   send MODE + N bytes, half-close, check the sink's digest
#   stdio LOG -- ARGV       spawn ARGV; "E" + a line on its stdin until the line is echoed
#   port HOST PORT LOG -- ARGV  spawn ARGV (may be empty); connect to HOST:PORT until it
#                           accepts, "E" + a line, until echoed
#   wait PORT SECONDS       until 127.0.0.1:PORT accepts a connection
CLIENT_CODE = r"""
import hashlib, json, os, random, signal, socket, subprocess, sys, threading, time
LINE = b"first byte %d\n" % time.monotonic_ns()

def push(host, port, n, mode):
    payload = random.Random(n).randbytes(n)
    want = hashlib.sha256(payload).hexdigest()
    t0 = time.perf_counter()
    with socket.create_connection((host, int(port)), timeout=300) as c:
        c.sendall(mode.encode())
        view = memoryview(payload)
        for i in range(0, n, 1 << 20):
            c.sendall(view[i:i + (1 << 20)])
        c.shutdown(socket.SHUT_WR)
        reply = c.makefile("rb").readline()
    dt = time.perf_counter() - t0
    parts = reply.decode(errors="replace").split()
    ok = len(parts) == 2 and parts[0] == want and int(parts[1]) == n
    return {"bytes": n, "seconds": dt, "sha256_ok": ok, "reply": "" if ok else repr(reply)}

def spawn(argv, log, **kw):
    return subprocess.Popen(argv, stderr=open(log, "wb"), start_new_session=True, **kw)

def finish(p):
    if p is None:
        return
    with __import__("contextlib").suppress(Exception):
        p.stdin and p.stdin.close()
    try:
        p.wait(3)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL); p.wait()

def stdio(log, argv):
    t0 = time.perf_counter()
    p = spawn(argv, log, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    timer = threading.Timer(30, lambda: os.killpg(p.pid, signal.SIGKILL))
    timer.start()
    p.stdin.write(b"E" + LINE); p.stdin.flush()
    got = p.stdout.readline()
    dt = time.perf_counter() - t0
    timer.cancel()
    finish(p)
    return {"ttfb": dt if got == LINE else None, "got": "" if got == LINE else repr(got)}

def port(host, num, log, argv):
    t0 = time.perf_counter()
    p = spawn(argv, log, stdout=subprocess.DEVNULL) if argv else None
    deadline, got = t0 + 30, b""
    while time.perf_counter() < deadline:
        try:
            c = socket.create_connection((host, int(num)), timeout=30)
        except OSError:
            time.sleep(0.005); continue
        with c:
            c.settimeout(max(0.1, deadline - time.perf_counter()))
            c.sendall(b"E" + LINE)
            try:
                while not got.endswith(b"\n") and (d := c.recv(4096)):
                    got += d
            except OSError:
                pass
        break
    dt = time.perf_counter() - t0
    if p is not None:
        os.killpg(p.pid, signal.SIGTERM); finish(p)
    return {"ttfb": dt if got == LINE else None, "got": "" if got == LINE else repr(got)}

def wait(num, seconds):
    deadline = time.monotonic() + float(seconds)
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", int(num)), timeout=2).close()
            return {"ok": True}
        except OSError:
            time.sleep(0.02)
    return {"ok": False}

cmd, args = sys.argv[1], sys.argv[2:]
argv = args[args.index("--") + 1:] if "--" in args else []
if cmd == "push":
    out = push(args[0], args[1], int(args[2]), args[3])
elif cmd == "stdio":
    out = stdio(args[0], argv)
elif cmd == "port":
    out = port(args[0], args[1], args[2], argv)
else:
    out = wait(args[0], args[1])
print(json.dumps(out), flush=True)
"""

_GUARD_RULES = """
    meta nfproto ipv4 ip daddr != { 127.0.0.0/8, 198.18.0.0/15, 224.0.0.0/4, \
255.255.255.255 } update @seen4 { ip daddr } counter name outside drop
    meta nfproto ipv6 ip6 daddr != { ::1, 2001:db8::/32, fe80::/10, ff00::/8 } \
update @seen6 { ip6 daddr } counter name outside drop"""
GUARD_RULESET = f"""
table inet qtbench_guard {{
  counter outside {{}}
  set seen4 {{ type ipv4_addr; flags dynamic; size 256; }}
  set seen6 {{ type ipv6_addr; flags dynamic; size 256; }}
  chain output_chain {{
    type filter hook output priority -150; policy accept;{_GUARD_RULES}
  }}
  chain forward_chain {{
    type filter hook forward priority -150; policy accept;{_GUARD_RULES}
  }}
}}
"""


def proc_tree(pids: list[int]) -> list[int]:
    """``pids`` and all their living descendants."""
    children: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat", encoding="ascii", errors="replace") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(entry.name))
    out, todo = [], list(pids)
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(children.get(pid, []))
    return out


@dataclass
class Side:
    """The processes of one end of a tunnel (none for raw TCP)."""

    procs: list[LabProcess] = field(default_factory=list)
    pids: list[int] = field(default_factory=list)

    def refresh(self) -> None:
        """Re-read the process trees (sshd forks a child per connection)."""
        self.pids = proc_tree([p.pid for p in self.procs]) if self.procs else []

    def cpu(self) -> float:
        return sum(cpu_seconds(pid) for pid in self.pids)

    def rss_kib(self) -> int:
        return sum(status_kib(pid, "VmRSS") or 0 for pid in self.pids)

    def hwm_kib(self) -> int:
        """The largest VmHWM (peak RSS) of one process of this side."""
        return max((status_kib(pid, "VmHWM") or 0 for pid in self.pids), default=0)


class RssSampler:
    """Samples the summed VmRSS of two sides every ``interval`` s until stopped."""

    def __init__(self, a: Side, b: Side, interval: float = 0.05) -> None:
        self.sides = {"a": a, "b": b}
        self.peak = {"a": 0, "b": 0}
        self._stop = threading.Event()
        self._interval = interval
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            for k, side in self.sides.items():
                self.peak[k] = max(self.peak[k], side.rss_kib())
            self._stop.wait(self._interval)

    def stop(self) -> dict[str, int]:
        self._stop.set()
        self._thread.join()
        return dict(self.peak)


class CompareLab:
    """The two-firewall lab with the relay, the sink, sshd and (optionally) a HyperDHT."""

    def __init__(self, work: Path, *, prefix: str = "qtc", slow_rate: float = 4e6,
                 holesail_prefix: Path | None = None, sshd: bool = True,
                 patch: dict[str, str] | None = None) -> None:
        self.work = work
        self.patch = patch or {}  # --lever: quictun runs through rig.WRAPPER
        (work / "logs").mkdir(parents=True, exist_ok=True)
        fw = SiteSpec("firewall", ipv6=False)
        self.lab = Lab(fw, fw, prefix=prefix, logdir=str(work / "logs"))
        self.slow_rate = slow_rate
        self.secret = "cmp-" + secrets.token_urlsafe(24)
        self.scripts = hs.Scripts(holesail_prefix, work) if holesail_prefix else None
        self.bootstrap: list[str] = []
        self.ssh_key = work / "ssh" / "user"
        self.want_sshd = sshd
        self.sshd: LabProcess | None = None
        self._port = 7100

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        lab = self.lab
        lab.start()
        try:
            for ns in lab.namespaces:
                lab.run(ns, ["nft", "-f", "-"], input=GUARD_RULESET, check=True)
            lab.run(lab.router_a_ns, ["nft", "insert", "rule", "inet", "qlab_router",
                                      "forward_chain", "ip", "daddr", lab.host_a_ip4, "tcp",
                                      "dport", f"{{ {SINK_PORT}, {SSH_PORT} }}", "accept"],
                    check=True)
            relay = lab.spawn(lab.relay_ns, [sys.executable, "-m", "signal_server", "--port",
                                             str(lab.relay_port), "--stun-port2",
                                             str(lab.relay_port + 1)],
                              env={"PYTHONPATH": str(REPO)}, cwd=REPO, name="relay")
            sink = lab.spawn_python(lab.host_a_ns, SINK_CODE, str(SINK_PORT),
                                    str(self.slow_rate), name="sink")
            relay.wait_for_line(r"listening", timeout=30)
            sink.wait_for_line(r"sink listening", timeout=10)
            if self.want_sshd:
                self._start_sshd()
            if self.scripts is not None:
                dht = lab.spawn(lab.wan_ns, self.scripts.dht_argv(lab.relay_ip4, DHT_PORT,
                                                                  DHT_NODES), name="dht")
                self.bootstrap = dht.wait_for_line(r"dht ready (\S+)", timeout=60
                                                   ).group(1).split(",")
        except BaseException:
            lab.close()
            raise

    def close(self) -> None:
        self.lab.close()

    def _start_sshd(self) -> None:
        d = self.work / "ssh"
        d.mkdir(exist_ok=True)
        keygen = shutil.which("ssh-keygen") or "ssh-keygen"
        for k in ("host", "user"):
            subprocess.run([keygen, "-q", "-t", "ed25519", "-N", "", "-f", str(d / k)],
                           check=True)
        shutil.copy(d / "user.pub", d / "authorized_keys")
        os.chmod(d, 0o700)
        Path("/run/sshd").mkdir(exist_ok=True)  # privilege separation directory
        (d / "sshd_config").write_text(
            f"Port {SSH_PORT}\nListenAddress {self.lab.host_a_ip4}\nHostKey {d / 'host'}\n"
            f"AuthorizedKeysFile {d / 'authorized_keys'}\nPidFile {d / 'sshd.pid'}\n"
            "PermitRootLogin prohibit-password\nPasswordAuthentication no\nUsePAM no\n"
            "StrictModes no\nAllowTcpForwarding yes\n")
        sshd = shutil.which("sshd") or "/usr/sbin/sshd"
        self.sshd = self.lab.spawn(self.lab.host_a_ns,
                                   [sshd, "-D", "-e", "-f", str(d / "sshd_config")],
                                   name="sshd")
        self.sshd.wait_for_line("Server listening", timeout=10)

    # ------------------------------------------------------------------ helpers
    def next_port(self) -> int:
        """A fresh local port in host B for the next entry (no reuse across cases)."""
        self._port += 1
        return self._port

    def quictun_env(self, side: str, engine: str | None) -> dict[str, str]:
        home = self.work / f"home-{side}"
        home.mkdir(exist_ok=True)
        # QUICTUN_LAB: the lab's 198.18.0.0/15 is not global (see quictun/config.py)
        return {"QUICTUN_SECRET": self.secret, "QUICTUN_HOME": str(home),
                "PYTHONPATH": str(REPO), "QUICTUN_LAB": "1", "QUICTUN_ENGINE": engine or "",
                "QUICTUN_BENCH_PATCH": json.dumps(self.patch)}

    def quictun_argv(self) -> list[str]:
        """How to start quictun: through the levers' wrapper when there are levers."""
        py = sys.executable
        return [py, "-c", WRAPPER] if self.patch else [py, "-m", "quictun"]

    def ssh_argv(self, *args: str) -> list[str]:
        return [shutil.which("ssh") or "ssh", "-F", "/dev/null", "-i", str(self.ssh_key),
                "-p", str(SSH_PORT), "-o", "StrictHostKeyChecking=no",
                "-o", "UserKnownHostsFile=/dev/null", "-o", "BatchMode=yes",
                "-o", "LogLevel=ERROR", *args, f"root@{self.lab.host_a_ip4}"]

    def client(self, *args: str, timeout: float = 300.0,
               env: dict[str, str] | None = None) -> dict[str, Any]:
        """Run one :data:`CLIENT_CODE` probe in host B; its JSON line (or an error)."""
        try:
            r = self.lab.run_python(self.lab.host_b_ns, CLIENT_CODE, *args, timeout=timeout,
                                    check=False, env=env)
        except subprocess.TimeoutExpired:
            return {"error": f"probe {args[0]} timed out after {timeout:.0f} s"}
        for line in reversed(r.stdout.splitlines()):
            if line.startswith("{"):
                res: dict[str, Any] = json.loads(line)
                return res
        return {"error": (r.stderr or r.stdout)[-800:]}

    def log_path(self, name: str) -> str:
        return str(self.work / "logs" / f"{name}-{time.monotonic_ns()}.log")

    # ------------------------------------------------------------------ counters
    def reset_counters(self) -> None:
        self.lab.reset_counters()

    def path_counters(self) -> dict[str, int]:
        """Bytes since the last reset: UDP and other IP bridged router<->router on the wan
        (the direct path), and to/from the relay host (its WebSocket port; any UDP, which
        includes the HyperDHT nodes)."""
        c = self.lab.counters()

        def b(key: str) -> int:
            return c.get(key, (0, 0))[1]

        return {"direct_udp": b("wan/qlab_wan/direct_udp4") + b("wan/qlab_wan/direct_udp6"),
                "direct_other": b("wan/qlab_wan/direct_other"),
                "relay_tcp": b("wan/qlab_relay/relay_tcp_in") + b("wan/qlab_relay/relay_tcp_out"),
                "relay_udp": b("wan/qlab_relay/relay_udp_in") + b("wan/qlab_relay/relay_udp_out")}

    def outside(self) -> dict[str, Any]:
        """What the guard dropped: packets to any address outside the lab (all namespaces)
        and those addresses, by namespace role (``{"packets": 0, "addresses": {}}``)."""
        packets, addresses = 0, {}
        for key, (n, _) in self.lab.counters().items():
            if key.endswith("qtbench_guard/outside"):
                packets += n
        for ns in self.lab.namespaces:
            seen = []
            for name in ("seen4", "seen6"):
                r = self.lab.run(ns, ["nft", "-j", "list", "set", "inet", "qtbench_guard",
                                      name])
                with contextlib.suppress(ValueError):
                    for item in json.loads(r.stdout or "{}").get("nftables", []):
                        seen += [e if isinstance(e, str) else str(e.get("elem", {}).get("val"))
                                 for e in item.get("set", {}).get("elem", [])]
            if seen:
                addresses[ns.rsplit("-", 1)[1]] = seen
        return {"packets": packets, "addresses": addresses}


def classify(counters: dict[str, int], size: int) -> str:
    """``direct`` (UDP router<->router), ``direct-tcp``, ``relayed`` or ``mixed``."""
    relayed = counters["relay_tcp"] + counters["relay_udp"]
    if counters["direct_udp"] >= size and relayed < size // 10:
        return "direct"
    if counters["direct_other"] >= size and relayed < size // 10:
        return "direct-tcp"
    if relayed >= size and counters["direct_udp"] < size // 10:
        return "relayed"
    return "mixed"
