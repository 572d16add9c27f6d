"""quictun end to end in the network lab: relay in the wan, `serve` in host A, `connect` in B.

Each test checks the data (SHA-256 of 10 MB) and proves the path with the lab's nftables
counters: a direct tunnel moves its bytes as site<->site UDP on the wan, a relayed one as
TCP to the relay. Every cell runs on each QUIC engine (``lab_engine``, both ends alike);
the direct cells run on every pair of engines, mixed ones included.
"""

from __future__ import annotations

import hashlib
import os
import random
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from sshkit import make_sshd_dir

from .conftest import engine_pair_params
from .netlab import Lab, LabProcess, SiteSpec
from .service import SERVICE

REPO = Path(__file__).resolve().parents[2]
MB = 1024 * 1024
SIZE = 10 * MB
SERVICE_PORT = 7000
LISTEN_PORT = 7001
NAME = "labsvc"
SECRET = "lab-secret-4d1b6c0e8f2a"

LabFactory = Callable[..., Lab]
# New masquerade range for the rebinding cases: outside the hosts' ephemeral range
# (32768-60999), since a source port already inside the range is kept as it is.
REBIND_PORTS = (20000, 29999)


pytestmark = [pytest.mark.lab]
needs_conntrack = pytest.mark.skipif(shutil.which("conntrack") is None,
                                     reason="`conntrack` tool not installed")

# The forwarded service in host A is tests/lab/service.py's SERVICE (UP/DOWN/PACE/ECHO/BYE).

# Client side, in host B, through `quictun connect --listen`: prints "UP ok"/"DOWN ok".
CLIENT = r"""
import hashlib, random, socket, sys
port, up, down = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
def conn():
    c = socket.create_connection(("127.0.0.1", port), timeout=120)
    return c
if up:
    data = random.Random(up + 1).randbytes(up)
    c = conn()
    c.sendall(b"UP %d\n" % up + data)
    reply = b""
    while not reply.endswith(b"\n"):
        chunk = c.recv(4096)
        if not chunk:
            break
        reply += chunk
    c.close()
    want = f"{hashlib.sha256(data).hexdigest()} {up}"
    print("UP ok" if reply.decode().strip() == want else f"UP BAD {reply!r}", flush=True)
if down:
    c = conn()
    c.sendall(b"DOWN %d\n" % down)
    c.shutdown(socket.SHUT_WR)
    h, n = hashlib.sha256(), 0
    while chunk := c.recv(262144):
        h.update(chunk); n += len(chunk)
    c.close()
    ok = n == down and h.digest() == hashlib.sha256(random.Random(down).randbytes(down)).digest()
    print("DOWN ok" if ok else f"DOWN BAD got {n} bytes", flush=True)
"""

PATH_RE = r"path=(direct|relay)"


