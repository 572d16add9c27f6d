"""A real miniupnpd on a lab router: its configuration, nft chains and STUN helper.

Used by :mod:`tests.lab.netlab` for sites made with ``SiteSpec(..., portmap="allow")`` or
``portmap="deny"``. miniupnpd (Debian ``miniupnpd-nftables``) speaks UPnP IGD, NAT-PMP and
PCP on the lab LAN only (``listening_ip=lan0``); its external interface is ``wan0``.

Two lab-specific details:

- miniupnpd refuses to map while its wan address is reserved, and every lab address is
  (198.18.0.0/15). With ``ext_perform_stun=yes`` it asks a STUN server for its public
  address instead and maps if four binding requests from four sockets come back with
  the source address and port unchanged (no upstream NAT, no filtering). The wan
  namespace runs :data:`STUN_RESPONDER_CODE` for that: a minimal RFC 8489 Binding
  responder answering every request (CHANGE-REQUEST ignored) with XOR-MAPPED-ADDRESS =
  the request's source.
- miniupnpd adds its rules to chains it does not create. The router's own filter table
  (``inet qlab_router``) gets a ``miniupnpd`` chain that its drop-policy forward chain
  jumps to (so miniupnpd's accept rules really open the forward path; an accept in a
  separate base chain would not override the router's drop), and a table ``inet
  qlab_upnp`` holds the prerouting DNAT hook and the chains named in the config.
"""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

__all__ = [
    "PORTMAP_KINDS",
    "STUN_PORT",
    "STUN_RESPONDER_CODE",
    "LOG_READER_CODE",
    "miniupnpd_available",
    "config_text",
    "nft_tables",
    "FORWARD_JUMP",
    "PortmapRouters",
]

PORTMAP_KINDS = ("none", "allow", "deny")
"""``none``: no daemon; ``allow``: miniupnpd maps for the LAN's ports >= 1024; ``deny``:
miniupnpd runs and answers, with a permission rule that refuses every mapping."""

STUN_PORT = 3490
"""Port of the STUN responder on the relay address (3478/3479 are the lab's echo)."""

FORWARD_JUMP = "jump miniupnpd"
"""The rule the router's forward chain gets before its final drop."""

STUN_RESPONDER_CODE = r"""
import socket, struct, sys
COOKIE = 0x2112A442
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[1], int(sys.argv[2])))
print("stun responder listening", sys.argv[1], sys.argv[2], flush=True)
while True:
    try:
        data, (ip, port) = s.recvfrom(2048)
    except OSError:
        continue
    if len(data) < 20:
        continue
    mtype, length, cookie = struct.unpack_from("!HHI", data)
    if mtype != 0x0001 or cookie != COOKIE or 20 + length != len(data):
        continue
    txid = data[8:20]
    xaddr = struct.unpack("!I", socket.inet_aton(ip))[0] ^ COOKIE
    attr = struct.pack("!HHBBHI", 0x0020, 8, 0, 1, port ^ (COOKIE >> 16), xaddr)
    s.sendto(struct.pack("!HHI", 0x0101, len(attr), COOKIE) + txid + attr, (ip, port))
    print("stun answered", ip, port, flush=True)
"""


LOG_READER_CODE = r"""
import os, sys
fd = os.open(sys.argv[1], os.O_RDWR)  # read-write: never EOF, never a writer blocked
with open(sys.argv[2], "ab", buffering=0) as out:
    print("log reader ready", flush=True)
    while True:
        out.write(os.read(fd, 65536))
"""
"""Appends what miniupnpd's syslog(3) writes to the FIFO bound over its /dev/console."""


def miniupnpd_available() -> str | None:
    """Why miniupnpd cannot run here, or None."""
    if shutil.which("miniupnpd") is None:
        return "miniupnpd is not installed (apt-get install miniupnpd-nftables)"
    return None


def config_text(*, kind: str, lan_net: str, stun_host: str, lease_file: Path,
                min_lifetime: int = 2) -> str:
    """miniupnpd.conf for a lab router.

    Args:
        kind: ``"allow"`` or ``"deny"`` (see :data:`PORTMAP_KINDS`).
        lan_net: the LAN prefix, e.g. ``198.19.1.0/24``.
        stun_host: the STUN responder's address (port :data:`STUN_PORT`).
        lease_file: where miniupnpd lists its mappings (one ``PROTO:eport:iaddr:iport:
            timestamp:description`` line each).
        min_lifetime: the shortest PCP lifetime granted (tests renew quickly).
    """
    if kind == "allow":
        rules = f"allow 1024-65535 {lan_net} 1024-65535\ndeny 0-65535 0.0.0.0/0 0-65535\n"
    elif kind == "deny":
        rules = "deny 0-65535 0.0.0.0/0 0-65535\n"
    else:
        raise ValueError(f"no miniupnpd for portmap={kind!r}")
    return f"""# quictun lab router ({kind})
ext_ifname=wan0
ext_perform_stun=yes
ext_stun_host={stun_host}
ext_stun_port={STUN_PORT}
listening_ip=lan0
http_port=0
ipv6_disable=yes
enable_natpmp=yes
enable_upnp=yes
secure_mode=yes
system_uptime=no
notify_interval=60
clean_ruleset_interval=0
min_lifetime={min_lifetime}
max_lifetime=86400
lease_file={lease_file}
upnp_table_name=qlab_router
upnp_nat_table_name=qlab_upnp
upnp_forward_chain=miniupnpd
upnp_nat_chain=prerouting_miniupnpd
upnp_nat_postrouting_chain=postrouting_miniupnpd
uuid={_uuid()}
friendly_name=quictun lab router
{rules}"""


