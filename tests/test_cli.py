"""The command line: help texts, one-line errors, and the ticket flow end to end."""

from __future__ import annotations

import io
import logging
import os
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner, Result
from helpers import PY, Proc, base_env, free_port

from quictun import ticket as tk
from quictun.cli import main
from quictun.status import StatusLine, stats_line

QT = [PY, "-m", "quictun"]
COMMANDS = ["serve", "connect", "demo", "netcheck", "ssh-config"]


@pytest.fixture(autouse=True)
def _isolated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    for k in list(os.environ):
        if k.startswith("QUICTUN_"):
            monkeypatch.delenv(k)
    monkeypatch.setenv("QUICTUN_HOME", str(tmp_path / "home"))
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


def run(*args: str, env: dict[str, str] | None = None) -> Result:
    return CliRunner().invoke(main, list(args), env=env)


def one_line_error(r: Result, pattern: str) -> None:
    assert r.exit_code == 1, r.output
    assert "Traceback" not in r.output
    lines = [ln for ln in r.output.splitlines() if ln.startswith("quictun: error:")]
    assert len(lines) == 1, r.output
    assert re.search(pattern, lines[0]), lines[0]


# -- help ------------------------------------------------------------------------------
def test_group_help() -> None:
    r = run("--help")
    assert r.exit_code == 0
    for cmd in COMMANDS:
        assert cmd in r.output
    assert "QUICTUN_SECRET" in r.output and "QUICTUN_LOG_FORMAT" in r.output


@pytest.mark.parametrize("cmd", COMMANDS)
def test_command_help_shows_env_and_example(cmd: str) -> None:
    r = run(cmd, "--help")
    assert r.exit_code == 0, r.output
    assert "env var:" in r.output
    assert "Example" in r.output


def test_version() -> None:
    r = run("--version")
    assert r.exit_code == 0 and "version" in r.output


# -- error paths -----------------------------------------------------------------------
def test_connect_without_secret() -> None:
    one_line_error(run("connect", "box", "--stdio"), "no secret")


def test_connect_needs_exactly_one_mode() -> None:
    env = {"QUICTUN_SECRET": "x"}
    one_line_error(run("connect", "box", "--stdio", "--listen", "2222", env=env),
                   "exactly one of")
    one_line_error(run("connect", "box", env=env), "exactly one of")


def test_direct_and_relay_only_exclude() -> None:
    one_line_error(run("connect", "box", "--stdio", "--direct-only", "--relay-only",
                       env={"QUICTUN_SECRET": "x"}), "exclude each other")


def test_serve_bad_forward() -> None:
    one_line_error(run("serve", "box", "--forward", "nope", env={"QUICTUN_SECRET": "x"}),
                   "--forward: 'nope' is not HOST:PORT")
    one_line_error(run("serve", "box", "--forward", "127.0.0.1:70000",
                       env={"QUICTUN_SECRET": "x"}), "out of range")


def test_demo_bad_forward() -> None:
    one_line_error(run("demo", "--forward", "x:y"), "--forward")


def test_bad_ticket() -> None:
    good = tk.Ticket(url="ws://127.0.0.1:1/", name="box", secret="s",
                     fingerprint="ab" * 32).encode()
    one_line_error(run("connect", good[:-9], "--stdio"), "damaged")
    one_line_error(run("connect", "qt7" + good[3:], "--stdio"), "format version 7")
    one_line_error(run("ssh-config", good[:-9]), "damaged")


def test_unreadable_secret_file(tmp_path: Path) -> None:
    one_line_error(run("connect", "box", "--stdio", "--secret-file",
                       str(tmp_path / "missing")), "cannot read the secret file")
    empty = tmp_path / "empty"
    empty.write_text("\n")
    one_line_error(run("connect", "box", "--stdio", "--secret-file", str(empty)), "is empty")


def test_secret_flag_warns_and_relay_unreachable_is_one_line() -> None:
    url = f"ws://127.0.0.1:{free_port()}/"
    r = run("connect", "box", "--stdio", "--secret", "hunter2", "--signal", url)
    assert "warning: --secret is visible" in r.output
    one_line_error(r, "cannot reach the relay")


def test_netcheck_relay_unreachable() -> None:
    r = run("netcheck", "--signal", f"ws://127.0.0.1:{free_port()}/")
    one_line_error(r, "cannot reach the relay")


def test_netcheck_bad_url() -> None:
    one_line_error(run("netcheck", "--signal", "http://x/"), "bad relay URL")


def test_ssh_config() -> None:
    r = run("ssh-config", "laptop", "--signal", "wss://relay.example.org/")
    assert r.exit_code == 0, r.output
    assert "Host laptop\n" in r.output
    assert re.search(r"  ProxyCommand .*quictun connect %h --stdio --signal "
                     r"wss://relay\.example\.org/", r.output)
    assert "QUICTUN_SECRET" in r.output and "--secret-file" in r.output
    one_line_error(run("ssh-config", "bad name"), "not a valid name")


def test_ssh_config_from_ticket() -> None:
    t = tk.Ticket(url="ws://127.0.0.1:1/", name="box", secret="s", fingerprint="ab" * 32)
    r = run("ssh-config", t.encode())
    assert r.exit_code == 0, r.output
    assert "Host box\n" in r.output and f"connect {t.encode()} --stdio" in r.output