class Tunnel:
    """Relay + service + `quictun serve` in host A + `quictun connect` in host B.

    ``engines``: the QUIC engine (QUICTUN_ENGINE) of serve and of connect; None leaves
    the default (``auto``)."""

    def __init__(self, lab: Lab, workdir: Path, *, family: int = 4,
                 engines: tuple[str, str] | None = None) -> None:
        self.lab = lab
        self.workdir = workdir
        self.engines = engines
        self.signal = lab.signal_url6 if family == 6 else lab.signal_url
        bindir = workdir / "bin"
        bindir.mkdir(parents=True, exist_ok=True)
        self.quictun = bindir / "quictun"
        self.quictun.write_text(
            f"#!{sys.executable}\nimport sys\nsys.path.insert(0, {str(REPO)!r})\n"
            "from quictun.cli.main import main\nsys.argv[0] = 'quictun'\nsys.exit(main())\n"
        )
        self.quictun.chmod(0o755)
        self.serve_proc: LabProcess | None = None
        self.connect_proc: LabProcess | None = None

    def env(self, site: str) -> dict[str, str]:
        home = self.workdir / f"home-{site}"
        home.mkdir(exist_ok=True)
        # the lab's addresses (198.18.0.0/15) are not global: QUICTUN_LAB relaxes the
        # checks that protect real networks (birthday targets), see quictun/config.py
        env = {"QUICTUN_SECRET": SECRET, "QUICTUN_HOME": str(home), "PYTHONPATH": str(REPO),
               "QUICTUN_LAB": "1"}
        if self.engines is not None:
            env["QUICTUN_ENGINE"] = self.engines[0 if site == "a" else 1]
        return env

    def start_relay(self) -> LabProcess:
        relay = self.lab.spawn(
            self.lab.relay_ns,
            [sys.executable, "-m", "signal_server", "--port", str(self.lab.relay_port),
             "--stun-port2", str(self.lab.relay_port + 1)],
            env={"PYTHONPATH": str(REPO)}, cwd=REPO, name="relay",
        )
        relay.wait_for_line(r"listening", timeout=20)
        return relay

    def start_service(self) -> LabProcess:
        svc = self.lab.spawn_python(self.lab.host_a_ns, SERVICE, str(SERVICE_PORT),
                                    name="service")
        svc.wait_for_line("service listening", timeout=10)
        return svc

    def serve(self, *extra: str, forward: str = f"127.0.0.1:{SERVICE_PORT}") -> LabProcess:
        self.serve_proc = self.lab.spawn(
            self.lab.host_a_ns,
            [str(self.quictun), "serve", NAME, "--forward", forward, "--signal", self.signal,
             *extra],
            env=self.env("a"), name="serve",
        )
        self.serve_proc.wait_for_line(r"serving", timeout=20)
        return self.serve_proc

    def connect(self, *extra: str) -> LabProcess:
        self.connect_proc = self.lab.spawn(
            self.lab.host_b_ns,
            [str(self.quictun), "connect", NAME, "--listen", f"127.0.0.1:{LISTEN_PORT}",
             "--signal", self.signal, *extra],
            env=self.env("b"), name="connect",
        )
        self.connect_proc.wait_for_line(r"listening on", timeout=30)
        return self.connect_proc

    def start(self, *extra: str) -> None:
        self.start_relay()
        self.start_service()
        self.serve(*extra)
        self.connect(*extra)

    def wait_path(self, kind: str, timeout: float = 20.0) -> re.Match[str]:
        """Wait until both ends have reported ``path=kind`` once; return connect's line.

        Each end selects its path on its own evidence, so the serving end may still send
        over the relay for a moment after the connecting end went direct; a byte count
        taken right after connect's line alone would catch that moment."""
        assert self.connect_proc is not None
        m = self.connect_proc.wait_for_line(rf"path={kind}\b", timeout=timeout)
        if self.serve_proc is not None:
            self.serve_proc.wait_for_line(rf"path={kind}\b", timeout=timeout)
        return m

    def wait_serve_direct(self, timeout: float = 30.0) -> None:
        """Wait until the serving end's latest path line says direct (after a change that
        connect has already reported, e.g. a rebinding)."""
        assert self.serve_proc is not None
        deadline = time.monotonic() + timeout
        while self.last_path(self.serve_proc) != "direct":
            assert time.monotonic() < deadline, self.serve_proc.tail()
            time.sleep(0.05)

    def last_path(self, proc: LabProcess | None = None) -> str:
        proc = proc or self.connect_proc
        assert proc is not None
        kinds = re.findall(PATH_RE, proc.output())
        return kinds[-1] if kinds else "none"

    def transfer(self, up: int = 0, down: int = 0, timeout: float = 180.0) -> None:
        r = self.lab.run_python(self.lab.host_b_ns, CLIENT, str(LISTEN_PORT), str(up),
                                str(down), timeout=timeout, check=False)
        out = r.stdout + r.stderr
        if up:
            assert "UP ok" in out, out
        if down:
            assert "DOWN ok" in out, out

    def assert_clean_logs(self) -> None:
        """Both ends run the engines asked for, and neither logged a traceback, a refused
        client, a closed tunnel or a credit overrun."""
        for i, proc in enumerate((self.serve_proc, self.connect_proc)):
            assert proc is not None and proc.alive, proc.tail() if proc else "not started"
            out = proc.output()
            for bad in ("Traceback", "refused a client", "reconnecting", "credit exceeded"):
                assert bad not in out, out
            if self.engines is not None:
                assert loaded_engine(proc.pid) == self.engines[i], (self.engines, i)

    def spawn_transfer(self, up: int = 0, down: int = 0) -> LabProcess:
        return self.lab.spawn_python(self.lab.host_b_ns, CLIENT, str(LISTEN_PORT), str(up),
                                     str(down), name="transfer")


def loaded_engine(pid: int) -> str:
    """The QUIC engine a running quictun process uses: qh3 if its native core is mapped
    (quictun imports qh3 only for that engine), else aioquic."""
    maps = Path(f"/proc/{pid}/maps").read_text()
    return "qh3" if re.search(r"/qh3/_hazmat[^/]*\.so", maps) else "aioquic"


