"""Self-checks of the network lab with plain Python sockets (no quictun needed).

They pin the NAT behaviour the tunnel relies on (NOTES.md section 1): which pairs a naive
simultaneous UDP open gets through, that unsolicited packets are dropped, that the counters
see the direct and relayed paths, and that the runtime knobs work.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import time
from collections.abc import Callable

import pytest

from .netlab import Lab, LabProcess, SiteSpec

pytestmark = pytest.mark.lab

LabFactory = Callable[..., Lab]

# A small UDP agent driven by lines on stdin:
#   STUN                      -> "PUBLIC ip port" (what the relay's echo saw)
#   PUNCH ip port seconds     -> send a 200-byte probe every 50 ms for `seconds`, counting
#                                what arrives -> "PUNCHED received=N sources=ip:port,..."
#   SEND ip port count size   -> send `count` packets quickly -> "SENT count"
#   RECV seconds              -> "RECVING" then, after `seconds`, "RECEIVED n sources=..."
#   QUIT
AGENT = r"""
import select, socket, sys, time
fam = socket.AF_INET6 if sys.argv[1] == "6" else socket.AF_INET
bind_ip, port, stun_ip, stun_port = sys.argv[2], int(sys.argv[3]), sys.argv[4], int(sys.argv[5])
s = socket.socket(fam, socket.SOCK_DGRAM)
s.bind((bind_ip, port))
stun = (stun_ip, stun_port)

def is_stun_reply(data, addr):
    return data.startswith(b"SEEN ") and addr[0] == stun_ip and addr[1] == stun_port

def fmt(sources):
    return ",".join(f"{a[0]}:{a[1]}" for a in sorted(sources)) or "-"

def do_stun():
    for _ in range(20):
        s.sendto(b"STUN?", stun)
        end = time.monotonic() + 0.1
        while (left := end - time.monotonic()) > 0:
            if select.select([s], [], [], left)[0]:
                data, addr = s.recvfrom(4096)
                if is_stun_reply(data, addr):
                    return data.decode().split()[1:]
    return ["none", "0"]

def receive_until(end, counts):
    while (left := end - time.monotonic()) > 0:
        if not select.select([s], [], [], left)[0]:
            return
        data, addr = s.recvfrom(4096)
        if not is_stun_reply(data, addr):
            counts[addr[:2]] = counts.get(addr[:2], 0) + 1

for line in sys.stdin:
    cmd = line.split()
    if not cmd:
        continue
    if cmd[0] == "STUN":
        print("PUBLIC", *do_stun(), flush=True)
    elif cmd[0] == "PUNCH":
        peer, seconds = (cmd[1], int(cmd[2])), float(cmd[3])
        counts = {}
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            s.sendto(b"P" * 200, peer)
            receive_until(min(end, time.monotonic() + 0.05), counts)
        receive_until(time.monotonic() + 0.2, counts)
        print("PUNCHED", f"received={sum(counts.values())}", f"sources={fmt(counts)}",
              flush=True)
    elif cmd[0] == "SEND":
        peer, count, size = (cmd[1], int(cmd[2])), int(cmd[3]), int(cmd[4])
        for i in range(count):
            s.sendto(b"D" * size, peer)
            if i % 20 == 19:
                time.sleep(0.001)
        print("SENT", count, flush=True)
    elif cmd[0] == "RECV":
        counts = {}
        print("RECVING", flush=True)
        receive_until(time.monotonic() + float(cmd[1]), counts)
        print("RECEIVED", sum(counts.values()), f"sources={fmt(counts)}", flush=True)
    elif cmd[0] == "QUIT":
        break
