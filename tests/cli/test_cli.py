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
from helpers import PY, Proc, base_env, free_port, v1_ticket

from quictun import store
from quictun.cli.main import main
from quictun.cli.status import StatusLine, stats_line
from quictun.proto import ticket as tk

QT = [PY, "-m", "quictun"]
COMMANDS = ["serve", "connect", "demo", "netcheck", "ssh-config", "pair"]


@pytest.fixture(autouse=True)
def _isolated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    for k in list(os.environ):
        if k.startswith("QUICTUN_"):
            monkeypatch.delenv(k)
    monkeypatch.setenv("QUICTUN_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("QUICTUN_PORTMAP", "0")  # never ask this machine's router
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


def runner() -> CliRunner:
    """A runner with separate stdout/stderr (the default from click 8.2 on)."""
    try:
        return CliRunner(mix_stderr=False)  # type: ignore[call-arg]  # click < 8.2
    except TypeError:
        return CliRunner()


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


# every environment variable each command reads (directly or through the library)
HELP_ENV = {
    "serve": ["QUICTUN_SIGNAL", "QUICTUN_SIGNAL_TOKEN", "QUICTUN_SECRET", "QUICTUN_SECRET_FILE",
              "QUICTUN_HOME", "QUICTUN_SIGNAL_CA", "QUICTUN_ENGINE", "QUICTUN_PORTMAP",
              "QUICTUN_UDP_OFFLOAD"],
    "connect": ["QUICTUN_SIGNAL", "QUICTUN_SIGNAL_TOKEN", "QUICTUN_SECRET",
                "QUICTUN_SECRET_FILE", "QUICTUN_TICKET", "QUICTUN_HOME", "QUICTUN_SIGNAL_CA",
                "QUICTUN_ENGINE", "QUICTUN_PORTMAP", "QUICTUN_UDP_OFFLOAD"],
    "import": ["QUICTUN_HOME"],
    "demo": ["QUICTUN_DEMO_FORWARD", "QUICTUN_DEMO_PORT", "QUICTUN_HOME"],
    "netcheck": ["QUICTUN_SIGNAL", "QUICTUN_SIGNAL_TOKEN", "QUICTUN_SIGNAL_CA",
                 "QUICTUN_PORTMAP"],
    "ssh-config": ["QUICTUN_SIGNAL", "QUICTUN_HOME"],
    "pair": ["QUICTUN_SIGNAL", "QUICTUN_HOME", "QUICTUN_SIGNAL_CA"],
}


@pytest.mark.parametrize("cmd", sorted(HELP_ENV))
def test_command_help_shows_env_and_example(cmd: str) -> None:
    r = run(cmd, "--help")
    assert r.exit_code == 0, r.output
    missing = [v for v in HELP_ENV[cmd] if not re.search(rf"\b{v}\b", r.output)]
    assert not missing, f"{cmd} --help does not name {missing}"
    assert "Example" in r.output


def test_help_covers_every_command() -> None:
    assert set(HELP_ENV) == set(main.commands)


def test_import_help() -> None:
    assert "import" in run("--help").output
    r = run("import", "--help")
    assert r.exit_code == 0 and "Example" in r.output and "stdin" in r.output


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
    one_line_error(run("serve", "box", "--forward", "::1", env={"QUICTUN_SECRET": "x"}),
                   r"IPv6 address in brackets, e\.g\. \[::1\]:22")


def test_demo_bad_forward() -> None:
    one_line_error(run("demo", "--forward", "x:y"), "--forward")


def test_bad_ticket() -> None:
    good = tk.Ticket(url="ws://127.0.0.1:1/", name="box", secret="s",
                     fingerprint="ab" * 32).encode()
    one_line_error(run("connect", good[:-9], "--stdio"), "damaged")
    one_line_error(run("connect", "qt7" + good[3:], "--stdio"), "format version 7")
    one_line_error(run("ssh-config", good[:-9]), "damaged")


BAD_URLS = ["ws://127.0.0.1:99999/", "ws://[::1/", "http://127.0.0.1:8765/", "ws:///"]


@pytest.mark.parametrize("url", BAD_URLS)
def test_bad_relay_url_is_one_line(url: str) -> None:
    env = {"QUICTUN_SECRET": "x"}
    one_line_error(run("connect", "box", "--stdio", "--signal", url, env=env), "bad relay URL")
    one_line_error(run("netcheck", "--signal", url), "bad relay URL")
    r = run("serve", "box", "--forward", "127.0.0.1:22", "--signal", url)
    one_line_error(r, "bad relay URL")
    assert "qt2" not in r.output  # no ticket naming a relay that cannot work


def test_ticket_with_bad_relay_url_is_one_line() -> None:
    bad = v1_ticket(url="ws://h:99999/", name="box", secret="s", fingerprint="ab" * 32)
    one_line_error(run("connect", "--stdio", env={"QUICTUN_TICKET": bad}),
                   "QUICTUN_TICKET: this ticket carries a bad relay URL")
    one_line_error(run("import", bad), "bad relay URL")


def test_serve_prints_no_ticket_before_the_name_is_registered() -> None:
    r = runner().invoke(main, ["serve", "box", "--forward", "127.0.0.1:22",
                               "--signal", f"ws://127.0.0.1:{free_port()}/"])
    assert r.exit_code == 1
    assert r.stdout == ""  # the relay was unreachable: a ticket would not work
    assert "cannot reach the relay" in r.stderr and "Traceback" not in r.stderr


def test_json_log_format_covers_errors_and_warnings() -> None:
    import json

    r = runner().invoke(main, ["--log-format", "json", "connect", "box", "--stdio",
                               "--secret", "a-long-enough-secret", "--signal", "ws://h:99999/"])
    assert r.exit_code == 1
    records = [json.loads(ln) for ln in r.stderr.splitlines()]  # every line is JSON
    loud = [(x["level"], x["msg"]) for x in records if x["level"] != "info"]
    assert [lv for lv, _ in loud] == ["warning", "error"], loud
    assert "--secret is visible" in loud[0][1] and "bad relay URL" in loud[1][1]


def test_listen_on_a_busy_port_fails_before_contacting_the_relay() -> None:
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        r = run("connect", "box", "--listen", f"127.0.0.1:{port}",
                "--signal", f"ws://127.0.0.1:{free_port()}/", env={"QUICTUN_SECRET": "x"})
    one_line_error(r, f"cannot listen on 127.0.0.1:{port}")  # not 'cannot reach the relay'


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


def test_netcheck_json_relay_unreachable_prints_an_object() -> None:
    import json

    url = f"ws://127.0.0.1:{free_port()}/"
    r = runner().invoke(main, ["netcheck", "--json", "--signal", url])
    assert r.exit_code == 1
    report = json.loads(r.stdout)
    assert report["relay_url"] == url and "cannot reach the relay" in report["error"]


def test_verbose_after_the_subcommand() -> None:
    r = run("connect", "box", "--stdio", "-v")
    assert "No such option" not in r.output
    one_line_error(r, "no secret")
    assert run("netcheck", "-vv", "--help").exit_code == 0


@pytest.mark.parametrize("url, cause", [
    ("ws://127.0.0.1:8765/ ", "contains a space"),
    ("ws://127.0.0.1:8765/\n", "control character"),
])
def test_relay_url_with_whitespace_names_the_cause(url: str, cause: str) -> None:
    one_line_error(run("netcheck", "--signal", url), cause)


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


def test_ssh_config_names_this_installation_and_refuses_unknown_names() -> None:
    """The ProxyCommand runs this installation's quictun by absolute path (ssh runs it
    where no virtual environment is active); a name without a ticket and without
    --signal is a one-line error, not a block that cannot work."""
    t = tk.Ticket(url="ws://127.0.0.1:1/", name="box", secret="s3cret", fingerprint="ab" * 32)
    store.store_ticket(t)
    r = run("ssh-config", "box")
    assert r.exit_code == 0, r.output
    cmd = re.search(r"  ProxyCommand (\S+)", r.output)
    assert cmd and os.path.isabs(cmd.group(1)) and os.access(cmd.group(1), os.X_OK), r.output
    one_line_error(run("ssh-config", "bxo"), r"no ticket is stored for 'bxo' \(stored: box\)")


def test_ssh_config_from_ticket_imports_it(tmp_path: Path) -> None:
    t = tk.Ticket(url="ws://127.0.0.1:1/", name="box", secret="s3cret", fingerprint="ab" * 32)
    r = runner().invoke(main, ["ssh-config", t.encode()])
    assert r.exit_code == 0, r.output + r.stderr
    assert "imported the ticket for 'box'" in r.stderr
    assert "Host box\n" in r.stdout
    assert re.search(r"  ProxyCommand .*quictun connect %h --stdio\n", r.stdout)
    assert "qt2" not in r.stdout and "s3cret" not in r.stdout and "--signal" not in r.stdout
    assert store.load_ticket("box") == t
    # later, by name: the stored ticket is found, the block stays name-only
    r = run("ssh-config", "box")
    assert r.exit_code == 0 and "connect %h --stdio\n" in r.output and "--signal" not in r.output


# -- tickets: import, stored tickets, warnings -----------------------------------------
T = tk.Ticket(url="ws://127.0.0.1:1/", name="box", secret="s3cret", fingerprint="ab" * 32)


def _no_secret_in_output(r: Result) -> None:
    assert "s3cret" not in r.stdout and "qt2" not in r.stdout


def test_import_from_argv(tmp_path: Path) -> None:
    r = runner().invoke(main, ["import", T.encode()])
    assert r.exit_code == 0, r.output + r.stderr
    assert "stored the ticket for 'box'" in r.stderr
    assert "warning: a ticket on the command line" in r.stderr
    assert re.search(r"quictun connect box --listen 2222", r.stdout)
    assert "ProxyCommand='" in r.stdout and "connect %h --stdio' USER@box" in r.stdout
    _no_secret_in_output(r)
    path = tmp_path / "home" / "tickets" / "box"
    assert tk.decode(path.read_text()) == T
    assert path.stat().st_mode & 0o077 == 0
    assert path.parent.stat().st_mode & 0o077 == 0


@pytest.mark.parametrize("args", [["import", "-"], ["import"]])
def test_import_from_stdin(tmp_path: Path, args: list[str]) -> None:
    r = runner().invoke(main, args, input=f"\n  {T.encode()}\n")
    assert r.exit_code == 0, r.output + r.stderr
    _no_secret_in_output(r)
    assert store.load_ticket("box") == T
    # importing again replaces the ticket
    t2 = tk.Ticket(url="ws://127.0.0.1:2/", name="box", secret="other", fingerprint="cd" * 32)
    r = runner().invoke(main, args, input=t2.encode())
    assert r.exit_code == 0 and store.load_ticket("box") == t2


def test_import_errors(tmp_path: Path) -> None:
    one_line_error(CliRunner().invoke(main, ["import", "-"], input=""), "no ticket on stdin")
    one_line_error(run("import", T.encode()[:-9]), "damaged")
    one_line_error(CliRunner().invoke(main, ["import"], input="hello\n"),
                   "stdin: this is not a quictun ticket")
    for bad in ("..", ".", "../x", "a/b"):
        evil = v1_ticket(url="ws://x/", name=bad, secret="s", fingerprint="ab" * 32)
        one_line_error(run("import", evil), "not a valid name")
    assert not (tmp_path / "home").exists()
    # the config dir cannot be written: one line, no traceback
    (tmp_path / "file").write_text("")
    one_line_error(run("import", T.encode(), env={"QUICTUN_HOME": str(tmp_path / "file")}),
                   "cannot store the ticket in .*: Not a directory")


def test_connect_uses_stored_ticket() -> None:
    """No secret, no --signal: relay URL and secret come from the stored ticket."""
    url = f"ws://127.0.0.1:{free_port()}/"
    t = tk.Ticket(url=url, name="box", secret="s3cret", fingerprint="ab" * 32)
    store.store_ticket(t)
    r = run("connect", "box", "--stdio")
    assert "warning" not in r.output
    one_line_error(r, f"cannot reach the relay at {re.escape(url)}")
    # --signal on the command line wins over the ticket's relay
    other = f"ws://127.0.0.1:{free_port()}/"
    one_line_error(run("connect", "box", "--stdio", "--signal", other),
                   f"cannot reach the relay at {re.escape(other)}")


def test_connect_ticket_in_argv_warns() -> None:
    url = f"ws://127.0.0.1:{free_port()}/"
    t = tk.Ticket(url=url, name="box", secret="s3cret", fingerprint="ab" * 32)
    r = runner().invoke(main, ["connect", t.encode(), "--stdio"])
    warnings = [ln for ln in r.stderr.splitlines() if "warning" in ln]
    assert len(warnings) == 1, r.stderr
    assert "process list" in warnings[0] and "quictun import" in warnings[0]
    assert re.search(r"cannot reach the relay at " + re.escape(url), r.stderr)
    assert "Traceback" not in r.stderr


def test_connect_ticket_file_and_env(tmp_path: Path) -> None:
    url = f"ws://127.0.0.1:{free_port()}/"
    t = tk.Ticket(url=url, name="box", secret="s3cret", fingerprint="ab" * 32)
    f = tmp_path / "t.txt"
    f.write_text(t.encode() + "\n")
    f.chmod(0o644)
    r = run("connect", "--ticket-file", str(f), "--stdio")
    assert re.search(r"warning: .*t\.txt is readable by other users.*chmod 600", r.output)
    one_line_error(r, f"cannot reach the relay at {re.escape(url)}")
    f.chmod(0o600)
    for args, env in ((["--ticket-file", str(f)], None),
                      (["box", "--ticket-file", str(f)], None),
                      ([], {"QUICTUN_TICKET": t.encode()})):
        r = run("connect", *args, "--stdio", env=env)
        assert "warning" not in r.output
        one_line_error(r, f"cannot reach the relay at {re.escape(url)}")
    one_line_error(run("connect", "other", "--ticket-file", str(f), "--stdio"),
                   "the ticket is for 'box', not 'other'")
    one_line_error(run("connect", "--ticket-file", str(tmp_path / "nope"), "--stdio"),
                   "cannot read the ticket file")
    one_line_error(run("connect", "--stdio"), "give a NAME")
    one_line_error(run("connect", "--stdio", env={"QUICTUN_TICKET": "junk"}),
                   "QUICTUN_TICKET: this is not a quictun ticket")


def test_a_short_secret_is_warned_about_and_a_long_one_is_not() -> None:
    url = f"ws://127.0.0.1:{free_port()}/"
    for secret, warned in (("hunter2", True), ("correct-horse-battery", False)):
        r = run("connect", "box", "--stdio", "--signal", url, env={"QUICTUN_SECRET": secret})
        assert bool(re.search(r"warning: the secret is short \(7 characters\).*about 300 a day",
                              r.output)) == warned, r.output
        assert secret not in r.output  # never echoed
        one_line_error(r, f"cannot reach the relay at {re.escape(url)}")


def test_stored_ticket_damaged_is_one_line(tmp_path: Path) -> None:
    d = tmp_path / "home" / "tickets"
    d.mkdir(parents=True)
    (d / "box").write_text("qt1garbage")
    one_line_error(run("connect", "box", "--stdio"), "readable by other users.*chmod 600")
    (d / "box").chmod(0o600)
    one_line_error(run("connect", "box", "--stdio"), "stored ticket .*box")


@pytest.mark.parametrize("name", ["..", ".", "...", "a/b"])
def test_dot_names_are_refused(name: str, tmp_path: Path) -> None:
    one_line_error(run("serve", name, "--forward", "127.0.0.1:22"), "not a valid name")
    one_line_error(run("connect", name, "--stdio"), "not a valid name")
    one_line_error(run("ssh-config", name), "not a valid name")
    assert not (tmp_path / "home").exists()


def test_serve_config_dir_unwritable(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")
    one_line_error(run("serve", "box", "--forward", "127.0.0.1:22",
                       env={"QUICTUN_HOME": str(tmp_path / "file")}),
                   "cannot load the identity")


@pytest.mark.parametrize("content", [b"garbage", b"-----BEGIN PRIVATE KEY-----\nAAAA\n"
                                     b"-----END PRIVATE KEY-----\n", b""])
def test_corrupt_identity_is_one_line(tmp_path: Path, content: bytes) -> None:
    home = tmp_path / "home"
    home.mkdir()
    key = home / "identity.key"
    key.write_bytes(content)
    key.chmod(0o600)
    env = {"QUICTUN_SECRET": "x", "QUICTUN_SIGNAL": f"ws://127.0.0.1:{free_port()}/"}
    one_line_error(run("connect", "box", "--stdio", env=env), "cannot load the identity")
    one_line_error(run("serve", "box", "--forward", "127.0.0.1:22", env=env),
                   "cannot load the identity")


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
    m = re.fullmatch(r"(qt2[a-z2-7]+)\n", line)
    assert m, line + p.text()
    p.wait_for(r"serving 'box'")
    assert "quictun import -" in p.text()
    return p, m.group(1)


def test_ticket_flow_no_secret_no_signal(relay, echo_server, tmp_path: Path) -> None:
    _relay, url = relay
    p1, t1 = _serve_ticket(tmp_path, url, echo_server.port, "serve1.log")
    # the ticket names ws://127.0.0.1:...: serve says another machine cannot use it
    p1.wait_for("only this machine can reach")
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
        assert b"warning: a ticket on the command line" in r.stderr
    finally:
        p2.stop()


def test_import_then_connect_by_name(relay, echo_server, tmp_path: Path) -> None:
    """`quictun import -` once, then `quictun connect box --stdio`: no secret, no --signal,
    no ticket in argv, and the server's fingerprint is still pinned."""
    _relay, url = relay
    p, t = _serve_ticket(tmp_path, url, echo_server.port, "serve.log")
    try:
        env = base_env(tmp_path / "cli", secret=None)
        r = subprocess.run(QT + ["import", "-"], input=t.encode() + b"\n",
                           capture_output=True, env=env, timeout=30)
        assert r.returncode == 0, r.stderr.decode()
        assert b"connect box --listen 2222" in r.stdout and b"qt2" not in r.stdout
        payload = os.urandom(100_000)
        r = subprocess.run(QT + ["connect", "box", "--stdio"], input=payload,
                           capture_output=True, env=env, timeout=60)
        assert r.returncode == 0, r.stderr.decode()
        assert r.stdout == payload
        assert b"warning" not in r.stderr
        # a stored ticket with another fingerprint: the pin is enforced (also with an
        # explicit secret from the environment)
        d = tk.decode(t)
        tk_bad = tk.Ticket(url=d.url, name="box", secret=d.secret, fingerprint="ab" * 32)
        env2 = base_env(tmp_path / "cli2", secret=d.secret)
        r = subprocess.run(QT + ["import", "-"], input=tk_bad.encode().encode(),
                           capture_output=True, env=env2, timeout=30)
        assert r.returncode == 0, r.stderr.decode()
        r = subprocess.run(QT + ["connect", "box", "--stdio"], input=b"x",
                           capture_output=True, env=env2, timeout=60)
        assert r.returncode == 1 and r.stdout == b""
        errors = [ln for ln in r.stderr.decode().splitlines() if "error:" in ln]
        assert len(errors) == 1 and "Traceback" not in r.stderr.decode(), r.stderr.decode()
    finally:
        p.stop()


def test_connect_json_logs(relay, echo_server, tmp_path: Path) -> None:
    import json

    _relay, url = relay
    p, t = _serve_ticket(tmp_path, url, echo_server.port, "serve.log")
    try:
        env = base_env(tmp_path / "cli", secret=None)
        env["QUICTUN_TICKET"] = t
        r = subprocess.run(QT + ["--log-format", "json", "connect", "--stdio"],
                           input=b"ping", capture_output=True, env=env, timeout=60)
        assert r.returncode == 0, r.stderr.decode()
        assert r.stdout == b"ping"
        msgs = [json.loads(ln)["msg"] for ln in r.stderr.decode().splitlines()]
        assert any(m.startswith("path=") for m in msgs)
        assert any(m.startswith("contacting the relay") for m in msgs)
    finally:
        p.stop()


SHUTDOWN_NOISE = ("Traceback", "never awaited", "Task was destroyed", "Exception ignored")


def _read_instructions(d: Proc) -> str:
    assert d.p.stdout is not None
    lines: list[str] = []
    while not lines or "Ctrl-C" not in lines[-1]:
        line = d.p.stdout.readline().decode()
        assert line, d.text()
        lines.append(line)
    return "".join(lines)


def test_demo_end_to_end(echo_server, tmp_path: Path) -> None:
    """The printed commands work as pasted, in another terminal of the same user where
    quictun's virtual environment is not active (PATH without it); Ctrl-C then ends the
    demo with exit status 130 and no traceback or asyncio warning."""
    import shlex
    import signal
    import socket

    port = free_port()
    env = base_env(tmp_path / "demo", secret=None)
    d = Proc(QT + ["demo", "--port", str(port), "--forward", f"127.0.0.1:{echo_server.port}"],
             env=env, log=tmp_path / "demo.log", stdout=subprocess.PIPE)
    other_terminal = dict(env, PATH="/usr/bin:/bin")
    try:
        text = _read_instructions(d)
        assert "qt2" not in text and "--signal" not in text
        assert "ssh" not in text, "not an ssh service: no ssh commands"
        stdio = re.search(r"^  (.+ connect demo --stdio)$", text, re.M)
        listen = re.search(r"^  (.+ connect demo --listen 2222)$", text, re.M)
        assert stdio and listen, text
        assert "curl http://127.0.0.1:2222/" in text
        d.wait_for(r"serving 'demo'")
        argv = shlex.split(stdio.group(1))
        assert os.path.isabs(argv[0]), argv
        r = subprocess.run(argv, input=b"hello demo", capture_output=True,
                           env=other_terminal, timeout=60)
        assert r.returncode == 0, r.stderr.decode()
        assert r.stdout == b"hello demo"
        assert b"warning" not in r.stderr
        # the --listen line, on a free port
        lport = free_port()
        argv = shlex.split(listen.group(1).replace("2222", str(lport)))
        c = Proc(argv, env=other_terminal, log=tmp_path / "listen.log")
        try:
            c.wait_for(r"listening on")
            with socket.create_connection(("127.0.0.1", lport), timeout=10) as sock:
                sock.sendall(b"via listen")
                sock.shutdown(socket.SHUT_WR)
                got = b""
                while chunk := sock.recv(65536):
                    got += chunk
            assert got == b"via listen"
            # Ctrl-C (SIGINT to the process group, as a terminal sends it) with a client
            # still connected
            os.killpg(d.p.pid, signal.SIGINT)
            assert d.p.wait(20) == 130
        finally:
            c.stop()
    finally:
        d.stop()
    log = d.text()
    for noise in SHUTDOWN_NOISE:
        assert noise not in log, log


def test_demo_ssh_instructions_without_user(monkeypatch: pytest.MonkeyPatch) -> None:
    """With $USER unset the ssh lines still name a user (a bare `$USER@` would be an ssh
    usage error once pasted)."""
    import getpass

    from quictun.cli.demo import instructions

    monkeypatch.delenv("USER", raising=False)
    text = instructions("ws://127.0.0.1:8765/", "/x/tickets/demo", ("127.0.0.1", 22),
                        prog="/v/bin/quictun")
    assert "$USER" not in text
    assert f"connect %h --stdio' {getpass.getuser()}@demo" in text
    assert "/v/bin/quictun connect demo --listen 2222" in text


def test_demo_instructions_mention_overrides(monkeypatch: pytest.MonkeyPatch) -> None:
    from quictun.cli.demo import instructions

    text = instructions("ws://127.0.0.1:8765/", "/x/tickets/demo", ("127.0.0.1", 22))
    assert "unset" not in text and "connect %h --stdio' " in text
    monkeypatch.setenv("QUICTUN_SECRET", "x")
    text = instructions("ws://127.0.0.1:8765/", "/x/tickets/demo", ("127.0.0.1", 22))
    assert "unset QUICTUN_SECRET" in text


def test_pair_flow_through_the_cli(relay, echo_server, tmp_path: Path) -> None:
    """`serve --pair` prints a code once registered; `quictun pair` (the code on stdin)
    stores the ticket; `connect NAME` then needs nothing else. A mistyped code is one
    line and costs a try."""
    _proc, url = relay
    s = Proc(QT + ["serve", "box", "--forward", f"127.0.0.1:{echo_server.port}", "--pair",
                   "--signal", url], env=base_env(tmp_path / "srv", secret=None),
             log=tmp_path / "serve.log")
    try:
        code = s.wait_for(r"pairing code for 'box': (\d+-[a-z]+-[a-z]+) ").group(1)
        cli = base_env(tmp_path / "cli", secret=None)
        wrong = code.rsplit("-", 1)[0] + "-zzzzz"
        r = subprocess.run(QT + ["pair", "--signal", url], input=wrong.encode(),
                           capture_output=True, env=cli, timeout=60)
        assert r.returncode == 1 and b"Traceback" not in r.stderr
        assert b"pairing code" in r.stderr  # "zzzzz" is no word: refused before the relay
        r = subprocess.run(QT + ["pair", "--signal", url], input=code.upper().encode(),
                           capture_output=True, env=cli, timeout=60)
        assert r.returncode == 0, r.stderr.decode()
        assert b"stored the ticket for 'box'" in r.stderr
        r = subprocess.run(QT + ["connect", "box", "--stdio"], input=b"paired cli",
                           capture_output=True, env=cli, timeout=60)
        assert r.returncode == 0, r.stderr.decode()
        assert r.stdout == b"paired cli"
        s.wait_for(r"paired client [0-9a-f]{16} for 'box'")
    finally:
        s.stop()


def test_a_second_serve_with_the_same_identity_takes_over_and_the_first_exits(
        relay, echo_server, tmp_path: Path) -> None:
    """Never a silent orphan: the relay hands the name to the newer `serve` (the same
    identity: a restart, or a copy started by mistake) and tells the older one, which
    stops with one line and exit status 1. Connections then reach the newer one."""
    _proc, url = relay
    env = base_env(tmp_path / "same-home", signal=url)
    argv = QT + ["serve", "box", "--forward", f"127.0.0.1:{echo_server.port}"]
    first = Proc(argv, env=env, log=tmp_path / "first.log")
    second = None
    try:
        first.wait_for(r"serving 'box'")
        second = Proc(argv, env=env, log=tmp_path / "second.log")
        second.wait_for(r"serving 'box'")
        assert first.p.wait(30) == 1
        lines = [ln for ln in first.text().splitlines() if ln.startswith("quictun: error:")]
        assert len(lines) == 1 and "took over 'box'" in lines[0], first.text()
        assert "Traceback" not in first.text()
        r = subprocess.run(QT + ["connect", "box", "--stdio"], input=b"to the second",
                           capture_output=True, env=base_env(tmp_path / "cli", signal=url),
                           timeout=60)
        assert r.returncode == 0 and r.stdout == b"to the second", r.stderr.decode()
        second.wait_for(r"client [0-9a-f]{16} connected")
    finally:
        first.stop()
        if second is not None:
            second.stop()


@pytest.mark.parametrize("cmd", [["connect", "box", "--stdio"],
                                 ["serve", "box", "--forward", "127.0.0.1:9"]])
def test_an_unknown_udp_offload_is_one_line(cmd: list[str]) -> None:
    r = run(*cmd, "--signal", "ws://127.0.0.1:9/",
            env={"QUICTUN_UDP_OFFLOAD": "turbo", "QUICTUN_SECRET": "s" * 24})
    one_line_error(r, r"unknown UDP offload 'turbo'; choose one of auto, off, gso, gro "
                      r"\(QUICTUN_UDP_OFFLOAD\)")