def _uuid() -> str:
    h = secrets.token_hex(16)
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


def nft_tables() -> str:
    """The NAT table miniupnpd writes into (its filter chain lives in qlab_router)."""
    return """
table inet qlab_upnp {
  chain prerouting_chain {
    type nat hook prerouting priority dstnat; policy accept;
    jump prerouting_miniupnpd
  }
  chain postrouting_chain {
    type nat hook postrouting priority srcnat; policy accept;
    jump postrouting_miniupnpd
  }
  chain prerouting_miniupnpd {
  }
  chain postrouting_miniupnpd {
  }
}
"""


class PortmapRouters:
    """The miniupnpd half of :class:`tests.lab.netlab.Lab`, a mixin: it calls the lab's
    ``spawn_python``, ``run``, ``router_ns`` and ``_site``, and uses ``_miniupnpd`` and
    ``_upnp_stun``, which the lab initialises."""

    _miniupnpd: dict[str, int]
    _upnp_stun: Any
    logdir: Path
    relay_ns: str
    relay_ip4: str
    same_lan: bool

    def _portmap_sites(self) -> list[str]:
        sites = ["a"] if self.same_lan else ["a", "b"]
        return [s for s in sites if self._site(s).portmap != "none"]

    def _start_miniupnpd(self, site: str) -> None:
        """Start the STUN responder (once) and this router's miniupnpd; wait until it
        serves (STUN done: "Port forwarding is now enabled"; HTTP listening).

        miniupnpd runs as the daemon it is (``-d`` would log every port it tries at debug
        level: a refused request then takes minutes), at ``-v``. It logs through
        syslog(3), which without /dev/log opens /dev/console for every message: in a
        private mount namespace a FIFO of the lab's is bound over /dev/console, and a
        reader appends what comes through to the log file (never the machine's console).
        """
        if self._upnp_stun is None:
            self._upnp_stun = self.spawn_python(
                self.relay_ns, STUN_RESPONDER_CODE, self.relay_ip4,
                str(STUN_PORT), name="upnp-stun")
            self._upnp_stun.wait_for_line(r"stun responder listening", timeout=10)
        idx = 1 if site == "a" or self.same_lan else 2
        conf = self.logdir / f"miniupnpd-{site}.conf"
        conf.write_text(config_text(
            kind=self._site(site).portmap, lan_net=f"198.19.{idx}.0/24",
            stun_host=self.relay_ip4, lease_file=self.upnp_lease_path(site)))
        log = self._miniupnpd_log_path(site)
        log.touch()
        fifo = self.logdir / f"miniupnpd-{site}.console"
        os.mkfifo(fifo)
        reader = self.spawn_python(self.router_ns(site), LOG_READER_CODE, str(fifo),
                                   str(log), name=f"miniupnpd-log-{site}")
        reader.wait_for_line(r"log reader ready", timeout=10)
        pidfile = self.logdir / f"miniupnpd-{site}.pid"
        self.run(self.router_ns(site), [
            "unshare", "--mount", "--propagation", "private", "sh", "-c",
            'mount --bind "$1" /dev/console && shift && exec "$@"', "sh", str(fifo),
            "miniupnpd", "-f", str(conf), "-v", "-P", str(pidfile)], check=True)
        deadline = time.monotonic() + 20
        while True:
            text = log.read_text(errors="replace")
            if "Port forwarding is now enabled" in text and "HTTP listening on port" in text:
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"miniupnpd on router {site} did not start:\n{text}")
            time.sleep(0.02)
        self._miniupnpd[site] = int(pidfile.read_text().split()[0])

    def _miniupnpd_log_path(self, site: str) -> Path:
        return self.logdir / f"miniupnpd-{'a' if self.same_lan else site}.log"

    def miniupnpd_log(self, site: str) -> str:
        """What ``site``'s miniupnpd logged (empty without ``portmap``)."""
        path = self._miniupnpd_log_path(site)
        return path.read_text(errors="replace") if path.exists() else ""

    def miniupnpd_pid(self, site: str) -> int | None:
        """The pid of ``site``'s miniupnpd (None without ``portmap``)."""
        self._site(site)
        return self._miniupnpd.get("a" if self.same_lan else site)

    def upnp_lease_path(self, site: str) -> Path:
        """Where ``site``'s miniupnpd writes its lease list."""
        return self.logdir / f"miniupnpd-{'a' if self.same_lan else site}.leases"

    def upnp_leases(self, site: str) -> list[str]:
        """miniupnpd's current lease list for ``site`` (empty when no mapping)."""
        path = self.upnp_lease_path(site)
        if not path.exists():
            return []
        return [line for line in path.read_text(errors="replace").splitlines() if line]

    def upnp_rules(self, site: str) -> str:
        """The rules miniupnpd installed in ``site``'s router (forward accept, DNAT)."""
        ns = self.router_ns(site)
        out = []
        for table, chain in (("qlab_router", "miniupnpd"),
                             ("qlab_upnp", "prerouting_miniupnpd")):
            out.append(subprocess.run(["ip", "netns", "exec", ns, "nft", "list", "chain",
                                       "inet", table, chain], capture_output=True,
                                      text=True).stdout)
        return "\n".join(out)