"""

AGENT_PORT = 40000


def start_agent(lab: Lab, site: str, family: int = 4, port: int = AGENT_PORT,
                stun_port: int | None = None) -> LabProcess:
    bind = "::" if family == 6 else "0.0.0.0"
    stun_ip = lab.relay_ip6 if family == 6 else lab.relay_ip4
    lab.start_stun()
    return lab.spawn_python(
        lab.host_ns(site), AGENT, str(family), bind, str(port), stun_ip,
        str(stun_port or lab.stun_ports[0]), stdin=subprocess.PIPE, name=f"agent-{site}",
    )


def stun(agent: LabProcess) -> tuple[str, int]:
    n = agent.count_matches(r"^PUBLIC ")
    agent.send_line("STUN")
    m = agent.wait_for_line(r"^PUBLIC (\S+) (\d+)", timeout=5, skip=n)
    return m.group(1), int(m.group(2))


def parse_sources(text: str) -> set[str]:
    return set() if text == "-" else set(text.split(","))


def punch(lab: Lab, family: int, *, stagger: float = 0.0, seconds: float = 2.0,
          ) -> tuple[tuple[int, set[str]], tuple[int, set[str]], dict[str, tuple[str, int]]]:
    """Naive simultaneous open between the hosts; returns each side's (received, sources)."""
    agents = {site: start_agent(lab, site, family) for site in ("a", "b")}
    public = {site: stun(agent) for site, agent in agents.items()}
    for site, (ip, _) in public.items():
        if ip == "none":  # STUN blocked (udp-blocked): guess a port-preserving mapping
            guess = lab.host_ip6(site) if family == 6 else lab.public_ip4(site)
            public[site] = (guess, AGENT_PORT)
    a_pub, b_pub = public["a"], public["b"]
    agents["a"].send_line(f"PUNCH {b_pub[0]} {b_pub[1]} {seconds}")
    if stagger:
        time.sleep(stagger)
    agents["b"].send_line(f"PUNCH {a_pub[0]} {a_pub[1]} {seconds - stagger}")
    results = []
    for site in ("a", "b"):
        m = agents[site].wait_for_line(r"^PUNCHED received=(\d+) sources=(\S+)",
                                       timeout=seconds + 5)
        results.append((int(m.group(1)), parse_sources(m.group(2))))
        agents[site].send_line("QUIT")
    return results[0], results[1], public


# (site a, site b, family, expected success) -- the measured table of NOTES.md section 1,
# plus IPv6 rows: IPv6 is routed through the same stateful filter, never NATed.
PUNCH_TABLE = [
    ("firewall", "firewall", 4, True),
    ("firewall", "firewall", 6, True),
    ("cone", "cone", 4, True),
    ("cone", "firewall", 4, True),
    ("firewall", "cone", 4, True),
    ("symmetric", "symmetric", 4, False),
    ("symmetric", "cone", 4, False),
    ("symmetric", "firewall", 4, False),
    ("udp-blocked", "cone", 4, False),
    ("cone", "udp-blocked", 4, False),
    ("symmetric", "symmetric", 6, True),
    ("udp-blocked", "firewall", 6, False),
]


@pytest.mark.parametrize(("kind_a", "kind_b", "family", "expect"), PUNCH_TABLE,
                         ids=[f"{a}-{b}-v{f}" for a, b, f, _ in PUNCH_TABLE])
def test_naive_simultaneous_open(lab_factory: LabFactory, kind_a: str, kind_b: str,
                                 family: int, expect: bool) -> None:
    lab = lab_factory(kind_a, kind_b)
    (recv_a, src_a), (recv_b, src_b), public = punch(lab, family)
    ok = recv_a > 0 and recv_b > 0
    assert ok == expect, (
        f"{kind_a}<->{kind_b} v{family}: a got {recv_a} from {src_a}, b got {recv_b} from "
        f"{src_b}; public addresses {public}"
    )
    # (c) the counters see the direct path and nothing relayed
    assert lab.relay_tcp_bytes() == 0
    if ok:
        # endpoint-independent mapping: the packets come from the STUN-learned address
        assert src_a == {f"{public['b'][0]}:{public['b'][1]}"}
        assert src_b == {f"{public['a'][0]}:{public['a'][1]}"}
        assert lab.direct_udp_bytes() >= (recv_a + recv_b) * 200
        assert lab.direct_udp_packets() >= recv_a + recv_b


@pytest.mark.parametrize("drop_wan_input", [True, False])
def test_stale_conntrack_trap(lab_factory: LabFactory, drop_wan_input: bool) -> None:
    """cone<->cone with A starting 0.4 s early: works with home-router input dropping, and
    fails when the routers accept unsolicited input (NOTES.md: stale conntrack entry)."""
    spec = SiteSpec("cone", drop_wan_input=drop_wan_input)
    lab = lab_factory(spec, spec)
    (recv_a, src_a), (recv_b, src_b), public = punch(lab, 4, stagger=0.4)
    ok = recv_a > 0 and recv_b > 0
    assert ok == drop_wan_input, f"a got {recv_a} from {src_a}, b got {recv_b} from {src_b}"
    if not drop_wan_input and shutil.which("conntrack"):
        # A's early probe left a stale entry in B's router, so B's flow toward A got
        # masqueraded to another port than the STUN-learned one
        ct = lab.conntrack_list("b")
        m = re.search(
            rf"src={lab.host_b_ip4} dst={lab.router_a_wan_ip4} sport={AGENT_PORT} "
            rf"dport={public['a'][1]} .*?src={lab.router_a_wan_ip4} dst={lab.router_b_wan_ip4} "
            rf"sport={public['a'][1]} dport=(\d+)", ct)
        assert m, ct
        assert int(m.group(1)) != public["b"][1], ct