@pytest.fixture
def tunnel_factory(tmp_path: Path, lab_engine: str) -> Callable[..., Tunnel]:
    """``make(lab, family=4, engines=None)``: a Tunnel whose two ends run ``lab_engine``
    (each cell runs once per engine), unless ``engines`` names the pair."""
    def make(lab: Lab, *, family: int = 4, engines: tuple[str, str] | None = None) -> Tunnel:
        return Tunnel(lab, tmp_path, family=family, engines=engines or (lab_engine, lab_engine))

    return make


ENGINE_PAIRS = engine_pair_params()


TunnelFactory = Callable[..., Tunnel]


def assert_direct(lab: Lab, size: int, *, family: int | None = None) -> None:
    direct = lab.direct_udp_bytes(family)
    relayed = lab.relay_tcp_bytes()
    assert direct >= size, f"direct UDP {direct} < {size} (relay TCP {relayed})"
    assert relayed < size // 10, f"relay TCP {relayed} for a direct tunnel"


def assert_relayed(lab: Lab, size: int) -> None:
    direct = lab.direct_udp_bytes()
    relayed = lab.relay_tcp_bytes()
    assert relayed >= size, f"relay TCP {relayed} < {size} (direct UDP {direct})"
    assert direct < size // 10, f"direct UDP {direct} for a relayed tunnel"


# ---------------------------------------------------------------------------- direct paths
# The direct cells run on every pair of QUIC engines (serve, connect), mixed ones too; each
# pushes first (issue 13: with qh3 the first push through connect --listen was reset),
# then pulls.
@pytest.mark.parametrize("pair", ENGINE_PAIRS)
def test_firewall_pair_ipv4_direct(lab_factory: LabFactory, tmp_path: Path,
                                   pair: tuple[str, str]) -> None:
    spec = SiteSpec("firewall", ipv6=False)
    lab = lab_factory(spec, spec)
    t = Tunnel(lab, tmp_path, engines=pair)
    t.start()
    m = t.wait_path("direct")
    assert lab.host_a_ip4 in m.string
    t.transfer(up=SIZE)
    assert_direct(lab, SIZE, family=4)
    t.transfer(down=SIZE)
    assert_direct(lab, 2 * SIZE, family=4)
    t.assert_clean_logs()


@pytest.mark.parametrize("pair", ENGINE_PAIRS)
def test_firewall_pair_ipv6_direct(lab_factory: LabFactory, tmp_path: Path,
                                   pair: tuple[str, str]) -> None:
    spec = SiteSpec("firewall", ipv4=False)
    lab = lab_factory(spec, spec)
    t = Tunnel(lab, tmp_path, family=6, engines=pair)
    t.start()
    m = t.wait_path("direct")
    assert lab.host_a_ip6 in m.string
    t.transfer(up=SIZE)
    assert_direct(lab, SIZE, family=6)
    t.transfer(down=SIZE)
    assert_direct(lab, 2 * SIZE, family=6)
    t.assert_clean_logs()


@pytest.mark.parametrize("pair", ENGINE_PAIRS)
def test_cone_pair_direct(lab_factory: LabFactory, tmp_path: Path,
                          pair: tuple[str, str]) -> None:
    spec = SiteSpec("cone", ipv6=False)  # IPv4 only: the NAT must be traversed
    lab = lab_factory(spec, spec)
    t = Tunnel(lab, tmp_path, engines=pair)
    t.start()
    m = t.wait_path("direct")
    assert lab.router_a_wan_ip4 in m.string  # B reaches A through A's public address
    t.transfer(up=SIZE)
    assert_direct(lab, SIZE, family=4)
    t.transfer(down=SIZE)
    assert_direct(lab, 2 * SIZE, family=4)
    t.assert_clean_logs()


UPLINK_MTU_1400 = """
table inet qtest_mtu {
  chain forward_chain {
    type filter hook forward priority -5; policy accept;
    tcp flags syn tcp option maxseg size set rt mtu
    icmp type destination-unreachable icmp code frag-needed drop
    icmpv6 type packet-too-big drop
  }
  chain output_chain {
    type filter hook output priority -5; policy accept;
    icmp type destination-unreachable icmp code frag-needed drop
    icmpv6 type packet-too-big drop
  }
}
"""
BLOCK_DIRECT_UDP = """
table bridge qtest_block {
  chain forward_chain {
    type filter hook forward priority -20; policy accept;
    meta l4proto udp drop
  }
}
"""


