"""A network lab of Linux network namespaces with real nftables NAT and stateful firewalls.

Used by the ``lab``-marked pytest tests (needs root, ``ip`` and ``nft``; ``conntrack`` for the
conntrack knobs). Nothing here touches the root namespace's network: every interface lives in
a namespace the lab creates, only documentation/benchmark addresses are used, and no
namespace has a default route to anything outside the lab.

Topology (``Lab(a, b)``)::

    host A (198.19.1.2, 2001:db8:1::2)          host B (198.19.2.2, 2001:db8:2::2)
        | eth0                                       | eth0
    router A lan0 198.19.1.1 / 2001:db8:1::1    router B lan0 198.19.2.1 / 2001:db8:2::1
    router A wan0 198.18.0.11 / 2001:db8::11    router B wan0 198.18.0.12 / 2001:db8::12
        \\______________ wan namespace: bridge br0 _________________/
                         relay host 198.18.0.1 / 2001:db8::1 (on br0)

The relay (signalling server, STUN-like echo) runs in the wan namespace itself
(``lab.relay_ns``). IPv6 is always routed (no NAT), IPv4 is routed only for ``firewall``
sites. ``Lab(a, same_lan=True)``: both hosts (198.19.1.2 and .3, 2001:db8:1::2 and ::3) on
one LAN bridge behind ONE router (``router_a_ns == router_b_ns``).

Router presets (``SiteSpec.kind``):

- ``firewall``: no NAT; forward policy drop, ``ct state established,related accept``,
  lan->wan new accepted (IPv4 and IPv6).
- ``cone``: ``masquerade`` (port preserving: endpoint-independent mapping,
  address-and-port-dependent filtering) plus the same forward filter.
- ``symmetric``: ``masquerade random`` (endpoint-dependent mapping).
- ``udp-blocked``: like ``cone`` but every UDP packet forwarded lan->wan is dropped (TCP,
  hence the relay's WebSocket, still works).
- ``portmap="allow"`` / ``"deny"`` (default ``"none"``, NAT kinds only): the router also runs
  a real miniupnpd (UPnP IGD, NAT-PMP, PCP) on its LAN, which maps (``allow``) or refuses
  every request with a permission rule (``deny``); see :mod:`tests.lab.miniupnpd`. A STUN
  responder on the wan (relay address, port 3490) lets it past its reserved-address check.
- ``drop_wan_input=True`` (default, home-router style): the router's input chain drops
  unsolicited packets arriving on wan (so a peer's early probe leaves no conntrack entry);
  ``False``: input accepted (reproduces the stale-conntrack trap of NOTES.md section 1).

API (sites are named ``"a"`` and ``"b"``)::

    SiteSpec(kind: str = "cone", drop_wan_input: bool = True, ipv6: bool = True,
             ipv4: bool = True, portmap: str = "none")   # ipv4=False: IPv6-only host
    Lab(a: SiteSpec | str = "cone", b: SiteSpec | str | None = None, *, same_lan: bool = False,
        relay_port: int = 8765, stun_ports: tuple[int, int] = (3478, 3479),
        prefix: str = "qtl", logdir: str | None = None)
        context manager (or .start() / .close()); close() kills every process in the lab's
        namespaces and deletes them, whatever happened.
      attributes: wan_ns, relay_ns (== wan_ns), router_a_ns, router_b_ns, host_a_ns,
        host_b_ns, namespaces, logdir, relay_ip4, relay_ip6, relay_port, stun_ports,
        host_a_ip4, host_a_ip6, host_b_ip4, host_b_ip6, router_a_wan_ip4/6,
        router_b_wan_ip4/6, signal_url ("ws://198.18.0.1:8765/"), signal_url6
      host_ns(site) / router_ns(site) -> str; host_ip4(site) / host_ip6(site) -> str
      public_ip4(site) -> str      # router wan address for NAT sites, host address otherwise
      spawn(ns, argv, *, env=None, stdin=None, name, cwd=None) -> LabProcess
      spawn_python(ns, code, *args, env=None, stdin=None, name) -> LabProcess
      run(ns, argv, *, check=False, timeout=30.0, input=None, env=None)
          -> subprocess.CompletedProcess[str]
      run_python(ns, code, *args, timeout=30.0, input=None, env=None, check=True)
          -> subprocess.CompletedProcess[str]
      start_stun() -> None         # UDP echo "SEEN <ip> <port>" on relay_ip4/6, stun_ports
      miniupnpd_log(site) -> str   # the router's daemon's log (portmap sites)
      miniupnpd_pid(site) -> int | None
      upnp_leases(site) -> list[str]   # its lease file: "UDP:eport:iaddr:iport:ts:desc"
      upnp_rules(site) -> str          # its nft chains (forward accept, DNAT)
      counters() -> dict[str, tuple[int, int]]   # name -> (packets, bytes), all namespaces
      direct_udp_bytes(family=None) / direct_udp_packets(family=None) -> int
                                   # UDP bridged router<->router on the wan; family 4|6|None
      relay_tcp_bytes() -> int     # TCP to + from relay_port on the relay host
      relay_udp_bytes() -> int     # UDP to + from the relay host (any port)
      lan_udp_bytes() -> int       # same_lan only: UDP bridged host<->host on the LAN
      loss_dropped_packets() -> int
      reset_counters() -> None
      set_udp_timeout(site, seconds, stream_seconds=None) -> None
      flush_conntrack(site) -> None; conntrack_list(site) -> str
      set_masquerade_ports(site, lo, hi, *, tcp=False) -> None   # UDP (tcp: and TCP)
      set_loss(percent, site=None) -> None         # None: wan bridge; "a"/"b": router forward
      set_uplink_mtu(site, mtu, *, filter_icmp=True) -> None
                                   # router wan0 + its wan bridge port; ICMP "too big" dropped
      set_lan_mtu(mtu) -> None     # same_lan only: the LAN bridge, its ports, hosts' eth0
      icmp_too_big_dropped() -> int   # ICMP "too big"/"frag needed" dropped by that filter
      describe() -> str            # counters, rulesets, conntrack and process log tails

    LabProcess: name, ns, argv, popen, pid, stdout_path, stderr_path, logdir
      wait_for_line(pattern, timeout=10.0, *, stream="both", skip=0) -> re.Match[str]
      count_matches(pattern, *, stream="both") -> int
      output(stream="both") -> str; send_line(text) -> None; close_stdin() -> None
      wait(timeout=None) -> int; alive -> bool; returncode -> int | None
      stop(timeout=3.0) -> None    # SIGTERM the process group, then SIGKILL

Helpers: ``lab_available() -> str | None`` (reason the lab cannot run, or None),
``sweep_stale_namespaces(prefix="qtl") -> list[str]`` (deletes namespaces left by dead
pytest processes; a live process's namespaces are never touched).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from . import miniupnpd as upnpd

SITE_KINDS = ("firewall", "cone", "symmetric", "udp-blocked")

_PROXY_VARS = ("http_proxy", "https_proxy", "all_proxy", "no_proxy", "ftp_proxy")

STUN_SERVER_CODE = r"""
import selectors, socket, sys
sel = selectors.DefaultSelector()
for spec in sys.argv[1:]:
    ip, port = spec.rsplit(",", 1)
    fam = socket.AF_INET6 if ":" in ip else socket.AF_INET
    s = socket.socket(fam, socket.SOCK_DGRAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind((ip, int(port)))
    sel.register(s, selectors.EVENT_READ)
print("stun listening", " ".join(sys.argv[1:]), flush=True)
while True:
    for key, _ in sel.select():
        s = key.fileobj
        try:
            data, addr = s.recvfrom(2048)
            s.sendto(b"SEEN %s %d" % (addr[0].encode(), addr[1]), addr)
        except OSError:
            pass
"""


def lab_available() -> str | None:
    """Return why the lab cannot run here, or None when it can."""
    if os.geteuid() != 0:
        return "not running as root"
    for tool in ("ip", "nft"):
        if shutil.which(tool) is None:
            return f"`{tool}` not found"
    return None


def _sh(argv: list[str], *, input: str | None = None, timeout: float = 30.0,
        check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(argv, input=input, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise RuntimeError(
            f"command failed ({proc.returncode}): {' '.join(argv)}\n"
            f"stdout: {proc.stdout}\nstderr: {proc.stderr}"
        )
    return proc


def list_namespaces() -> list[str]:
    """Names of all network namespaces (``ip netns list``)."""
    out = _sh(["ip", "netns", "list"], check=False).stdout
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def _kill_ns_pids(ns: str) -> None:
    for _ in range(20):
        out = _sh(["ip", "netns", "pids", ns], check=False).stdout.split()
        pids = [int(p) for p in out if p.isdigit()]
        if not pids:
            return
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.05)


def delete_namespace(ns: str) -> None:
    """Kill every process inside ``ns`` and delete it (idempotent)."""
    if ns not in list_namespaces():
        return
    _kill_ns_pids(ns)
    _sh(["ip", "netns", "del", ns], check=False)


def sweep_stale_namespaces(prefix: str = "qtl") -> list[str]:
    """Delete namespaces named ``{prefix}-{pid}-...`` whose creating process is gone."""
    removed = []
    pat = re.compile(rf"^{re.escape(prefix)}-(\d+)-[0-9a-f]+-\w+$")
    for ns in list_namespaces():
        m = pat.match(ns)
        if not m:
            continue
        pid = int(m.group(1))
        if pid != os.getpid() and Path(f"/proc/{pid}").exists():
            continue  # another live test session owns it
        if pid == os.getpid():
            continue  # ours: the owning Lab deletes it
        delete_namespace(ns)
        removed.append(ns)
    return removed


@dataclass(frozen=True)
class SiteSpec:
    """One site's router: ``kind`` in SITE_KINDS."""

    kind: str = "cone"
    drop_wan_input: bool = True
    ipv6: bool = True
    ipv4: bool = True  # False: the host has no IPv4 address at all (IPv6-only site)
    portmap: str = "none"  # "allow" / "deny": a real miniupnpd on the router's LAN

    def __post_init__(self) -> None:
        if self.kind not in SITE_KINDS:
            raise ValueError(f"unknown site kind {self.kind!r}; expected one of {SITE_KINDS}")
        if self.portmap not in upnpd.PORTMAP_KINDS:
            raise ValueError(f"unknown portmap {self.portmap!r}; expected one of "
                             f"{upnpd.PORTMAP_KINDS}")
        if self.portmap != "none" and not self.nat:
            raise ValueError("portmap needs a NAT site (miniupnpd maps through the NAT)")

    @property
    def nat(self) -> bool:
        return self.kind != "firewall"


class LabProcess:
    """A process started in a namespace, its output logged to files."""

    def __init__(self, name: str, ns: str, argv: list[str], popen: subprocess.Popen[bytes],
                 stdout_path: Path, stderr_path: Path, logdir: Path) -> None:
        self.name = name
        self.ns = ns
        self.argv = argv
        self.popen = popen
        self.stdout_path = stdout_path
        self.stderr_path = stderr_path
        self.logdir = logdir

    @property
    def pid(self) -> int:
        return self.popen.pid

    @property
    def alive(self) -> bool:
        return self.popen.poll() is None

    @property
    def returncode(self) -> int | None:
        return self.popen.poll()

    def output(self, stream: str = "both") -> str:
        """Everything logged so far on ``stream`` ("stdout", "stderr" or "both")."""
        parts = []
        if stream in ("stdout", "both"):
            parts.append(self.stdout_path.read_text(errors="replace"))
        if stream in ("stderr", "both"):
            parts.append(self.stderr_path.read_text(errors="replace"))
        return "\n".join(parts)

    def count_matches(self, pattern: str, *, stream: str = "both") -> int:
        rx = re.compile(pattern)
        return sum(1 for line in self.output(stream).splitlines() if rx.search(line))

    def wait_for_line(self, pattern: str, timeout: float = 10.0, *, stream: str = "both",
                      skip: int = 0) -> re.Match[str]:
        """Wait for the (skip+1)-th line matching ``pattern`` (``re.search``) and return it."""
        rx = re.compile(pattern)
        deadline = time.monotonic() + timeout
        while True:
            exited = not self.alive
            found = 0
            for line in self.output(stream).splitlines():
                m = rx.search(line)
                if m:
                    if found == skip:
                        return m
                    found += 1
            if exited:
                raise AssertionError(
                    f"{self.name} exited ({self.returncode}) before printing /{pattern}/\n"
                    f"{self.tail()}"
                )
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"{self.name}: no line /{pattern}/ within {timeout}s\n{self.tail()}"
                )
            time.sleep(0.02)

    def tail(self, lines: int = 40) -> str:
        out = []
        for label, path in (("stdout", self.stdout_path), ("stderr", self.stderr_path)):
            text = path.read_text(errors="replace").splitlines()[-lines:]
            out.append(f"--- {self.name} [{self.ns}] {label} ({path}) ---")
            out.extend(text)
        return "\n".join(out)

    def send_line(self, text: str) -> None:
        assert self.popen.stdin is not None, "spawned without stdin=subprocess.PIPE"
        self.popen.stdin.write(text.encode() + b"\n")
        self.popen.stdin.flush()

    def close_stdin(self) -> None:
        if self.popen.stdin is not None:
            with contextlib.suppress(OSError):
                self.popen.stdin.close()

    def wait(self, timeout: float | None = None) -> int:
        return self.popen.wait(timeout)

    def stop(self, timeout: float = 3.0) -> None:
        """SIGTERM the process group, then SIGKILL it if it lingers."""
        self.close_stdin()
        if self.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.popen.pid, signal.SIGTERM)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                pass
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.popen.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.popen.wait(2.0)


