"""Startup: what a connect imports before it needs it (cli, aio.client, aio.session, quic.flow).

Structural checks only (speed is measured by the benchmark, docs/benchmark.md): importing
the CLI and the connect path must not import a QUIC engine, which a connect first needs
once the relay answers its hello (``SignalClient.open(while_waiting=load_engine)``); a
bad ``QUICTUN_ENGINE`` is then one line, from connect and from serve alike.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from helpers import PY, Proc, base_env

from quictun.quic import engines

CONNECT_PATH = ("import quictun, quictun.cli.main, quictun.cli.tunnels, quictun.cli.run, "
                "quictun.aio.client, quictun.aio.server, quictun.aio.session")


def _imported_after(code: str) -> set[str]:
    probe = code + "\nimport sys\nprint(' '.join(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                         check=True).stdout
    return set(out.split())


def test_connect_path_imports_no_quic_engine() -> None:
    mods = _imported_after(CONNECT_PATH)
    assert "quictun.aio.session" in mods  # the probe did import the connect path
    assert not {m for m in mods if m.split(".")[0] in ("aioquic", "qh3")}


def test_engine_is_loaded_on_first_use() -> None:
    mods = _imported_after("from quictun.quic import flow; flow.FlowControlledConnection")
    assert {"aioquic", "qh3"} & mods
    from quictun.quic import flow

    cls = flow.FlowControlledConnection
    assert cls is flow.connection_class() and cls.engine is engines.current()


def test_a_bad_engine_is_one_line(relay: tuple[Proc, str], tmp_path: Path) -> None:
    _proc, url = relay
    for argv in (["connect", "box", "--stdio"], ["serve", "box", "--forward", "127.0.0.1:9"]):
        env = {**base_env(tmp_path / argv[0]), "QUICTUN_ENGINE": "nonesuch"}
        r = subprocess.run([PY, "-m", "quictun", *argv, "--signal", url], input=b"",
                           capture_output=True, timeout=60, env=env)
        err = r.stderr.decode()
        errors = [ln for ln in err.splitlines() if "error:" in ln]
        assert r.returncode == 1 and len(errors) == 1, err
        assert re.search(r"unknown QUIC engine 'nonesuch'.*\(QUICTUN_ENGINE\)", errors[0]), err
        assert "Traceback" not in err
