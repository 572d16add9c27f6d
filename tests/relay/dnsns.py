"""A network namespace where one hostname resolves to several addresses, for the relay
failover tests: ``relay.test`` -> 198.18.7.1, .2, .3 (benchmark range, on the
namespace's own loopback), through ``/etc/netns/<ns>/hosts``, which ``ip netns exec``
bind-mounts over /etc/hosts for the processes it starts. Needs root.

:class:`DnsNamespace` deletes the namespace and its /etc/netns folder on exit, whatever
happened; processes started with :meth:`DnsNamespace.wrap` are stopped by their owners
first.
"""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
from pathlib import Path

HOSTNAME = "relay.test"
ADDRESSES = ("198.18.7.1", "198.18.7.2", "198.18.7.3")
ETC_NETNS = Path("/etc/netns")


def _run(argv: list[str], check: bool = True, **kw: object) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=30, **kw)  # type: ignore[call-overload]
    if check and proc.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed: {proc.stderr.strip()}")
    return proc


class DnsNamespace:
    """A namespace ``qtr-<pid>-<random>`` with ADDRESSES on lo and HOSTNAME in its hosts."""

    def __init__(self) -> None:
        self.name = f"qtr-{os.getpid()}-{secrets.token_hex(2)}"
        self.etc = ETC_NETNS / self.name
        self._made_etc_netns = False

    def __enter__(self) -> DnsNamespace:
        try:
            if not ETC_NETNS.exists():
                ETC_NETNS.mkdir()
                self._made_etc_netns = True
            self.etc.mkdir()
            lines = ["127.0.0.1 localhost"] + [f"{a} {HOSTNAME}" for a in ADDRESSES]
            (self.etc / "hosts").write_text("\n".join(lines) + "\n")
            _run(["ip", "netns", "add", self.name])
            self.sh("ip", "link", "set", "lo", "up")
            for addr in ADDRESSES:
                self.sh("ip", "addr", "add", f"{addr}/32", "dev", "lo")
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        _run(["ip", "netns", "del", self.name], check=False)
        shutil.rmtree(self.etc, ignore_errors=True)
        if self._made_etc_netns:
            try:
                ETC_NETNS.rmdir()  # only if empty: another user may have put theirs there
            except OSError:
                pass

    def wrap(self) -> list[str]:
        """argv prefix running a command inside the namespace."""
        return ["ip", "netns", "exec", self.name]

    def sh(self, *argv: str, check: bool = True,
           input: str | None = None) -> subprocess.CompletedProcess[str]:
        return _run(self.wrap() + list(argv), check=check, input=input)

    def resolved(self) -> list[str]:
        """HOSTNAME's addresses in the order getaddrinfo gives them inside the namespace."""
        out = self.sh("getent", "ahostsv4", HOSTNAME).stdout
        seen: list[str] = []
        for line in out.splitlines():
            addr = line.split()[0]
            if addr not in seen:
                seen.append(addr)
        return seen

    def blackhole(self, addr: str, port: int) -> None:
        """Drop TCP SYNs to ``addr:port`` (a machine that vanished: no refusal, silence)."""
        rules = ("table inet qtr_blackhole {\n  chain input {\n"
                 "    type filter hook input priority 0; policy accept;\n"
                 f"    ip daddr {addr} tcp dport {port} drop\n  }}\n}}\n")
        self.sh("nft", "-f", "-", input=rules)
