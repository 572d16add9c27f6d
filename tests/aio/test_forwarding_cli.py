"""Forwarding modes end to end with real processes: a relay, `quictun serve` with named
TCP, Unix-socket and UDP services and an --allow rule, one `quictun connect` carrying
them all through one tunnel, and real clients (curl through SOCKS5, HTTP CONNECT and a
Unix socket; a stdlib HTTP server on a Unix socket; UDP sockets)."""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import stat
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import PY, Proc, TcpServer, base_env, echo, free_port

QT = [PY, "-m", "quictun"]
needs_curl = pytest.mark.skipif(shutil.which("curl") is None, reason="curl not installed "
                                "(apt-get install curl; .ci/run does)")

UNIX_HTTP = r"""
import http.server, os, socketserver, sys
class Handler(http.server.SimpleHTTPRequestHandler):
    def address_string(self):
        return "unix"
class Server(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True
os.chdir(sys.argv[2])
with Server(sys.argv[1], Handler) as srv:
    print("unix http listening", flush=True)
    srv.serve_forever()
"""

UDP_ECHO = r"""
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("127.0.0.1", 0))
print("udp echo on", s.getsockname()[1], flush=True)
while True:
    data, addr = s.recvfrom(65535)
    s.sendto(b"echo:" + data, addr)
"""


@pytest.fixture
def short_dir() -> Iterator[Path]:
    """A short directory for Unix socket paths (sun_path holds 107 bytes)."""
    d = Path(tempfile.mkdtemp(prefix="qtfw-"))
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def procs(tmp_path: Path) -> Iterator:
    started: list[Proc] = []

    def spawn(args: list[str], name: str, *, home: str = "srv", pre: tuple[str, ...] = (),
              python: bool = False, **kw) -> Proc:  # type: ignore[no-untyped-def]
        argv = [PY, "-c", *args] if python else [*QT, *pre, *args]
        p = Proc(argv, env=base_env(tmp_path / home), log=tmp_path / f"{name}.log", **kw)
        started.append(p)
        return p

    yield spawn
    for p in started:
        p.stop()


@pytest.fixture
def site(relay, procs, short_dir: Path, tmp_path: Path) -> Iterator[dict]:  # type: ignore[no-untyped-def]
    """The serving host: web (Unix-socket HTTP), echo (TCP), dns (UDP), an HTTP server
    on an allowed port and one on a port that is not allowed."""
    _relay, url = relay
    www = tmp_path / "www"
    www.mkdir()
    (www / "hello.txt").write_text("hello over a unix socket\n")
    web_sock = short_dir / "app.sock"
    web = procs([UNIX_HTTP, str(web_sock), str(www)], "unix-http", python=True)
    web.wait_for("unix http listening")
    udp = procs([UDP_ECHO], "udp-echo", python=True)
    udp_port = int(udp.wait_for(r"udp echo on (\d+)").group(1))
    allowed_port, denied_port = free_port(), free_port()
    http_procs: list[Proc] = []
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "ok.txt").write_text("allowed target\n")
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "ok.txt").write_text("must not be reached\n")
    for port, d in ((allowed_port, "a"), (denied_port, "d")):
        h = Proc([PY, "-m", "http.server", "--bind", "127.0.0.1", str(port), "--directory",
                  str(tmp_path / d)], env=base_env(tmp_path / "h"),
                 log=tmp_path / f"http-{d}.log")
        http_procs.append(h)
        h.wait_for("Serving HTTP")
    echo_srv = TcpServer(echo)
    serve = procs(["serve", "box", "--forward", f"web=unix:{web_sock}",
                   "--forward", f"echo=127.0.0.1:{echo_srv.port}",
                   "--forward", f"dns=udp:127.0.0.1:{udp_port}",
                   "--allow", f"localhost:{allowed_port}", "--signal", url],
                  "serve", pre=("--log-format", "json"))
    serve.wait_for("serving 'box'")
    try:
        yield {"url": url, "serve": serve, "allowed": allowed_port, "denied": denied_port,
               "tmp": tmp_path, "short": short_dir}
    finally:
        echo_srv.close()
        for h in http_procs:
            h.stop()