@pytest.mark.parametrize("kind", ["firewall", "cone", "symmetric"])
@pytest.mark.parametrize("drop_wan_input", [True, False])
def test_unsolicited_udp_dropped(lab_factory: LabFactory, kind: str,
                                 drop_wan_input: bool) -> None:
    spec = SiteSpec(kind, drop_wan_input=drop_wan_input)
    lab = lab_factory(spec, "cone")
    a = start_agent(lab, "a")
    b = start_agent(lab, "b")
    a_pub = stun(a)
    a.send_line("RECV 0.7")
    a.wait_for_line("^RECVING", timeout=5)
    b.send_line(f"SEND {a_pub[0]} {a_pub[1]} 20 200")
    b.wait_for_line(r"^SENT 20", timeout=5)
    m = a.wait_for_line(r"^RECEIVED (\d+)", timeout=5)
    assert int(m.group(1)) == 0, f"unsolicited packets reached host A behind {kind}"
    assert lab.direct_udp_packets() >= 20  # they did cross the wan


TCP_ECHO_SERVER = r"""
import socket, sys, threading
def handle(c):
    with c:
        while data := c.recv(65536):
            c.sendall(data)
def serve(ip, port):
    fam = socket.AF_INET6 if ":" in ip else socket.AF_INET
    srv = socket.socket(fam, socket.SOCK_STREAM)
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind((ip, port)); srv.listen(16)
    while True:
        c, _ = srv.accept()
        threading.Thread(target=handle, args=(c,), daemon=True).start()
port = int(sys.argv[1])
for ip in sys.argv[2:]:
    threading.Thread(target=serve, args=(ip, port), daemon=True).start()
print("tcp echo listening", flush=True)
threading.Event().wait()
"""

TCP_CLIENT = r"""
import socket, sys
ip, port, size = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
payload = bytes(range(256)) * (size // 256)
with socket.create_connection((ip, port), timeout=5) as c:
    c.sendall(payload)
    c.shutdown(socket.SHUT_WR)
    got = bytearray()
    while data := c.recv(65536):
        got += data
assert bytes(got) == payload, len(got)
print("echo ok", len(got))
"""


def start_tcp_echo(lab: Lab) -> LabProcess:
    proc = lab.spawn_python(lab.relay_ns, TCP_ECHO_SERVER, str(lab.relay_port), lab.relay_ip4,
                            lab.relay_ip6, name="tcp-echo")
    proc.wait_for_line("tcp echo listening", timeout=5)
    return proc


@pytest.mark.parametrize(
    ("spec_a", "spec_b"),
    [
        (SiteSpec("firewall"), SiteSpec("cone")),
        (SiteSpec("symmetric"), SiteSpec("udp-blocked")),
        (SiteSpec("cone", drop_wan_input=False), SiteSpec("udp-blocked", drop_wan_input=False)),
    ],
    ids=["firewall-cone", "symmetric-udpblocked", "accept-input"],
)
def test_tcp_to_relay_in_every_preset(lab_factory: LabFactory, spec_a: SiteSpec,
                                      spec_b: SiteSpec) -> None:
    lab = lab_factory(spec_a, spec_b)
    start_tcp_echo(lab)
    size = 64 * 1024
    for site in ("a", "b"):
        for ip in (lab.relay_ip4, lab.relay_ip6):
            r = lab.run_python(lab.host_ns(site), TCP_CLIENT, ip, str(lab.relay_port),
                               str(size), timeout=20)
            assert "echo ok" in r.stdout, r.stderr
    # 4 connections, each payload in and out of the relay
    assert lab.relay_tcp_bytes() >= 4 * 2 * size
    assert lab.direct_udp_bytes() == 0


def test_same_lan(lab_factory: LabFactory) -> None:
    lab = lab_factory("cone", same_lan=True)
    assert lab.router_a_ns == lab.router_b_ns
    start_tcp_echo(lab)
    for family, ip_of in ((4, lab.host_ip4), (6, lab.host_ip6)):
        a = start_agent(lab, "a", family)
        b = start_agent(lab, "b", family)
        # both NATed behind the same public address
        if family == 4:
            assert stun(a)[0] == stun(b)[0] == lab.router_a_wan_ip4
        b.send_line("RECV 1")
        b.wait_for_line("^RECVING", timeout=5)
        a.send_line(f"SEND {ip_of('b')} {AGENT_PORT} 50 200")
        m = b.wait_for_line(r"^RECEIVED (\d+) sources=(\S+)", timeout=5)
        assert int(m.group(1)) == 50
        a.send_line("RECV 1")
        a.wait_for_line("^RECVING", timeout=5)
        b.send_line(f"SEND {ip_of('a')} {AGENT_PORT} 50 200")
        m = a.wait_for_line(r"^RECEIVED (\d+) sources=(\S+)", timeout=5)
        assert int(m.group(1)) == 50
        assert ip_of("b") in m.group(2)
        a.send_line("QUIT")
        b.send_line("QUIT")
        a.wait(5)
        b.wait(5)
    for site in ("a", "b"):
        r = lab.run_python(lab.host_ns(site), TCP_CLIENT, lab.relay_ip4, str(lab.relay_port),
                           "4096")
        assert "echo ok" in r.stdout
    assert lab.lan_udp_bytes() >= 4 * 50 * 200
    assert lab.direct_udp_bytes() == 0
    assert lab.relay_tcp_bytes() > 0