class Lab(upnpd.PortmapRouters):
    """Build the namespaces, links, routes and nftables rules; tear them down on close()."""

    relay_ip4 = "198.18.0.1"
    relay_ip6 = "2001:db8::1"
    router_a_wan_ip4 = "198.18.0.11"
    router_b_wan_ip4 = "198.18.0.12"
    router_a_wan_ip6 = "2001:db8::11"
    router_b_wan_ip6 = "2001:db8::12"

    def __init__(self, a: SiteSpec | str = "cone", b: SiteSpec | str | None = None, *,
                 same_lan: bool = False, relay_port: int = 8765,
                 stun_ports: tuple[int, int] = (3478, 3479), prefix: str = "qtl",
                 logdir: str | None = None) -> None:
        self.a = SiteSpec(a) if isinstance(a, str) else a
        if b is None:
            b = self.a
        self.b = SiteSpec(b) if isinstance(b, str) else b
        self.same_lan = same_lan
        if same_lan:
            self.b = self.a
        self.relay_port = relay_port
        self.stun_ports = stun_ports
        self.prefix = prefix
        tag = f"{prefix}-{os.getpid()}-{secrets.token_hex(2)}"
        self.wan_ns = f"{tag}-wan"
        self.relay_ns = self.wan_ns
        self.router_a_ns = f"{tag}-ra"
        self.router_b_ns = self.router_a_ns if same_lan else f"{tag}-rb"
        self.host_a_ns = f"{tag}-ha"
        self.host_b_ns = f"{tag}-hb"
        self.namespaces: list[str] = []
        for ns in (self.wan_ns, self.router_a_ns, self.router_b_ns, self.host_a_ns,
                   self.host_b_ns):
            if ns not in self.namespaces:
                self.namespaces.append(ns)
        self.host_a_ip4 = "198.19.1.2"
        self.host_a_ip6 = "2001:db8:1::2"
        if same_lan:
            self.host_b_ip4 = "198.19.1.3"
            self.host_b_ip6 = "2001:db8:1::3"
        else:
            self.host_b_ip4 = "198.19.2.2"
            self.host_b_ip6 = "2001:db8:2::2"
        self.signal_url = f"ws://{self.relay_ip4}:{relay_port}/"
        self.signal_url6 = f"ws://[{self.relay_ip6}]:{relay_port}/"
        self._own_logdir = logdir is None
        self.logdir = Path(logdir or tempfile.mkdtemp(prefix=f"{tag}-logs-"))
        self.processes: list[LabProcess] = []
        self._loss: dict[str | None, int] = {}
        self._stun: LabProcess | None = None
        self._upnp_stun: LabProcess | None = None
        self._miniupnpd: dict[str, int] = {}
        self._started = False

    # ------------------------------------------------------------------ naming helpers
    def _site(self, site: str) -> SiteSpec:
        if site not in ("a", "b"):
            raise ValueError(f"site must be 'a' or 'b', not {site!r}")
        return self.a if site == "a" else self.b

    def host_ns(self, site: str) -> str:
        self._site(site)
        return self.host_a_ns if site == "a" else self.host_b_ns

    def router_ns(self, site: str) -> str:
        self._site(site)
        return self.router_a_ns if site == "a" else self.router_b_ns

    def host_ip4(self, site: str) -> str:
        self._site(site)
        return self.host_a_ip4 if site == "a" else self.host_b_ip4

    def host_ip6(self, site: str) -> str:
        self._site(site)
        return self.host_a_ip6 if site == "a" else self.host_b_ip6

    def router_wan_ip4(self, site: str) -> str:
        self._site(site)
        if site == "a" or self.same_lan:
            return self.router_a_wan_ip4
        return self.router_b_wan_ip4

    def router_wan_ip6(self, site: str) -> str:
        self._site(site)
        if site == "a" or self.same_lan:
            return self.router_a_wan_ip6
        return self.router_b_wan_ip6

    def public_ip4(self, site: str) -> str:
        """The IPv4 address the wan sees for ``site``'s host."""
        return self.router_wan_ip4(site) if self._site(site).nat else self.host_ip4(site)

    # ------------------------------------------------------------------ lifecycle
    def __enter__(self) -> Lab:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def start(self) -> None:
        reason = lab_available()
        if reason is None and self._portmap_sites():
            reason = upnpd.miniupnpd_available()
        if reason:
            raise RuntimeError(f"network lab unavailable: {reason}")
        self._started = True
        try:
            self._build()
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        """Stop all processes and delete all namespaces (safe to call twice)."""
        for pid in self._miniupnpd.values():  # SIGTERM: it removes its own rules
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGTERM)
        for proc in reversed(self.processes):
            with contextlib.suppress(Exception):
                proc.stop(timeout=2.0)
        for ns in self.namespaces:
            with contextlib.suppress(Exception):
                delete_namespace(ns)

    def cleanup_logs(self) -> None:
        if self._own_logdir:
            shutil.rmtree(self.logdir, ignore_errors=True)

    # ------------------------------------------------------------------ building
    def _ip(self, ns: str, *args: str) -> None:
        _sh(["ip", "-n", ns, *args])

    def _sysctl(self, ns: str, *settings: str) -> None:
        _sh(["ip", "netns", "exec", ns, "sysctl", "-qw", *settings])

    def _no_bridge_netfilter(self, ns: str) -> None:
        # br_netfilter (present on this kernel, per-netns default 1) would push bridged
        # frames through the IP forward hook: the router's drop policy would then filter
        # host<->host LAN traffic. A bridge here is a plain switch.
        keys = ("bridge-nf-call-iptables", "bridge-nf-call-ip6tables", "bridge-nf-call-arptables")
        settings = [f"net.bridge.{k}=0" for k in keys]
        _sh(["ip", "netns", "exec", ns, "sysctl", "-qw", *settings], check=False)

    def _nft(self, ns: str, ruleset: str) -> None:
        _sh(["ip", "netns", "exec", ns, "nft", "-f", "-"], input=ruleset)

    def _build(self) -> None:
        for ns in self.namespaces:
            _sh(["ip", "netns", "add", ns])
            self._ip(ns, "link", "set", "lo", "up")
            # no duplicate address detection: addresses usable at once, no tentative lladdr
            self._sysctl(ns, "net.ipv6.conf.all.accept_dad=0",
                         "net.ipv6.conf.default.accept_dad=0",
                         "net.ipv6.conf.default.accept_ra=0")
        # wan: bridge carrying the relay address
        w = self.wan_ns
        self._ip(w, "link", "add", "br0", "type", "bridge", "forward_delay", "0")
        self._ip(w, "addr", "add", f"{self.relay_ip4}/24", "dev", "br0")
        self._ip(w, "addr", "add", f"{self.relay_ip6}/64", "dev", "br0", "nodad")
        self._ip(w, "link", "set", "br0", "up")
        self._no_bridge_netfilter(w)
        sites = ["a"] if self.same_lan else ["a", "b"]
        for site in sites:
            r = self.router_ns(site)
            port = f"r{site}"
            self._ip(w, "link", "add", port, "type", "veth", "peer", "name", "wan0", "netns", r)
            self._ip(w, "link", "set", port, "master", "br0")
            self._ip(w, "link", "set", port, "up")
            self._ip(r, "addr", "add", f"{self.router_wan_ip4(site)}/24", "dev", "wan0")
            self._ip(r, "addr", "add", f"{self.router_wan_ip6(site)}/64", "dev", "wan0",
                     "nodad")
            self._ip(r, "link", "set", "wan0", "up")
            self._sysctl(r, "net.ipv4.ip_forward=1", "net.ipv6.conf.all.forwarding=1")
        # lans
        if self.same_lan:
            r = self.router_a_ns
            self._ip(r, "link", "add", "lan0", "type", "bridge", "forward_delay", "0")
            self._ip(r, "addr", "add", "198.19.1.1/24", "dev", "lan0")
            self._ip(r, "addr", "add", "2001:db8:1::1/64", "dev", "lan0", "nodad")
            self._ip(r, "link", "set", "lan0", "up")
            self._no_bridge_netfilter(r)
            for site in ("a", "b"):
                h = self.host_ns(site)
                port = f"h{site}"
                self._ip(r, "link", "add", port, "type", "veth", "peer", "name", "eth0",
                         "netns", h)
                self._ip(r, "link", "set", port, "master", "lan0")
                self._ip(r, "link", "set", port, "up")
                self._host_addrs(site, "198.19.1.1", "2001:db8:1::1")
        else:
            for idx, site in ((1, "a"), (2, "b")):
                r = self.router_ns(site)
                h = self.host_ns(site)
                self._ip(r, "link", "add", "lan0", "type", "veth", "peer", "name", "eth0",
                         "netns", h)
                self._ip(r, "addr", "add", f"198.19.{idx}.1/24", "dev", "lan0")
                self._ip(r, "addr", "add", f"2001:db8:{idx}::1/64", "dev", "lan0", "nodad")
                self._ip(r, "link", "set", "lan0", "up")
                self._host_addrs(site, f"198.19.{idx}.1", f"2001:db8:{idx}::1")
            # routes between the sites and from the relay host; IPv4 only to routed sites
            for idx, site in ((1, "a"), (2, "b")):
                other = "b" if site == "a" else "a"
                spec = self._site(site)
                gw4, gw6 = self.router_wan_ip4(site), self.router_wan_ip6(site)
                targets = [w, self.router_ns(other)]
                for ns in targets:
                    if spec.ipv6:
                        self._ip(ns, "-6", "route", "add", f"2001:db8:{idx}::/64", "via", gw6)
                    if not spec.nat:
                        self._ip(ns, "route", "add", f"198.19.{idx}.0/24", "via", gw4)
        if self.same_lan and self.a.ipv6:
            self._ip(w, "-6", "route", "add", "2001:db8:1::/64", "via", self.router_a_wan_ip6)
        # nftables
        self._nft(w, self._wan_ruleset())
        for site in sites:
            self._nft(self.router_ns(site), self._router_ruleset(site))
        if self.same_lan:
            self._nft(self.router_a_ns, self._lan_bridge_ruleset())
        for site in self._portmap_sites():
            self._start_miniupnpd(site)

    def _host_addrs(self, site: str, gw4: str, gw6: str) -> None:
        h = self.host_ns(site)
        self._ip(h, "link", "set", "eth0", "up")
        if self._site(site).ipv4:
            self._ip(h, "addr", "add", f"{self.host_ip4(site)}/24", "dev", "eth0")
            self._ip(h, "route", "add", "default", "via", gw4)
        if self._site(site).ipv6:
            self._ip(h, "addr", "add", f"{self.host_ip6(site)}/64", "dev", "eth0", "nodad")
            self._ip(h, "-6", "route", "add", "default", "via", gw6)

    def _wan_ruleset(self) -> str:
        p = self.relay_port
        return f"""
table bridge qlab_wan {{
  counter direct_udp4 {{}}
  counter direct_udp6 {{}}
  counter direct_other {{}}
  counter loss_drops {{}}
  chain loss_chain {{
  }}
  chain forward_chain {{
    type filter hook forward priority 0; policy accept;
    jump loss_chain
    ether type ip meta l4proto udp counter name direct_udp4 accept
    ether type ip6 meta l4proto udp counter name direct_udp6 accept
    ether type {{ ip, ip6 }} counter name direct_other accept
  }}
}}
table inet qlab_relay {{
  counter relay_tcp_in {{}}
  counter relay_tcp_out {{}}
  counter relay_udp_in {{}}
  counter relay_udp_out {{}}
  chain input_chain {{
    type filter hook input priority 0; policy accept;
    iifname "lo" accept
    tcp dport {p} counter name relay_tcp_in
    meta l4proto udp counter name relay_udp_in
  }}
  chain output_chain {{
    type filter hook output priority 0; policy accept;
    oifname "lo" accept
    tcp sport {p} counter name relay_tcp_out
    meta l4proto udp counter name relay_udp_out
  }}
}}
"""

    def _masq_rules(self, site: str, udp_ports: tuple[int, int] | None = None,
                    tcp: bool = False) -> str:
        spec = self._site(site)
        rnd = " random" if spec.kind == "symmetric" else ""
        lan = "198.19.1.0/24" if (site == "a" or self.same_lan) else "198.19.2.0/24"
        rules = []
        if udp_ports is not None:
            lo, hi = udp_ports
            proto = "{ udp, tcp }" if tcp else "udp"
            rules.append(
                f'oifname "wan0" ip saddr {lan} meta l4proto {proto} masquerade to :{lo}-{hi}{rnd}'
            )
        rules.append(f'oifname "wan0" ip saddr {lan} masquerade{rnd}')
        return "\n    ".join(rules)

    def _router_ruleset(self, site: str) -> str:
        spec = self._site(site)
        if spec.drop_wan_input:
            wan_input = """iifname "wan0" ct state established,related accept
    iifname "wan0" meta l4proto ipv6-icmp accept
    iifname "wan0" counter name wan_input_drops drop"""
        else:
            wan_input = "# unsolicited wan input accepted (conntrack entries are kept)"
        udp_block = ""
        if spec.kind == "udp-blocked":
            udp_block = ('iifname "lan0" oifname "wan0" meta l4proto udp '
                         "counter name udp_blocked drop")
        upnp_chain = upnp_jump = upnp_tables = ""
        if spec.portmap != "none":  # miniupnpd's chain, reached before the final drop
            upnp_chain = "chain miniupnpd {\n  }"
            upnp_jump = upnpd.FORWARD_JUMP
            upnp_tables = upnpd.nft_tables()
        nat = ""
        if spec.nat:
            nat = f"""
table ip qlab_nat {{
  chain postrouting_chain {{
    type nat hook postrouting priority srcnat; policy accept;
    {self._masq_rules(site)}
  }}
}}
"""
        return f"""
table inet qlab_router {{
  counter wan_input_drops {{}}
  counter udp_blocked {{}}
  counter fwd_drops {{}}
  counter loss_drops {{}}
  chain loss_chain {{
  }}
  {upnp_chain}
  chain input_chain {{
    type filter hook input priority 0; policy accept;
    {wan_input}
  }}
  chain forward_chain {{
    type filter hook forward priority 0; policy drop;
    jump loss_chain
    {udp_block}
    ct state established,related accept
    ct state invalid drop
    iifname "lan0" oifname "wan0" accept
    icmpv6 type {{ destination-unreachable, packet-too-big, time-exceeded,
                   parameter-problem }} accept
    {upnp_jump}
    counter name fwd_drops
  }}
}}
{nat}
{upnp_tables}
"""

    def _lan_bridge_ruleset(self) -> str:
        return """
table bridge qlab_lan {
  counter lan_udp {}
  chain forward_chain {
    type filter hook forward priority 0; policy accept;
    meta l4proto udp counter name lan_udp
  }
}
"""

    # ------------------------------------------------------------------ processes
    def _env(self, env: dict[str, str] | None) -> dict[str, str]:
        merged = {k: v for k, v in os.environ.items()
                  if k.lower() not in _PROXY_VARS}
        merged["PYTHONUNBUFFERED"] = "1"
        if env:
            merged.update(env)
        return merged

    def spawn(self, ns: str, argv: list[str], *, env: dict[str, str] | None = None,
              stdin: int | IO[Any] | None = None, name: str,
              cwd: str | os.PathLike[str] | None = None) -> LabProcess:
        """Start ``argv`` inside ``ns`` in its own process group, logging to ``logdir``.

        ``stdin``: None (reads /dev/null), ``subprocess.PIPE`` (use ``send_line``), or a file.
        ``env`` is added to this process's environment (minus proxy variables).
        """
        if ns not in self.namespaces:
            raise ValueError(f"{ns!r} is not one of this lab's namespaces")
        safe = re.sub(r"[^A-Za-z0-9_.-]", "_", name)
        n = sum(1 for p in self.processes if p.name == name)
        if n:
            safe = f"{safe}.{n}"
        out = self.logdir / f"{safe}.stdout"
        err = self.logdir / f"{safe}.stderr"
        full = ["ip", "netns", "exec", ns, *argv]
        with open(out, "wb") as fo, open(err, "wb") as fe:
            popen = subprocess.Popen(
                full, stdin=subprocess.DEVNULL if stdin is None else stdin, stdout=fo,
                stderr=fe, env=self._env(env), start_new_session=True, cwd=cwd,
            )
        proc = LabProcess(name, ns, full, popen, out, err, self.logdir)
        self.processes.append(proc)
        return proc

    def spawn_python(self, ns: str, code: str, *args: str, env: dict[str, str] | None = None,
                     stdin: int | IO[Any] | None = None, name: str) -> LabProcess:
        return self.spawn(ns, [sys.executable, "-c", code, *args], env=env, stdin=stdin,
                          name=name)

    def run(self, ns: str, argv: list[str], *, check: bool = False, timeout: float = 30.0,
            input: str | None = None, env: dict[str, str] | None = None,
            ) -> subprocess.CompletedProcess[str]:
        """Run ``argv`` in ``ns`` to completion, capturing text output."""
        if ns not in self.namespaces:
            raise ValueError(f"{ns!r} is not one of this lab's namespaces")
        proc = subprocess.run(["ip", "netns", "exec", ns, *argv], input=input,
                              capture_output=True, text=True, timeout=timeout,
                              env=self._env(env))
        if check and proc.returncode != 0:
            raise RuntimeError(f"{argv} in {ns} failed ({proc.returncode}):\n"
                               f"{proc.stdout}\n{proc.stderr}")
        return proc

    def run_python(self, ns: str, code: str, *args: str, timeout: float = 30.0,
                   input: str | None = None, env: dict[str, str] | None = None,
                   check: bool = True) -> subprocess.CompletedProcess[str]:
        return self.run(ns, [sys.executable, "-c", code, *args], check=check,
                        timeout=timeout, input=input, env=env)

    def start_stun(self) -> None:
        """Start the STUN-like UDP echo on the relay (idempotent); replies ``SEEN ip port``."""
        if self._stun is not None and self._stun.alive:
            return
        specs = [f"{ip},{port}" for ip in (self.relay_ip4, self.relay_ip6)
                 for port in self.stun_ports]
        self._stun = self.spawn_python(self.relay_ns, STUN_SERVER_CODE, *specs, name="stun")
        self._stun.wait_for_line(r"stun listening", timeout=10)

    # ------------------------------------------------------------------ counters
    def counters(self) -> dict[str, tuple[int, int]]:
        """All named nft counters: ``"<ns-role>/<table>/<name>" -> (packets, bytes)``."""
        result: dict[str, tuple[int, int]] = {}
        for ns in self.namespaces:
            role = ns.rsplit("-", 1)[1]
            result.update({f"{role}/{k}": v for k, v in self._ns_counters(ns).items()})
        return result

    def _ns_counters(self, ns: str) -> dict[str, tuple[int, int]]:
        out = _sh(["ip", "netns", "exec", ns, "nft", "-j", "list", "counters"]).stdout
        result = {}
        for item in json.loads(out).get("nftables", []):
            c = item.get("counter")
            if c:
                result[f"{c['table']}/{c['name']}"] = (int(c["packets"]), int(c["bytes"]))
        return result

    def _counter(self, ns: str, key: str, field: int) -> int:
        return self._ns_counters(ns).get(key, (0, 0))[field]

    def _direct(self, family: int | None, field: int) -> int:
        c = self._ns_counters(self.wan_ns)
        fams = (4, 6) if family is None else (family,)
        return sum(c[f"qlab_wan/direct_udp{f}"][field] for f in fams)

    def direct_udp_bytes(self, family: int | None = None) -> int:
        """Bytes of UDP bridged between the two site routers on the wan (the direct path);
        ``family`` 4 or 6 counts one IP version only."""
        return self._direct(family, 1)

    def direct_udp_packets(self, family: int | None = None) -> int:
        return self._direct(family, 0)

    def relay_tcp_bytes(self) -> int:
        """Bytes of TCP to and from the relay's port (both directions summed)."""
        c = self._ns_counters(self.wan_ns)
        return c["qlab_relay/relay_tcp_in"][1] + c["qlab_relay/relay_tcp_out"][1]

    def relay_udp_bytes(self) -> int:
        c = self._ns_counters(self.wan_ns)
        return c["qlab_relay/relay_udp_in"][1] + c["qlab_relay/relay_udp_out"][1]

    def lan_udp_bytes(self) -> int:
        """same_lan only: bytes of UDP bridged host<->host on the shared LAN."""
        if not self.same_lan:
            return 0
        return self._counter(self.router_a_ns, "qlab_lan/lan_udp", 1)

    def loss_dropped_packets(self) -> int:
        total = 0
        for ns in self.namespaces:
            for key, (pk, _) in self._ns_counters(ns).items():
                if key.endswith("/loss_drops"):
                    total += pk
        return total

    def reset_counters(self) -> None:
        for ns in (self.wan_ns, self.router_a_ns, self.router_b_ns):
            _sh(["ip", "netns", "exec", ns, "nft", "reset", "counters"], check=False)

    # ------------------------------------------------------------------ runtime knobs
    def set_udp_timeout(self, site: str, seconds: int, stream_seconds: int | None = None) -> None:
        """Set ``nf_conntrack_udp_timeout`` (and ``_stream``, default same) in a router."""
        stream = seconds if stream_seconds is None else stream_seconds
        self._sysctl(self.router_ns(site), f"net.netfilter.nf_conntrack_udp_timeout={seconds}",
                     f"net.netfilter.nf_conntrack_udp_timeout_stream={stream}")

    def get_sysctl(self, ns: str, key: str) -> str:
        return _sh(["ip", "netns", "exec", ns, "sysctl", "-n", key]).stdout.strip()

    def flush_conntrack(self, site: str) -> None:
        """``conntrack -F`` in the router: it forgets every mapping."""
        _sh(["ip", "netns", "exec", self.router_ns(site), "conntrack", "-F"], check=False)

    def conntrack_list(self, site: str) -> str:
        return _sh(["ip", "netns", "exec", self.router_ns(site), "conntrack", "-L"],
                   check=False).stdout

    def set_masquerade_ports(self, site: str, lo: int, hi: int, *, tcp: bool = False) -> None:
        """Masquerade UDP (and with ``tcp``, TCP too) from ``site`` to ports lo-hi (new
        flows only; flush to rebind). With ``tcp`` and a flush, the relay's WebSocket
        from that site breaks as well, as after a home router's reboot.

        Linux keeps a source port that already lies inside lo-hi: to force a new public
        port pick a range outside the hosts' ephemeral ports (32768-60999), e.g. 20000-29999.
        """
        if not self._site(site).nat:
            raise ValueError(f"site {site} ({self._site(site).kind}) has no NAT")
        rules = self._masq_rules(site, (lo, hi), tcp)
        self._nft(self.router_ns(site),
                  "flush chain ip qlab_nat postrouting_chain\n"
                  + "\n".join(f"add rule ip qlab_nat postrouting_chain {r.strip()}"
                              for r in rules.split("\n")))

    def set_loss(self, percent: int, site: str | None = None) -> None:
        """Drop ``percent``% of UDP at random (counted in ``loss_drops``); 0 removes it.

        ``site=None``: on the wan bridge (both directions of the direct site<->site path);
        ``"a"``/``"b"``: on that router's forward path (UDP to and from its LAN).
        """
        if not 0 <= percent <= 100:
            raise ValueError("percent must be 0..100")
        if site is None:
            ns, fam, table = self.wan_ns, "bridge", "qlab_wan"
        else:
            ns, fam, table = self.router_ns(site), "inet", "qlab_router"
        cmds = [f"flush chain {fam} {table} loss_chain"]
        # nft refuses "mod 100 < 100" (the comparison is always true): 100 % is all UDP
        pick = "" if percent == 100 else f"numgen random mod 100 < {percent} "
        if percent:
            cmds.append(f"add rule {fam} {table} loss_chain meta l4proto udp "
                        f"{pick}counter name loss_drops drop")
        self._nft(ns, "\n".join(cmds) + "\n")
        self._loss[site] = percent

    def set_uplink_mtu(self, site: str, mtu: int, *, filter_icmp: bool = True) -> None:
        """Give ``site``'s uplink an IP MTU of ``mtu`` (its router's wan0 and the wan
        bridge port facing it), like a PPPoE or tunnelled uplink.

        With ``filter_icmp`` (the default) ICMP "fragmentation needed" / ICMPv6 "packet
        too big" are dropped where they arise (the router's own output, and anything
        forwarded by it or bridged on the wan; counted in ``icmp_too_big_dropped()``):
        bigger datagrams then vanish without a trace, in both directions (the bridge
        drops oversized frames silently), a path MTU black hole.
        """
        router, port = self.router_ns(site), f"r{site}"
        if self.same_lan:
            raise ValueError("same_lan labs have one router: use set_lan_mtu")
        self._ip(router, "link", "set", "wan0", "mtu", str(mtu))
        self._ip(self.wan_ns, "link", "set", port, "mtu", str(mtu))
        if not filter_icmp:
            return
        drop = ('icmp type destination-unreachable icmp code frag-needed '
                'counter name too_big_dropped drop\n'
                '    icmpv6 type packet-too-big counter name too_big_dropped drop')
        self._nft(router, f"""
table inet qlab_pmtu {{
  counter too_big_dropped {{}}
  chain output_chain {{
    type filter hook output priority -10; policy accept;
    {drop}
  }}
  chain forward_chain {{
    type filter hook forward priority -10; policy accept;
    {drop}
  }}
}}
""")
        if "qlab_pmtu" not in _sh(["ip", "netns", "exec", self.wan_ns, "nft", "list",
                                   "tables"]).stdout:
            self._nft(self.wan_ns, f"""
table bridge qlab_pmtu {{
  counter too_big_dropped {{}}
  chain forward_chain {{
    type filter hook forward priority -10; policy accept;
    {drop}
  }}
}}
""")

    def set_lan_mtu(self, mtu: int) -> None:
        """same_lan only: give the shared LAN (bridge, its ports, both hosts' eth0) an
        MTU of ``mtu``, e.g. 9000 for jumbo frames."""
        if not self.same_lan:
            raise ValueError("set_lan_mtu needs a same_lan lab")
        r = self.router_a_ns
        for site in ("a", "b"):
            self._ip(r, "link", "set", f"h{site}", "mtu", str(mtu))
            self._ip(self.host_ns(site), "link", "set", "eth0", "mtu", str(mtu))
        self._ip(r, "link", "set", "lan0", "mtu", str(mtu))

    def icmp_too_big_dropped(self) -> int:
        """Packets dropped by the ICMP "too big" filter of ``set_uplink_mtu``."""
        return sum(pk for key, (pk, _b) in self.counters().items()
                   if key.endswith("qlab_pmtu/too_big_dropped"))

    # ------------------------------------------------------------------ diagnostics
    def describe(self) -> str:
        """A dump for failure reports: counters, rulesets, conntrack, process log tails."""
        out = [f"lab namespaces: {self.namespaces}", f"logdir: {self.logdir}",
               f"sites: a={self.a} b={self.b} same_lan={self.same_lan}"]
        with contextlib.suppress(Exception):
            for k, v in sorted(self.counters().items()):
                out.append(f"counter {k}: packets={v[0]} bytes={v[1]}")
        for site in ("a",) if self.same_lan else ("a", "b"):
            with contextlib.suppress(Exception):
                out.append(f"--- conntrack router {site} ---")
                out.append(self.conntrack_list(site).strip())
        for site in self._portmap_sites():
            with contextlib.suppress(Exception):
                out.append(f"--- miniupnpd router {site}: leases ---")
                out.extend(self.upnp_leases(site))
                out.append(self.upnp_rules(site).strip())
                out.append(f"--- miniupnpd router {site}: log (tail) ---")
                out.extend(self.miniupnpd_log(site).splitlines()[-40:])
        for proc in self.processes:
            with contextlib.suppress(Exception):
                out.append(f"{proc.name}: returncode={proc.returncode}")
                out.append(proc.tail(30))
        return "\n".join(out)
