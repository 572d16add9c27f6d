"""What a user's day does to a tunnel, with real processes and real signals (issue 11):
ssh's ProxyCommand ending through SIGHUP, SIGTERM and SIGHUP to `connect --listen`, a
`serve` stopped and started again while a local connection waits, a relay stopped
with SIGTERM, a target that is down. Outcomes are asserted, never durations: the
serving side names why each session ended (the client's own close, not an idle
timeout), data arrives intact, exit codes follow the convention."""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import PY, Proc, base_env, free_port
from sshkit import make_sshd_dir

QT = [PY, "-m", "quictun"]
SECRET = "test-secret-lifecycle"



@pytest.fixture
def procs() -> Iterator[list[Proc]]:
    started: list[Proc] = []
    yield started
    for p in started:
        p.stop()


def _serve(tmp: Path, procs: list[Proc], url: str, port: int, log: str = "serve.log",
           *extra: str) -> Proc:
    p = Proc(QT + ["serve", "box", "--forward", f"127.0.0.1:{port}", "--signal", url, *extra],
             env=base_env(tmp / "srv", SECRET), log=tmp / log)
    procs.append(p)
    p.wait_for(r"serving 'box'")
    return p


def _listen(tmp: Path, procs: list[Proc], url: str, *extra: str) -> tuple[Proc, int]:
    p = Proc(QT + ["connect", "box", "--listen", "127.0.0.1:0", "--signal", url, *extra],
             env=base_env(tmp / "cli", SECRET), log=tmp / "connect.log")
    procs.append(p)
    return p, int(p.wait_for(r"listening on 127\.0\.0\.1:(\d+)").group(1))


def _echo_through(port: int, payload: bytes, timeout: float = 60.0) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(payload)
        s.shutdown(socket.SHUT_WR)
        got = b""
        while chunk := s.recv(65536):
            got += chunk
        return got


def _ended_by_the_client(serve: Proc) -> None:
    """The serving side ended its session because the client closed it (a ghost would
    end after a minute with an idle timeout)."""
    m = serve.wait_for(r"client [0-9a-f]{16} disconnected after [\d.]+ s \(([^)]*)\)",
                       timeout=30)
    assert m.group(1) == "client closed", serve.text()


# -- 1. signals ----------------------------------------------------------------------
@pytest.mark.skipif(not (os.path.exists("/usr/sbin/sshd") and shutil.which("ssh")
                         and shutil.which("ssh-keygen") and os.geteuid() == 0),
                    reason="needs root, openssh-server and openssh-client")
def test_ssh_proxycommand_ends_the_serving_session_when_ssh_exits(
        relay, tmp_path: Path, procs: list[Proc]) -> None:
    """ssh sends its ProxyCommand SIGHUP when the session ends: `connect --stdio`
    closes the tunnel (CONNECTION_CLOSE, relay close), so `serve` ends that client's
    session at once instead of keeping a ghost."""
    _relay, url = relay
    sshdir = tmp_path / "ssh"
    port = free_port()
    cfg = make_sshd_dir(sshdir, port)
    sshd = Proc(["/usr/sbin/sshd", "-D", "-e", "-f", str(cfg)],
                env=dict(os.environ), log=tmp_path / "sshd.log")
    procs.append(sshd)
    sshd.wait_for(r"Server listening", timeout=10)
    serve = _serve(tmp_path, procs, url, port)
    env = base_env(tmp_path / "cli", SECRET, url)
    proxy = " ".join(QT) + " connect %h --stdio"
    ssh = ["ssh", "-F", "/dev/null", "-o", f"ProxyCommand={proxy}",
           "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
           "-o", "BatchMode=yes", "-o", "LogLevel=ERROR", "-i", str(sshdir / "client_key"),
           "root@box"]
    payload = os.urandom(1 << 20)
    r = subprocess.run([*ssh, "sha256sum"], input=payload, capture_output=True, env=env,
                       timeout=90)
    assert r.returncode == 0, r.stderr.decode(errors="replace")
    import hashlib

    assert r.stdout.decode().split()[0] == hashlib.sha256(payload).hexdigest()
    _ended_by_the_client(serve)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP])
def test_signals_end_connect_listen_cleanly(relay, echo_server, tmp_path: Path,
                                            procs: list[Proc], signum: int) -> None:
    """`connect --listen` on SIGTERM (systemd, kill) or SIGHUP (a closed terminal):
    its stats line, exit status 128 + the signal, and the peer's session ends at once."""
    _relay, url = relay
    serve = _serve(tmp_path, procs, url, echo_server.port)
    conn, port = _listen(tmp_path, procs, url)
    assert _echo_through(port, b"hello") == b"hello"
    stats_before = conn.text().count("stats:")
    os.kill(conn.p.pid, signum)
    assert conn.p.wait(30) == 128 + signum
    assert conn.text().count("stats:") == stats_before + 1, conn.text()
    assert "Traceback" not in conn.text()
    _ended_by_the_client(serve)