def test_datagram_size_learned_on_the_relay_is_not_used_direct(
        lab_factory: LabFactory, tunnel_factory: TunnelFactory) -> None:
    """Site A's uplink carries 1400 bytes and drops ICMP "too big"; the tunnel starts on
    the relay (direct UDP blocked), then goes direct. QUIC sees one virtual peer whatever
    the path, so a datagram size qh3's own path-MTU probing confirmed over the relay (up
    to 1472 bytes) black-holed on the direct path."""
    spec = SiteSpec("firewall", ipv6=False)
    lab = lab_factory(spec, spec)
    lab.run(lab.router_a_ns, ["ip", "link", "set", "wan0", "mtu", "1400"], check=True)
    lab.run(lab.router_a_ns, ["nft", "-f", "-"], input=UPLINK_MTU_1400, check=True)
    lab.run(lab.wan_ns, ["nft", "-f", "-"], input=BLOCK_DIRECT_UDP, check=True)
    t = tunnel_factory(lab)
    t.start()  # connect listens: QUIC is up, over the relay
    assert t.last_path() == "relay"
    t.transfer(up=MB)  # over the relay, while a probing engine would raise its size
    lab.run(lab.wan_ns, ["nft", "delete", "table", "bridge", "qtest_block"], check=True)
    t.wait_path("direct", timeout=30)
    before = lab.direct_udp_bytes(4)
    t.transfer(up=SIZE, timeout=90)
    t.transfer(down=SIZE, timeout=90)
    assert lab.direct_udp_bytes(4) - before >= 2 * SIZE
    t.assert_clean_logs()


def test_same_lan_uses_lan_path(lab_factory: LabFactory,
                                tunnel_factory: TunnelFactory) -> None:
    lab = lab_factory("cone", same_lan=True)
    t = tunnel_factory(lab)
    t.start()
    m = t.wait_path("direct")
    lan_ips = {lab.host_a_ip4, lab.host_a_ip6}
    assert any(ip in m.string for ip in lan_ips), m.string
    t.transfer(down=SIZE)
    assert t.last_path() == "direct"
    assert lab.lan_udp_bytes() >= SIZE
    assert lab.direct_udp_bytes() == 0
    assert lab.relay_tcp_bytes() < SIZE // 10




@pytest.mark.skipif(not (os.path.exists("/usr/sbin/sshd") and shutil.which("ssh")
                         and shutil.which("ssh-keygen")),
                    reason="openssh-server/openssh-client not installed")
def test_openssh_through_stdio(lab_factory: LabFactory, tunnel_factory: TunnelFactory,
                               tmp_path: Path) -> None:
    spec = SiteSpec("cone", ipv6=False)
    lab = lab_factory(spec, spec)
    t = tunnel_factory(lab)
    sshdir = tmp_path / "ssh"
    port = 2222
    cfg = make_sshd_dir(sshdir, port)
    sshd = lab.spawn(lab.host_a_ns, ["/usr/sbin/sshd", "-D", "-e", "-f", str(cfg)],
                     name="sshd")
    sshd.wait_for_line(r"Server listening", timeout=10)
    t.start_relay()
    t.serve(forward=f"127.0.0.1:{port}")
    proxy = f"{t.quictun} connect %h --stdio --signal {t.signal}"
    ssh = ["ssh", "-F", "/dev/null", "-o", f"ProxyCommand={proxy}",
           "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
           "-o", "BatchMode=yes", "-o", "LogLevel=ERROR", "-i", str(sshdir / "client_key"),
           f"root@{NAME}"]
    r = lab.run(lab.host_b_ns, [*ssh, "echo", "hello"], env=t.env("b"), timeout=60)
    assert r.returncode == 0 and r.stdout.strip() == "hello", r.stderr
    payload = random.Random(7).randbytes(SIZE)
    before = lab.direct_udp_bytes()
    proc = subprocess.run(["ip", "netns", "exec", lab.host_b_ns, *ssh, "sha256sum"],
                          input=payload, capture_output=True, timeout=180,
                          env={**os.environ, **t.env("b")})
    assert proc.returncode == 0, proc.stderr.decode(errors="replace")
    assert proc.stdout.decode().split()[0] == hashlib.sha256(payload).hexdigest()
    assert lab.direct_udp_bytes() - before >= SIZE


