"""The tools under comparison, started in a :class:`~quictun.bench.labrig.CompareLab`.

Each ``start_*`` function brings one tool's two ends up between host B (the user's side:
the local entry the probes push into) and host A (the service side: the sink), and
returns :class:`Ends`: where to push, each side's processes for CPU and RSS accounting,
and how to take one time-to-first-byte sample with a *fresh* client process while the
service side stays up:

* quictun: ``serve`` (A) and ``connect --listen`` (B) through the lab relay, engine per
  side from ``QUICTUN_ENGINE``; TTFB: a fresh ``connect NAME --stdio``.
* ``ssh -L`` (real OpenSSH; sshd in A through a hole in A's firewall); TTFB: a fresh
  ``ssh -W``, the stdio equivalent.
* holesail (its CLI, on the lab's own HyperDHT); TTFB: a fresh client process, from its
  start until a byte echoed through its local port comes back.
* raw TCP from B to A's sink (through the same hole); TTFB: connect plus one echo, no
  process start.
"""

from __future__ import annotations

import secrets
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from tests.lab.netlab import LabProcess

from .labrig import SINK_PORT, CompareLab, Side

PY = sys.executable


@dataclass
class Ends:
    """One tool's two ends, up and connected."""

    host: str  # where the probes in host B push to
    port: int
    a: Side  # service side (host A)
    b: Side  # user side (host B)
    ttfb: Callable[[], dict[str, Any]]  # one fresh-client sample: {"ttfb": s | None, ...}
    notes: dict[str, Any] = field(default_factory=dict)
    owned: list[LabProcess] = field(default_factory=list)  # stopped by stop()

    def stop(self) -> None:
        for p in reversed(self.owned):
            p.stop()


def _wait(proc: LabProcess, pattern: str, timeout: float) -> str | None:
    """The first line matching ``pattern`` within ``timeout`` s, or None."""
    try:
        return proc.wait_for_line(pattern, timeout=timeout).group(0)
    except AssertionError:
        return None


def start_quictun(cl: CompareLab, tag: str, engine_b: str | None,
                  engine_a: str | None) -> Ends:
    """quictun ``serve`` in A and ``connect --listen`` in B; None engine: the default."""
    lab = cl.lab
    name = f"cmp-{tag}"
    qt = cl.quictun_argv()
    serve = lab.spawn(lab.host_a_ns, [*qt, "serve", name, "--forward",
                                      f"127.0.0.1:{SINK_PORT}", "--signal", lab.signal_url],
                      env=cl.quictun_env("a", engine_a), name=f"serve-{tag}")
    owned = [serve]
    try:
        serve.wait_for_line(r"serving", timeout=30)
        port = cl.next_port()
        conn = lab.spawn(lab.host_b_ns, [*qt, "connect", name, "--listen",
                                         f"127.0.0.1:{port}", "--signal", lab.signal_url],
                         env=cl.quictun_env("b", engine_b), name=f"connect-{tag}")
        owned.append(conn)
        conn.wait_for_line(r"listening on", timeout=30)
        direct = _wait(conn, r"path=direct\S*", 20.0)
    except BaseException:
        for p in owned:
            p.stop()
        raise
    stdio = [*qt, "connect", name, "--stdio", "--signal", lab.signal_url]

    def ttfb() -> dict[str, Any]:
        return cl.client("stdio", cl.log_path(f"stdio-{tag}"), "--", *stdio, timeout=60,
                         env=cl.quictun_env("b", engine_b))

    return Ends("127.0.0.1", port, Side([serve]), Side([conn]), ttfb,
                notes={"path_line": direct or "never path=direct within 20 s"}, owned=owned)


def start_ssh(cl: CompareLab, tag: str) -> Ends:
    """``ssh -N -L`` in B to the sshd in A (started once by the lab)."""
    lab = cl.lab
    if cl.sshd is None:
        raise RuntimeError("sshd is not running in the lab")
    port = cl.next_port()
    ssh = lab.spawn(lab.host_b_ns, cl.ssh_argv("-N", "-o", "ExitOnForwardFailure=yes", "-L",
                                               f"127.0.0.1:{port}:127.0.0.1:{SINK_PORT}"),
                    name=f"ssh-{tag}")
    ready = cl.client("wait", str(port), "20", timeout=30)
    if not ready.get("ok"):
        ssh.stop()
        raise RuntimeError(f"ssh -L did not come up: {ready} {ssh.tail(10)}")
    stdio = cl.ssh_argv("-W", f"127.0.0.1:{SINK_PORT}")

    def ttfb() -> dict[str, Any]:
        return cl.client("stdio", cl.log_path(f"ssh-w-{tag}"), "--", *stdio, timeout=60)

    return Ends("127.0.0.1", port, Side([cl.sshd]), Side([ssh]), ttfb, owned=[ssh])


def start_holesail(cl: CompareLab, tag: str) -> Ends:
    """holesail ``--live`` in A (a fresh private key) and its client in B."""
    lab, sc = cl.lab, cl.scripts
    if sc is None:
        raise RuntimeError("holesail is not installed")
    key = "qtbench" + secrets.token_hex(16)
    env = sc.env(cl.bootstrap)
    server = lab.spawn(lab.host_a_ns, sc.server_argv(SINK_PORT, key), env=env,
                       name=f"holesail-server-{tag}")
    owned = [server]
    try:
        server.wait_for_line(r"listening on", timeout=60)
        port = cl.next_port()
        client = lab.spawn(lab.host_b_ns, sc.client_argv(key, port), env=env,
                           name=f"holesail-client-{tag}")
        owned.append(client)
        client.wait_for_line(r"Access application", timeout=60)
    except BaseException:
        for p in owned:
            p.stop()
        raise

    def ttfb() -> dict[str, Any]:
        fresh = cl.next_port()
        return cl.client("port", "127.0.0.1", str(fresh), cl.log_path(f"hs-ttfb-{tag}"),
                         "--", *sc.client_argv(key, fresh), timeout=60, env=env)

    return Ends("127.0.0.1", port, Side([server]), Side([client]), ttfb, owned=owned)


def start_raw(cl: CompareLab, tag: str) -> Ends:
    """No tunnel: B connects to A's sink directly (through the hole in A's firewall)."""
    host = cl.lab.host_a_ip4

    def ttfb() -> dict[str, Any]:
        return cl.client("port", host, str(SINK_PORT), cl.log_path(f"raw-{tag}"), timeout=60)

    return Ends(host, SINK_PORT, Side(), Side(), ttfb)
