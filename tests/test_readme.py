"""The README's commands and its library example work as printed.

* The "Set up" section has exactly two commands; the second is the line ``.ci/run`` runs.
* The first, run verbatim in a copy of the tree with nothing installed (a brand-new
  virtual environment, PATH without this one), brings up the demo, and the connect line
  the demo prints moves bytes from a shell where that environment is not active.
* The library example runs as a script (server and client), and Ctrl-C ends the server
  without a traceback.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import PY, Proc, base_env, free_port

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def _section(title: str) -> str:
    start = README.index(f"\n## {title}\n")
    end = README.find("\n## ", start + 1)
    return README[start:end if end != -1 else None]


def _blocks(text: str, lang: str) -> list[str]:
    return [b.strip() for b in re.findall(rf"```{lang}\n(.*?)```", text, re.S)]


def setup_commands() -> list[str]:
    return _blocks(_section("Set up"), "sh")


def test_exactly_two_setup_commands_and_ci_runs_the_second() -> None:
    cmds = setup_commands()
    assert len(cmds) == 2, cmds
    assert all("\n" not in c for c in cmds), "each set-up command is one line"
    assert cmds[0].endswith("quictun demo")
    assert "pytest" in cmds[1]
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert cmds[1] in ci, ".ci/run must run the README's test command verbatim"


def _copy_tree(dest: Path) -> None:
    """The files a fresh clone would have (tracked and new, not ignored)."""
    if (ROOT / ".git").exists() and shutil.which("git"):
        out = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"],
                             cwd=ROOT, capture_output=True, check=True).stdout
        for name in filter(None, out.decode().split("\0")):
            src = ROOT / name
            if src.is_file():
                (dest / name).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(src, dest / name)
    else:
        shutil.copytree(ROOT, dest, dirs_exist_ok=True, ignore=shutil.ignore_patterns(
            ".venv", "__pycache__", "*.egg-info", ".pytest_cache", ".ruff_cache"))


def _clean_env(home: Path) -> dict[str, str]:
    """A login shell's environment: no active virtual environment, no QUICTUN_*."""
    env = base_env(home / "quictun", secret=None)
    env.pop("VIRTUAL_ENV", None)
    env.pop("PYTHONPATH", None)
    venv_bin = str(Path(sys.executable).parent)
    env["PATH"] = os.pathsep.join(p for p in env.get("PATH", "").split(os.pathsep)
                                  if p and p != venv_bin)
    env["HOME"] = str(home)
    return env


@pytest.mark.timeout(600)
def test_first_setup_command_verbatim_on_a_fresh_tree(echo_server, tmp_path: Path) -> None:
    tree = tmp_path / "clone"
    _copy_tree(tree)
    assert not (tree / ".venv").exists()
    env = _clean_env(tmp_path)
    # the demo's own switches, by environment, so the command stays verbatim
    env["QUICTUN_DEMO_PORT"] = str(free_port())
    env["QUICTUN_DEMO_FORWARD"] = f"127.0.0.1:{echo_server.port}"
    shell = Proc(["bash", "-c", setup_commands()[0]], env=env, log=tmp_path / "setup.log",
                 stdout=subprocess.PIPE, cwd=tree)
    # `Proc` puts stdout in a pipe: read the demo's instructions from it
    try:
        assert shell.p.stdout is not None
        text = ""
        while "Ctrl-C" not in text:
            line = shell.p.stdout.readline().decode()
            assert line, f"the set-up command ended early:\n{shell.text()}"
            text += line
        stdio = re.search(r"^  (.+ connect demo --stdio)$", text, re.M)
        assert stdio, text
        shell.wait_for(r"serving 'demo'", timeout=60)
        argv = shlex.split(stdio.group(1))
        assert Path(argv[0]).resolve().is_relative_to(tree.resolve()), argv
        r = subprocess.run(argv, input=b"fresh tree, fresh venv", capture_output=True,
                           env=env, timeout=60)
        assert r.returncode == 0, r.stderr.decode()
        assert r.stdout == b"fresh tree, fresh venv"
        os.killpg(shell.p.pid, signal.SIGINT)
        shell.p.wait(20)
    finally:
        shell.stop()
    assert "Traceback" not in shell.text(), shell.text()


def _example(url: str, target_port: int) -> str:
    (code,) = _blocks(_section("Library"), "python")
    assert 'URL = "ws://127.0.0.1:8765/"' in code and '"127.0.0.1:8000"' in code
    return (code.replace('"ws://127.0.0.1:8765/"', repr(url))
                .replace('"127.0.0.1:8000"', repr(f"127.0.0.1:{target_port}")))


def test_library_example_runs_and_ctrl_c_is_quiet(relay, tmp_path: Path) -> None:
    from helpers import TcpServer

    def http(c) -> None:  # type: ignore[no-untyped-def]
        c.recv(65536)
        c.sendall(b"HTTP/1.0 200 OK\r\n\r\nhello from the example\n")

    target = TcpServer(http)
    script = tmp_path / "example.py"
    script.write_text(_example(relay[1], target.port))
    env = base_env(tmp_path / "home", secret=None)
    server = Proc([PY, str(script), "server"], env=env, log=tmp_path / "server.log")
    try:
        # the library logs nothing by itself: retry until the server has registered
        for _attempt in range(60):
            r = subprocess.run([PY, str(script)], capture_output=True, env=env, timeout=60)
            if r.returncode == 0 or b"no peer is serving" not in r.stderr:
                break
            time.sleep(0.5)
        assert r.returncode == 0, r.stderr.decode()
        assert b"hello from the example" in r.stdout
        os.killpg(server.p.pid, signal.SIGINT)
        assert server.p.wait(20) == 0
    finally:
        server.stop()
        target.close()
    for noise in ("Traceback", "KeyboardInterrupt", "never awaited", "Task was destroyed"):
        assert noise not in server.text(), server.text()