BYE_CLIENT = r"""
import socket, sys
for i in range(3):
    c = socket.create_connection(("127.0.0.1", int(sys.argv[1])), timeout=20)
    c.sendall(b"BYE\n")
    got = b""
    while not got.endswith(b"\n"):
        chunk = c.recv(100)
        if not chunk:
            break
        got += chunk
    assert got == b"bye\n", got
    c.close()  # at once, maybe before the tunnel delivers the service's FIN
    print("bye ok", i, flush=True)
"""


def test_service_hangs_up_first(lab_factory: LabFactory, tunnel_factory: TunnelFactory) -> None:
    spec = SiteSpec("cone", ipv6=False)
    lab = lab_factory(spec, spec)
    t = tunnel_factory(lab)
    t.start()
    t.wait_path("direct")
    r = lab.run_python(lab.host_b_ns, BYE_CLIENT, str(LISTEN_PORT), timeout=90, check=False)
    assert r.stdout.count("bye ok") == 3, r.stdout + r.stderr
    assert t.connect_proc is not None and t.connect_proc.alive
    assert "Traceback" not in t.connect_proc.output() + (t.serve_proc or t.connect_proc).output()
    t.transfer(down=MB)


GREETER = r"""
import socket, sys, threading
def handle(c, close_at_once):
    c.sendall(b"hello from A\n")
    if not close_at_once:
        f = c.makefile("rb")
        while line := f.readline():
            c.sendall(line)
    c.close()
srv = socket.socket()
srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind(("127.0.0.1", int(sys.argv[1]))); srv.listen(16)
print("greeter listening", flush=True)
n = 0
while True:
    c, _ = srv.accept()
    n += 1
    print("accepted", n, flush=True)
    # connection 1 is serve's start-up check of its target; then odd clients (n = 2, 4)
    # get the echo, even ones (n = 3, 5) a banner then close
    threading.Thread(target=handle, args=(c, n % 2 == 1), daemon=True).start()
"""

GREETED_CLIENT = r"""
import socket, sys
for i in range(4):  # odd connections: greeting then echo; even: greeting then close
    c = socket.create_connection(("127.0.0.1", int(sys.argv[1])), timeout=10)
    f = c.makefile("rb")
    assert f.readline() == b"hello from A\n"
    if i % 2 == 0:
        c.sendall(b"ping\n")
        assert f.readline() == b"ping\n"
    else:
        assert f.read() == b""
    c.close()
    print("greeted ok", i, flush=True)
"""


def test_service_speaks_first(lab_factory: LabFactory, tunnel_factory: TunnelFactory) -> None:
    """Server-speaks-first protocols (SMTP, MySQL, a banner then close): the client sends
    nothing before it has read the greeting."""
    spec = SiteSpec("cone", ipv6=False)
    lab = lab_factory(spec, spec)
    t = tunnel_factory(lab)
    t.start_relay()
    greeter = lab.spawn_python(lab.host_a_ns, GREETER, "7002", name="greeter")
    greeter.wait_for_line("greeter listening", timeout=10)
    t.serve(forward="127.0.0.1:7002")
    greeter.wait_for_line("accepted 1", timeout=30)  # serve checked its target
    t.connect()
    t.wait_path("direct")
    r = lab.run_python(lab.host_b_ns, GREETED_CLIENT, str(LISTEN_PORT), timeout=60,
                       check=False)
    assert r.stdout.count("greeted ok") == 4, r.stdout + r.stderr
    assert t.connect_proc is not None and t.connect_proc.alive


# ---------------------------------------------------------------------------- fallback
def test_symmetric_pair_relayed(lab_factory: LabFactory, tunnel_factory: TunnelFactory) -> None:
    spec = SiteSpec("symmetric", ipv6=False)
    lab = lab_factory(spec, spec)
    t = tunnel_factory(lab)
    t.start()
    t.wait_path("relay", timeout=30)
    t.transfer(down=SIZE)
    assert_relayed(lab, SIZE)


def test_udp_blocked_side_relayed(lab_factory: LabFactory,
                                  tunnel_factory: TunnelFactory) -> None:
    lab = lab_factory("udp-blocked", "cone")
    t = tunnel_factory(lab)
    t.start()
    t.wait_path("relay", timeout=30)
    t.transfer(down=SIZE)
    assert_relayed(lab, SIZE)