# -- 2. the serving side restarts ---------------------------------------------------------
def test_a_connection_made_while_serve_restarts_waits_for_the_new_tunnel(
        relay, echo_server, tmp_path: Path, procs: list[Proc]) -> None:
    """`serve` stopped (SIGTERM): the client hears it at once (the server's close, not
    an idle timeout) and reconnects; a local connection made while no `serve` runs
    waits, and is carried by the next tunnel once `serve` is back."""
    _relay, url = relay
    serve = _serve(tmp_path, procs, url, echo_server.port)
    conn, port = _listen(tmp_path, procs, url)
    assert _echo_through(port, b"before") == b"before"
    os.kill(serve.p.pid, signal.SIGTERM)
    assert serve.p.wait(30) == 128 + signal.SIGTERM
    conn.wait_for(r"the tunnel to 'box' closed \(server stopped\); reconnecting")
    result: list[bytes] = []
    waiting = threading.Thread(target=lambda: result.append(_echo_through(port, b"meanwhile")))
    waiting.start()
    conn.wait_for(r"reconnect failed: no peer is serving 'box'")
    _serve(tmp_path, procs, url, echo_server.port, "serve2.log")
    waiting.join(90)
    assert result == [b"meanwhile"], conn.text()
    assert _echo_through(port, b"after") == b"after"


def test_a_killed_serve_that_restarts_ends_the_old_tunnel_without_waiting_for_timers(
        relay, echo_server, tmp_path: Path, procs: list[Proc]) -> None:
    """`serve` killed (no CONNECTION_CLOSE) and started again: the relay ends the dead
    one's session ("peer restarted"); the client, which still had a direct path, pings
    it, hears nothing, and reconnects at once instead of waiting for the path to die."""
    _relay, url = relay
    serve = _serve(tmp_path, procs, url, echo_server.port)
    conn, port = _listen(tmp_path, procs, url)
    assert _echo_through(port, b"before") == b"before"
    assert "path=direct" in conn.text()
    serve.p.kill()
    serve.p.wait(30)
    _serve(tmp_path, procs, url, echo_server.port, "serve2.log")
    conn.wait_for(r"closed \('box' ended the session: peer restarted \(and it no longer "
                  r"answers directly\)\); reconnecting", timeout=60)
    assert _echo_through(port, b"after") == b"after"
    assert "Traceback" not in conn.text()


# -- 1. the relay on SIGTERM --------------------------------------------------------------
def test_relay_sigterm_closes_every_connection_and_exits_zero(echo_server, tmp_path: Path,
                                                              procs: list[Proc]) -> None:
    relay = Proc([PY, "-m", "signal_server", "--host", "127.0.0.1", "--port", "0"],
                 env=base_env(tmp_path / "relay-home"), log=tmp_path / "relay.log")
    procs.append(relay)
    url = relay.wait_for(r"listening on (ws://127\.0\.0\.1:\d+/)").group(1)
    serve = _serve(tmp_path, procs, url, echo_server.port)
    os.kill(relay.p.pid, signal.SIGTERM)
    assert relay.p.wait(30) == 0
    assert re.search(r"stopping on SIGTERM: closing 1 connections", relay.text()), relay.text()
    assert "relay stopped" in relay.text() and "Traceback" not in relay.text()
    serve.wait_for(r"lost the relay; reconnecting")


# -- 5. the service behind the tunnel is down ---------------------------------------------
def test_a_target_that_is_down_is_named_on_both_sides(relay, tmp_path: Path,
                                                      procs: list[Proc]) -> None:
    """`serve` warns at start that nothing answers at its target; each refused client
    is told which service refused (with its target), and `serve` says so at the default
    level, one line for a burst."""
    _relay, url = relay
    closed = free_port()  # nothing listens there
    serve = _serve(tmp_path, procs, url, closed)
    assert re.search(rf"warning: --forward 127\.0\.0\.1:{closed}: nothing answers there yet",
                     serve.text()), serve.text()
    env = base_env(tmp_path / "cli", SECRET, url)
    for _ in range(3):
        r = subprocess.run(QT + ["connect", "box", "--stdio"], input=b"hello",
                           capture_output=True, env=env, timeout=60)
        assert r.returncode == 1
        errors = [ln for ln in r.stderr.decode().splitlines() if "error:" in ln]
        assert len(errors) == 1, r.stderr.decode()
        assert (f"the service behind 'box' (127.0.0.1:{closed}) refused the connection"
                in errors[0]), errors[0]
    lines = re.findall(rf"could not be connected for client [0-9a-f]{{16}}: "
                       rf"127\.0\.0\.1:{closed}: Connection refused", serve.text())
    assert 1 <= len(lines) < 3, serve.text()  # logged, and a burst is one line