def _curl(*args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
    return subprocess.run(["curl", "-sS", "--max-time", "20", *args], capture_output=True,
                          text=True, timeout=30, env=env)


def test_list_shows_the_services_to_an_authenticated_client(site, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    r = subprocess.run([*QT, "connect", "box", "--list", "--signal", site["url"]],
                       capture_output=True, text=True, env=base_env(tmp_path / "cli"),
                       timeout=60)
    assert r.returncode == 0, r.stderr
    assert re.search(r"web\s+unix", r.stdout) and re.search(r"echo\s+tcp", r.stdout)
    assert re.search(r"dns\s+udp\s+\(default\)", r.stdout)
    assert f"localhost:{site['allowed']}" in r.stdout
    wrong = subprocess.run([*QT, "connect", "box", "--list", "--signal", site["url"]],
                           capture_output=True, text=True, timeout=60,
                           env=base_env(tmp_path / "cli2", secret="wrong"))
    assert wrong.returncode == 1 and "web" not in wrong.stdout
    assert "wrong secret" in wrong.stderr


@needs_curl
def test_several_services_through_one_tunnel(site, procs) -> None:  # type: ignore[no-untyped-def]
    sock = site["short"] / "web.sock"
    conn = procs(["connect", "box", "--listen", f"web=unix:{sock}", "--listen", "echo=0",
                  "--listen", "udp:0", "--socks", "127.0.0.1:0", "--signal", site["url"]],
                 "connect", home="cli")
    echo_port = int(conn.wait_for(r"listening on 127\.0\.0\.1:(\d+) \(service echo\)").group(1))
    udp_port = int(conn.wait_for(r"listening on udp:127\.0\.0\.1:(\d+)").group(1))
    socks_port = int(conn.wait_for(r"proxy on 127\.0\.0\.1:(\d+)").group(1))
    conn.wait_for(r"listening on unix:")
    assert stat.S_IMODE(os.stat(sock).st_mode) == 0o600
    # a real HTTP server on a Unix socket, reached through a Unix socket
    r = _curl("--unix-socket", str(sock), "http://box/hello.txt")
    assert r.returncode == 0 and r.stdout == "hello over a unix socket\n", r.stderr
    # SOCKS5 with the name resolved on the serving side: allowed, then not allowed
    r = _curl("--socks5-hostname", f"127.0.0.1:{socks_port}",
              f"http://localhost:{site['allowed']}/ok.txt")
    assert r.returncode == 0 and r.stdout == "allowed target\n", r.stderr
    r = _curl("--socks5-hostname", f"127.0.0.1:{socks_port}",
              f"http://localhost:{site['denied']}/ok.txt")
    assert r.returncode != 0 and "must not" not in r.stdout
    # curl names the SOCKS5 reply code: 2, "connection not allowed by ruleset"
    assert re.search(r"\(2\)|not allowed|ruleset", r.stderr, re.I), r.stderr
    # HTTP CONNECT on the same port
    r = _curl("-p", "-x", f"http://127.0.0.1:{socks_port}",
              f"http://localhost:{site['allowed']}/ok.txt")
    assert r.returncode == 0 and r.stdout == "allowed target\n", r.stderr
    r = _curl("-p", "-x", f"http://127.0.0.1:{socks_port}",
              f"http://127.0.0.1:{site['denied']}/ok.txt")
    assert r.returncode != 0 and "403" in r.stderr, r.stderr
    # TCP and UDP at the same time
    with socket.create_connection(("127.0.0.1", echo_port), timeout=20) as c:
        c.sendall(b"tcp ping\n")
        assert c.recv(100) == b"tcp ping\n"
        u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        u.settimeout(10)
        for i in range(30):
            u.sendto(b"d%d" % i, ("127.0.0.1", udp_port))
            assert u.recv(2048) == b"echo:d%d" % i
        u.close()
    denied_log = (site["tmp"] / "http-d.log").read_text()
    assert "GET" not in denied_log  # the disallowed server never saw a request
    assert re.search(r"refused proxy target localhost:\d+ .*not allowed", site["serve"].text())
    conn.stop()
    line = site["serve"].wait_for(r'\{[^\n]*"event": "client-disconnected"[^\n]*\}').group(0)
    summary = json.loads(line)
    svc = summary["services"]
    assert svc["web"]["connections"] == 1 and svc["web"]["bytes_out"] > 100
    assert svc["echo"]["connections"] == 1 and svc["echo"]["bytes_in"] == 9
    assert svc["socks"]["connections"] == 2 and svc["socks"]["refused"] == 2
    assert svc["dns"]["flows"] == 1 and svc["dns"]["datagrams_in"] == 30
    assert svc["dns"]["datagrams_out"] == 30
    assert not sock.exists()  # the listener removed its socket


def test_unix_listen_paths(site, procs, short_dir: Path, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    url = site["url"]
    regular = short_dir / "file"
    regular.write_text("keep me")
    r = subprocess.run([*QT, "connect", "box", "--listen", f"web=unix:{regular}",
                        "--signal", url], capture_output=True, text=True, timeout=60,
                       env=base_env(tmp_path / "c1"))
    assert r.returncode == 1 and regular.read_text() == "keep me"
    assert len(r.stderr.strip().splitlines()) == 1 and "not a socket" in r.stderr
    stale = short_dir / "stale.sock"
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(str(stale))
    s.close()  # the file stays, nobody listens: stale
    conn = procs(["connect", "box", "--listen", f"web=unix:{stale}", "--unix-mode", "660",
                  "--signal", url], "c2", home="c2")
    conn.wait_for("listening on unix:")
    assert stat.S_IMODE(os.stat(stale).st_mode) == 0o660
    r = _curl("--unix-socket", str(stale), "http://box/hello.txt") if shutil.which("curl") \
        else None
    assert r is None or r.stdout == "hello over a unix socket\n"
    busy = subprocess.run([*QT, "connect", "box", "--listen", f"web=unix:{stale}",
                           "--signal", url], capture_output=True, text=True, timeout=60,
                          env=base_env(tmp_path / "c3"))
    assert busy.returncode == 1 and "another program listens" in busy.stderr
    assert stale.exists()  # the first one's socket was left alone


def test_socks_needs_allow_on_the_serving_side(relay, procs, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    _p, url = relay
    target = TcpServer(echo)
    try:
        procs(["serve", "plain", "--forward", f"127.0.0.1:{target.port}", "--signal", url],
              "serve-plain").wait_for("serving 'plain'")
        r = subprocess.run([*QT, "connect", "plain", "--socks", "127.0.0.1:0", "--signal",
                            url], capture_output=True, text=True, timeout=60,
                           env=base_env(tmp_path / "c"))
        assert r.returncode == 1 and "allows no SOCKS targets" in r.stderr, r.stderr
        assert "Traceback" not in r.stderr
    finally:
        target.close()


def test_unknown_service_through_stdio_is_one_line(site, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    r = subprocess.run([*QT, "connect", "box", "--service", "nope", "--stdio", "--signal",
                        site["url"]], input=b"x", capture_output=True, timeout=60,
                       env=base_env(tmp_path / "c"))
    err = r.stderr.decode()
    assert r.returncode == 1 and "no service 'nope'" in err and "web (unix)" in err, err
    assert r.stdout == b""


@pytest.mark.parametrize(("args", "pattern"), [
    (["--listen", "127.0.0.1:0"], r"has no default stream service; name one"),
    (["--listen", "nope=127.0.0.1:0"], r"has no service 'nope' \(offered: web \(unix\)"),
    (["--listen", "dns=127.0.0.1:0"], r"the service 'dns' is udp"),
    (["--listen", "echo=udp:127.0.0.1:0"], r"the service 'echo' is tcp"),
    (["--stdio"], r"several services and none is the default: name one with --service"),
])
def test_a_mode_the_server_cannot_answer_stops_with_one_line(site, tmp_path: Path,
                                                             args: list[str],
                                                             pattern: str) -> None:  # type: ignore[no-untyped-def]
    r = subprocess.run([*QT, "connect", "box", *args, "--signal", site["url"]], input=b"",
                       capture_output=True, timeout=60, env=base_env(tmp_path / "c"))
    err = r.stderr.decode()
    errors = [ln for ln in err.splitlines() if "error:" in ln]
    assert r.returncode == 1 and len(errors) == 1 and re.search(pattern, errors[0]), err
    assert "Traceback" not in err, err


@pytest.mark.parametrize(("args", "pattern"), [
    (["--forward", "app=unix:{file}"], r"exists and is not a socket"),
    (["--forward", "app=unix:relative.sock"], r"absolute path"),
    (["--forward", "a=127.0.0.1:22", "--forward", "a=udp:127.0.0.1:53"], r"two services"),
    (["--forward", "127.0.0.1:22", "--allow", "10.0.0.1/8"], r"--allow '10.0.0.1/8'"),
    (["--forward", "127.0.0.1:22", "--allow", "nas.lan:99999"], r"ports go from 1 to 65535"),
    (["--allow", "*.lan:0-80"], r"ports go from 1"),
    ([], r"nothing to serve"),
])
def test_serve_bad_specs_are_one_line_before_the_relay(tmp_path: Path, args: list[str],
                                                       pattern: str) -> None:
    f = tmp_path / "plain-file"
    f.write_text("x")
    argv = [a.replace("{file}", str(f)) for a in args]
    r = subprocess.run([*QT, "serve", "box", *argv, "--signal", "ws://127.0.0.1:9/"],
                       capture_output=True, text=True, timeout=60,
                       env=base_env(tmp_path / "s"))
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 1 and len(lines) == 1 and re.search(pattern, lines[0]), r.stderr
    assert f.read_text() == "x"
