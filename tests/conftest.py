from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from helpers import PY, Proc, TcpServer, base_env, echo  # noqa: E402


@pytest.fixture
def relay(tmp_path: Path) -> Iterator[tuple[Proc, str]]:
    """A real ``quictun-signal`` process on 127.0.0.1, port chosen by the OS."""
    p = Proc([PY, "-m", "signal_server", "--host", "127.0.0.1", "--port", "0"],
             env=base_env(tmp_path / "relay-home"), log=tmp_path / "relay.log")
    try:
        m = p.wait_for(r"listening on (ws://127\.0\.0\.1:\d+/)")
        yield p, m.group(1)
    finally:
        p.stop()


@pytest.fixture
def echo_server() -> Iterator[TcpServer]:
    s = TcpServer(echo)
    yield s
    s.close()
