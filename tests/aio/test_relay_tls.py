"""quictun against a ``wss://`` relay with a self-signed certificate (certs/make-certs.sh).

The relay is a real ``quictun-signal --cert --key`` process; serve and connect are real
quictun processes that trust the relay through ``QUICTUN_SIGNAL_CA``. Without it the
certificate is refused with one line that names the fix.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import PY, Proc, base_env

from quictun.aio.relay import CA_ENV, SignalClient
from quictun.errors import TunnelError
from quictun.proto import signalling as sigproto

REPO = Path(__file__).resolve().parents[2]
QT = [PY, "-m", "quictun"]

pytestmark = pytest.mark.skipif(shutil.which("openssl") is None,
                                reason="certs/make-certs.sh needs openssl (.ci/run installs it)")


@pytest.fixture
def tls_relay(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """(wss URL, relay.crt) of a real relay serving TLS with a fresh self-signed cert."""
    certs = tmp_path / "certs"
    subprocess.run(["sh", str(REPO / "certs" / "make-certs.sh"), "localhost", str(certs)],
                   check=True, capture_output=True)
    p = Proc([PY, "-m", "signal_server", "--host", "127.0.0.1", "--port", "0",
              "--cert", str(certs / "relay.crt"), "--key", str(certs / "relay.key")],
             env=base_env(tmp_path / "relay-home"), log=tmp_path / "relay.log")
    try:
        url = p.wait_for(r"listening on (wss://127\.0\.0\.1:\d+/)").group(1)
        yield url, certs / "relay.crt"
    finally:
        p.stop()


def test_serve_and_connect_through_a_self_signed_wss_relay(tls_relay, echo_server,
                                                           tmp_path: Path) -> None:
    url, crt = tls_relay
    env = {**base_env(tmp_path / "srv", signal=url), CA_ENV: str(crt)}
    serve = Proc(QT + ["serve", "box", "--forward", f"127.0.0.1:{echo_server.port}"],
                 env=env, log=tmp_path / "serve.log")
    try:
        serve.wait_for(r"serving 'box'")
        payload = os.urandom(100_000)
        cenv = {**base_env(tmp_path / "cli", signal=url), CA_ENV: str(crt)}
        r = subprocess.run(QT + ["connect", "box", "--stdio"], input=payload,
                           capture_output=True, env=cenv, timeout=60)
        assert r.returncode == 0, r.stderr.decode()
        assert r.stdout == payload
    finally:
        serve.stop()


def test_untrusted_certificate_is_one_line_naming_the_fix(tls_relay, tmp_path: Path) -> None:
    url, _crt = tls_relay
    for argv in (["netcheck"], ["connect", "box", "--stdio"]):
        r = subprocess.run(QT + [*argv, "--signal", url], capture_output=True, text=True,
                           env=base_env(tmp_path / "cli"), timeout=60, stdin=subprocess.DEVNULL)
        errors = [ln for ln in r.stderr.splitlines() if ln.startswith("quictun: error:")]
        assert r.returncode == 1, r.stderr
        assert "Traceback" not in r.stderr
        assert len(errors) == 1, r.stderr
        assert "does not trust" in errors[0] and CA_ENV in errors[0], errors[0]


async def test_signal_client_trusts_cafile_argument_and_env(tls_relay, tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch
                                                             ) -> None:
    url, crt = tls_relay
    monkeypatch.delenv(CA_ENV, raising=False)
    sc = SignalClient(url, cafile=str(crt))
    try:
        assert (await sc.open()).v == sigproto.PROTOCOL_VERSION
    finally:
        await sc.close()
    monkeypatch.setenv(CA_ENV, str(crt))
    sc = SignalClient(url)
    try:
        assert (await sc.open()).v == sigproto.PROTOCOL_VERSION
    finally:
        await sc.close()
    monkeypatch.setenv(CA_ENV, str(tmp_path / "missing.crt"))
    with pytest.raises(TunnelError, match="cannot load the relay CA file"):
        await SignalClient(url).open()


@pytest.mark.parametrize("url", ["ws://127.0.0.1:99999/", "ws://[::1/", "tcp://x/"])
async def test_library_bad_relay_url_raises_tunnel_error(url: str, tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch
                                                         ) -> None:
    import quictun

    monkeypatch.setenv("QUICTUN_HOME", str(tmp_path / "home"))
    with pytest.raises(TunnelError, match="bad relay URL"):
        async with quictun.connect("box", signal=url, secret="s"):
            pass


def test_scheme_mismatch_names_the_fix(tls_relay, relay) -> None:
    """wss:// against a plain relay, and ws:// against a TLS one: the error says which
    scheme to use instead."""
    import asyncio

    tls_url, _crt = tls_relay
    plain_url = relay[1]

    async def reason(url: str) -> str:
        with pytest.raises(TunnelError) as info:
            await SignalClient(url).open(timeout=5)
        return str(info.value)

    got = asyncio.run(reason("wss://" + plain_url.removeprefix("ws://")))
    assert f"use {plain_url}" in got, got
    got = asyncio.run(reason("ws://" + tls_url.removeprefix("wss://")))
    assert f"use {tls_url}" in got, got