def test_relay_only_switch(lab_factory: LabFactory, tunnel_factory: TunnelFactory) -> None:
    spec = SiteSpec("firewall", ipv6=False)
    lab = lab_factory(spec, spec)
    t = tunnel_factory(lab)
    t.start("--relay-only")
    t.wait_path("relay", timeout=30)
    t.transfer(down=SIZE)
    assert_relayed(lab, SIZE)


ECHO_CLIENT = r"""
import socket, sys, time
c = socket.create_connection(("127.0.0.1", int(sys.argv[1])), timeout=60)
f = c.makefile("rb")
c.sendall(b"ECHO\nping1\n")
assert f.readline() == b"ping1\n"
print("echo1 ok", flush=True)
time.sleep(float(sys.argv[2]))
c.sendall(b"ping2\n")
assert f.readline() == b"ping2\n"
print("echo2 ok", flush=True)
"""


def test_idle_session_survives_short_udp_timeout(lab_factory: LabFactory,
                                                 tunnel_factory: TunnelFactory) -> None:
    spec = SiteSpec("cone", ipv6=False)
    lab = lab_factory(spec, spec)
    for site in ("a", "b"):
        lab.set_udp_timeout(site, 5)
    t = tunnel_factory(lab)
    t.start()
    t.wait_path("direct")
    echo = lab.spawn_python(lab.host_b_ns, ECHO_CLIENT, str(LISTEN_PORT), "20",
                            name="echo-client")
    echo.wait_for_line("echo1 ok", timeout=20)
    echo.wait_for_line("echo2 ok", timeout=40)  # 20 s idle, 4 UDP timeouts
    before = lab.direct_udp_bytes()
    t.transfer(down=SIZE)
    assert t.last_path() == "direct"
    assert lab.direct_udp_bytes() - before >= SIZE


@needs_conntrack
def test_nat_rebinding_mid_transfer(lab_factory: LabFactory,
                                    tunnel_factory: TunnelFactory) -> None:
    spec = SiteSpec("cone", ipv6=False)
    lab = lab_factory(spec, spec)
    t = tunnel_factory(lab)
    t.start()
    t.wait_path("direct")
    size = 3 * SIZE
    xfer = t.spawn_transfer(down=size)
    deadline = time.monotonic() + 60
    while lab.direct_udp_bytes() < 2 * MB:
        assert time.monotonic() < deadline and xfer.alive, xfer.tail()
        time.sleep(0.02)
    lab.set_masquerade_ports("a", *REBIND_PORTS)
    lab.flush_conntrack("a")
    xfer.wait_for_line(r"DOWN (ok|BAD)", timeout=240)
    assert "DOWN ok" in xfer.output()
    # the rebinding did happen: the tunnel's socket now has a public port in the new range
    ct = lab.conntrack_list("a")
    assert re.search(rf"udp .* src=\S+ dst={lab.router_a_wan_ip4} sport=\d+ dport=2\d{{4}}",
                     ct), ct


@needs_conntrack
def test_nat_rebinding_recovers_direct_path(lab_factory: LabFactory,
                                            tunnel_factory: TunnelFactory) -> None:
    spec = SiteSpec("cone", ipv6=False)
    lab = lab_factory(spec, spec)
    t = tunnel_factory(lab)
    t.start()
    t.wait_path("direct")
    t.transfer(down=MB)
    assert t.connect_proc is not None
    directs = t.connect_proc.count_matches(r"path=direct")
    lab.set_masquerade_ports("a", *REBIND_PORTS)
    lab.flush_conntrack("a")
    t.transfer(down=MB)  # traffic makes the peers notice the change
    m = t.connect_proc.wait_for_line(r"path=direct", timeout=30, skip=directs)
    assert re.search(rf"{lab.router_a_wan_ip4}:2\d{{4}}", m.string), m.string
    t.wait_serve_direct()
    before = lab.direct_udp_bytes()
    t.transfer(down=SIZE)
    assert lab.direct_udp_bytes() - before >= SIZE


def test_ten_percent_loss_stays_direct(lab_factory: LabFactory,
                                       tunnel_factory: TunnelFactory) -> None:
    spec = SiteSpec("cone", ipv6=False)
    lab = lab_factory(spec, spec)
    t = tunnel_factory(lab)
    t.start()
    t.wait_path("direct")
    lab.set_loss(10)
    lab.reset_counters()  # count this transfer only, not the relay-first start
    size = 4 * MB
    t.transfer(down=size, timeout=240)
    assert lab.loss_dropped_packets() > 0
    assert_direct(lab, size)
    assert t.last_path() == "direct"