# -- status ----------------------------------------------------------------------------
async def test_status_spinner_on_tty(caplog: pytest.LogCaptureFixture) -> None:
    out = io.StringIO()
    st = StatusLine(out, spinner=True, interval=0.01)
    with caplog.at_level(logging.INFO, logger="quictun"):
        st("contacting the relay ws://x/")
        st("punching a path")
        import asyncio

        await asyncio.sleep(0.05)
        st("path=direct local=1.2.3.4:5 remote=5.6.7.8:9 rtt=1.0ms")
        st("path=relay rtt=-")
        st.close()
    text = out.getvalue()
    assert "punching a path" in text and text.endswith("\r\x1b[K")
    msgs = [r.getMessage() for r in caplog.records]
    assert msgs == ["path=direct local=1.2.3.4:5 remote=5.6.7.8:9 rtt=1.0ms",
                    "path=relay rtt=-"]


def test_status_plain_when_not_a_tty(caplog: pytest.LogCaptureFixture) -> None:
    out = io.StringIO()  # isatty() is False
    st = StatusLine(out)
    with caplog.at_level(logging.INFO, logger="quictun"):
        st("contacting the relay ws://x/")
        st("path=relay rtt=-")
        st.close()
    assert out.getvalue() == ""
    assert [r.getMessage() for r in caplog.records] == ["contacting the relay ws://x/",
                                                        "path=relay rtt=-"]


def test_stats_line() -> None:
    class T:
        path = None
        bytes_sent = 10
        bytes_received = 20

    assert stats_line(T()) == "stats: path=none sent=10 received=20"


# -- end to end with real processes -----------------------------------------------------
def _serve_ticket(tmp_path: Path, url: str, port: int, log: str) -> tuple[Proc, str]:
    p = Proc(QT + ["serve", "box", "--forward", f"127.0.0.1:{port}", "--signal", url],
             env=base_env(tmp_path / "srv", secret=None), log=tmp_path / log,
             stdout=subprocess.PIPE)
    assert p.p.stdout is not None
    line = p.p.stdout.readline().decode()
    m = re.fullmatch(r"quictun connect (qt1[a-z2-7]+)\n", line)
    assert m, line + p.text()
    p.wait_for(r"serving 'box'")
    return p, m.group(1)


def test_ticket_flow_no_secret_no_signal(relay, echo_server, tmp_path: Path) -> None:
    _relay, url = relay
    p1, t1 = _serve_ticket(tmp_path, url, echo_server.port, "serve1.log")
    p1.stop()
    # a restart keeps identity and secret: the same ticket
    p2, t2 = _serve_ticket(tmp_path, url, echo_server.port, "serve2.log")
    try:
        assert t2 == t1
        decoded = tk.decode(t1)
        assert decoded.url == url and decoded.name == "box"
        payload = os.urandom(200_000)
        env = base_env(tmp_path / "cli", secret=None)  # no QUICTUN_SECRET, no QUICTUN_SIGNAL
        r = subprocess.run(QT + ["connect", t1, "--stdio"], input=payload,
                           capture_output=True, env=env, timeout=60)
        assert r.returncode == 0, r.stderr.decode()
        assert r.stdout == payload
        assert b"path=" in r.stderr
    finally:
        p2.stop()


def test_connect_json_logs(relay, echo_server, tmp_path: Path) -> None:
    import json

    _relay, url = relay
    p, t = _serve_ticket(tmp_path, url, echo_server.port, "serve.log")
    try:
        r = subprocess.run(QT + ["--log-format", "json", "connect", t, "--stdio"],
                           input=b"ping", capture_output=True,
                           env=base_env(tmp_path / "cli", secret=None), timeout=60)
        assert r.returncode == 0, r.stderr.decode()
        assert r.stdout == b"ping"
        msgs = [json.loads(ln)["msg"] for ln in r.stderr.decode().splitlines()]
        assert any(m.startswith("path=") for m in msgs)
        assert any(m.startswith("contacting the relay") for m in msgs)
    finally:
        p.stop()


def test_demo_end_to_end(echo_server, tmp_path: Path) -> None:
    port = free_port()
    d = Proc(QT + ["demo", "--port", str(port), "--forward", f"127.0.0.1:{echo_server.port}"],
             env=base_env(tmp_path / "demo", secret=None), log=tmp_path / "demo.log",
             stdout=subprocess.PIPE)
    try:
        assert d.p.stdout is not None
        lines = []
        while not lines or "Ctrl-C" not in lines[-1]:
            line = d.p.stdout.readline().decode()
            assert line, d.text()
            lines.append(line)
        text = "".join(lines)
        assert f"--signal ws://127.0.0.1:{port}/' " in text and "@demo" in text
        ticket = re.search(r"connect (qt1[a-z2-7]+) --stdio", text)
        assert ticket, text
        d.wait_for(r"serving 'demo'")
        r = subprocess.run(QT + ["connect", ticket.group(1), "--stdio"], input=b"hello demo",
                           capture_output=True, env=base_env(tmp_path / "cli", secret=None),
                           timeout=60)
        assert r.returncode == 0, r.stderr.decode()
        assert r.stdout == b"hello demo"
    finally:
        d.stop()