@pytest.mark.parametrize("where", [None, "a"], ids=["wan-bridge", "router-a"])
def test_loss_knob(lab_factory: LabFactory, where: str | None) -> None:
    lab = lab_factory("firewall", "firewall")
    a = start_agent(lab, "a")
    b = start_agent(lab, "b")
    # B opens its firewall toward A (A's router drops this one), then listens
    b.send_line(f"SEND {lab.host_a_ip4} {AGENT_PORT} 1 10")
    b.wait_for_line("^SENT 1", timeout=5)
    lab.set_loss(10, site=where)
    b.send_line("RECV 2")
    b.wait_for_line("^RECVING", timeout=5)
    a.send_line(f"SEND {lab.host_b_ip4} {AGENT_PORT} 1000 100")
    a.wait_for_line("^SENT 1000", timeout=10)
    received = int(b.wait_for_line(r"^RECEIVED (\d+)", timeout=10).group(1))
    dropped = lab.loss_dropped_packets()
    assert 0 < received < 1000, received
    assert dropped > 0
    assert 990 <= received + dropped <= 1001, (received, dropped)
    lab.set_loss(0, site=where)
    before = lab.loss_dropped_packets()
    b.send_line("RECV 1")
    b.wait_for_line("^RECVING", skip=1, timeout=5)
    a.send_line(f"SEND {lab.host_b_ip4} {AGENT_PORT} 200 100")
    received = int(b.wait_for_line(r"^RECEIVED (\d+)", skip=1, timeout=10).group(1))
    assert received == 200
    assert lab.loss_dropped_packets() == before


needs_conntrack = pytest.mark.skipif(shutil.which("conntrack") is None,
                                     reason="`conntrack` tool not installed")


@needs_conntrack
def test_masquerade_ports_and_flush_rebind(lab_factory: LabFactory) -> None:
    lab = lab_factory("cone", "cone")
    a = start_agent(lab, "a")
    ip, port = stun(a)
    assert (ip, port) == (lab.router_a_wan_ip4, AGENT_PORT)  # port preserving
    lab.set_masquerade_ports("a", 50000, 59999)
    assert stun(a) == (ip, port)  # existing mapping survives a rule change
    lab.flush_conntrack("a")
    ip2, port2 = stun(a)
    assert ip2 == ip
    assert 50000 <= port2 <= 59999, port2
    # TCP keeps plain masquerade
    start_tcp_echo(lab)
    r = lab.run_python(lab.host_a_ns, TCP_CLIENT, lab.relay_ip4, str(lab.relay_port), "4096")
    assert "echo ok" in r.stdout


@needs_conntrack
def test_masquerade_range_keeps_a_port_already_inside(lab_factory: LabFactory) -> None:
    """Surprise worth knowing: a new range does not move a source port that lies inside it."""
    lab = lab_factory("cone", "cone")
    a = start_agent(lab, "a", port=55555)
    assert stun(a) == (lab.router_a_wan_ip4, 55555)
    lab.set_masquerade_ports("a", 50000, 59999)
    lab.flush_conntrack("a")
    assert stun(a) == (lab.router_a_wan_ip4, 55555)


@needs_conntrack
def test_udp_timeout_knob(lab_factory: LabFactory) -> None:
    lab = lab_factory("cone", "cone")
    lab.set_udp_timeout("a", 2)
    assert lab.get_sysctl(lab.router_a_ns, "net.netfilter.nf_conntrack_udp_timeout") == "2"
    assert lab.get_sysctl(lab.router_a_ns,
                          "net.netfilter.nf_conntrack_udp_timeout_stream") == "2"
    a = start_agent(lab, "a")
    stun(a)
    assert f"dport={lab.stun_ports[0]}" in lab.conntrack_list("a")
    deadline = time.monotonic() + 6
    while f"dport={lab.stun_ports[0]}" in lab.conntrack_list("a"):
        assert time.monotonic() < deadline, "mapping did not expire"
        time.sleep(0.2)
