"""A full NAT reset in the network lab, mid-transfer over ssh (issue 11, case 4).

A home router reboots, or a carrier NAT flushes its table: the router forgets every
mapping (``conntrack -F``) and masquerades onto new ports, for UDP **and TCP**, so the
relay's WebSocket from that site breaks as well as the direct path. The ssh session
must survive with its data intact: the peer behind the reset notices its dead relay
link within seconds, opens a new one and resumes the session there (signed with its
resume key), fresh candidates go to the other peer in-band, and the direct path is
punched again (for a symmetric NAT, by a new birthday attempt): the ssh session is kept
open after its digest until both ends of that same tunnel say the path is direct again.

Cells: a cone NAT reset on either side, a symmetric NAT reset on either side (facing a
cone). Reuses the fixtures and the sshd set-up of ``test_lab_tunnel``.
"""

from __future__ import annotations

import hashlib
import os
import random
import re
import shutil
import subprocess
import threading
import time
from pathlib import Path

import pytest
from sshkit import make_sshd_dir

from .netlab import SiteSpec
from .test_lab_tunnel import (  # noqa: F401  (pytestmark and the fixture, used by name)
    MB,
    NAME,
    REBIND_PORTS,
    LabFactory,
    Tunnel,
    TunnelFactory,
    pytestmark,
)
from .test_lab_tunnel import tunnel_factory as tunnel_factory  # noqa: F401

SIZE = 40 * MB
RESET_AFTER = 4 * MB  # bytes through the tunnel before the router forgets everything

needs_tools = pytest.mark.skipif(
    not (shutil.which("conntrack") and os.path.exists("/usr/sbin/sshd") and shutil.which("ssh")
         and shutil.which("ssh-keygen")),
    reason="needs conntrack, openssh-server and openssh-client")


def start_sshd(lab, tmp_path: Path) -> tuple[Path, int]:  # type: ignore[no-untyped-def]
    sshdir = tmp_path / "ssh"
    port = 2222
    cfg = make_sshd_dir(sshdir, port)
    sshd = lab.spawn(lab.host_a_ns, ["/usr/sbin/sshd", "-D", "-e", "-f", str(cfg)],
                     name="sshd")
    sshd.wait_for_line(r"Server listening", timeout=10)
    return sshdir, port


def ssh_argv(t: Tunnel, sshdir: Path) -> list[str]:
    proxy = f"{t.quictun} connect %h --stdio --signal {t.signal}"
    return ["ssh", "-F", "/dev/null", "-o", f"ProxyCommand={proxy}",
            "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
            "-o", "BatchMode=yes", "-o", "LogLevel=ERROR", "-o", "ServerAliveInterval=0",
            "-i", str(sshdir / "client_key"), f"root@{NAME}"]


def _last_state(text: str) -> str | None:
    """An end's latest path state in ``text`` (its log since the reset): "direct",
    "relay", "none", or "quiet" (a direct path quiet, also sending over the relay)."""
    state = None
    for line in text.splitlines():
        if m := re.search(r"path=(direct|relay|none)", line):
            state = m.group(1)
        elif "direct path quiet" in line:
            state = "quiet"
        elif "direct path answers again" in line:
            state = "direct"
    return state


@needs_tools
@pytest.mark.parametrize(("a", "b", "reset"), [
    ("cone", "cone", "a"),
    ("cone", "cone", "b"),
    ("symmetric", "cone", "a"),
    ("cone", "symmetric", "b"),
], ids=["cone-reset-serving", "cone-reset-connecting", "symmetric-reset-serving",
        "symmetric-reset-connecting"])
def test_ssh_transfer_survives_a_full_nat_reset(lab_factory: LabFactory,
                                                tunnel_factory: TunnelFactory,
                                                tmp_path: Path, a: str, b: str,
                                                reset: str) -> None:
    lab = lab_factory(SiteSpec(a, ipv6=False), SiteSpec(b, ipv6=False))
    t = tunnel_factory(lab)
    sshdir, port = start_sshd(lab, tmp_path)
    t.start_relay()
    serve = t.serve(forward=f"127.0.0.1:{port}")
    ssh = ssh_argv(t, sshdir)
    # a first session: the ssh works and the tunnel has gone direct (by birthday
    # probing where a symmetric NAT is involved)
    r = lab.run(lab.host_b_ns, [*ssh, "echo", "hello"], env=t.env("b"), timeout=90)
    assert r.returncode == 0 and r.stdout.strip() == "hello", r.stderr
    payload = random.Random(11).randbytes(SIZE)
    # the remote side prints the digest, then keeps the session (and so this tunnel) up
    # until we end it: afterwards, the same tunnel must be direct again
    err_path = tmp_path / "ssh.stderr"
    with open(err_path, "wb") as err:
        proc = subprocess.Popen(["ip", "netns", "exec", lab.host_b_ns, *ssh,
                                 "sha256sum; exec sleep 600"],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err,
                                env={**os.environ, **t.env("b")})
    digest: dict[str, bytes] = {}

    def transfer() -> None:
        assert proc.stdin is not None and proc.stdout is not None
        try:
            proc.stdin.write(payload)
            proc.stdin.close()
        except BrokenPipeError:
            return
        digest["line"] = proc.stdout.readline()

    try:
        before = lab.direct_udp_bytes() + lab.relay_tcp_bytes()
        xfer = threading.Thread(target=transfer, daemon=True)
        xfer.start()
        deadline = time.monotonic() + 120
        while lab.direct_udp_bytes() + lab.relay_tcp_bytes() - before < RESET_AFTER:
            assert time.monotonic() < deadline and xfer.is_alive(), "the transfer did not start"
            time.sleep(0.02)
        # the router forgets every mapping and moves UDP and TCP to new ports
        serve_mark, conn_mark = len(serve.output()), err_path.stat().st_size
        lab.set_masquerade_ports(reset, *REBIND_PORTS, tcp=True)
        lab.flush_conntrack(reset)
        xfer.join(400)
        line = digest.get("line", b"")
        assert line, f"the transfer hung or broke: {err_path.read_text(errors='replace')}"
        assert line.split()[0].decode() == hashlib.sha256(payload).hexdigest()
        assert proc.poll() is None, "the ssh session ended"
        # the same tunnel goes direct again (a new birthday attempt for a symmetric NAT)
        deadline = time.monotonic() + 120
        while True:
            after = [serve.output()[serve_mark:], err_path.read_text(errors="replace")[
                conn_mark:]]
            if all(_last_state(text) == "direct" for text in after) and any(
                    "path=direct" in text for text in after):
                break
            assert time.monotonic() < deadline and proc.poll() is None, \
                f"not direct again after the reset:\n{after[0]}\n---\n{after[1]}"
            time.sleep(0.5)
    finally:
        if proc.poll() is None:
            proc.terminate()  # ssh ends its ProxyCommand (connect) with SIGHUP
        proc.wait(30)
    err_text = err_path.read_text(errors="replace")
    # the relay link from the reset site broke, and the session resumed on a new one
    if reset == "a":
        assert re.search(r"session \d+ resumed on the new relay link", serve.output()), \
            serve.output()
    else:  # connect's lines reach ssh's stderr
        assert "relay link re-opened; the session resumed on it" in err_text, err_text
    # the reset really moved the TCP mapping too (the relay sees the site from 2xxxx)
    ct = lab.conntrack_list(reset)
    assert re.search(rf"tcp .* dport={lab.relay_port} .* dport=2\d{{4}}", ct), ct
