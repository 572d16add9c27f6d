"""Shared helpers for integration tests: a real relay process, real quictun processes,
TCP targets on loopback. Every process is killed at teardown."""

from __future__ import annotations

import hashlib
import os
import re
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

PY = sys.executable


class Proc:
    """A subprocess whose stderr is captured to a file and searchable."""

    def __init__(self, argv: list[str], *, env: dict[str, str], log: Path,
                 stdin: int | None = subprocess.DEVNULL, stdout: int | None = None,
                 cwd: Path | None = None) -> None:
        self.log = log
        self._f = open(log, "wb")
        self.p = subprocess.Popen(argv, env=env, stdin=stdin, cwd=cwd,
                                  stdout=stdout if stdout is not None else self._f,
                                  stderr=self._f, start_new_session=True)

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_for(self, pattern: str, timeout: float = 20.0) -> re.Match[str]:
        deadline = time.monotonic() + timeout
        rx = re.compile(pattern)
        while time.monotonic() < deadline:
            m = rx.search(self.text())
            if m:
                return m
            if self.p.poll() is not None:
                m = rx.search(self.text())
                if m:
                    return m
                raise AssertionError(f"process exited ({self.p.returncode}) before "
                                     f"{pattern!r}:\n{self.text()}")
            time.sleep(0.05)
        raise AssertionError(f"timed out waiting for {pattern!r}:\n{self.text()}")

    def stop(self) -> None:
        if self.p.poll() is None:
            try:
                os.killpg(self.p.pid, 15)
                self.p.wait(5)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                try:
                    os.killpg(self.p.pid, 9)
                except ProcessLookupError:
                    pass
                self.p.wait(5)
        self._f.close()


def base_env(home: Path, secret: str | None = "test-secret-phrase",
             signal: str | None = None) -> dict:
    """The environment of a quictun process under test. Port mapping is off
    (``QUICTUN_PORTMAP=0``): tests never ask this machine's router (the lab's tests ask
    the lab's own miniupnpd)."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("QUICTUN_") and k.lower() not in ("http_proxy", "https_proxy",
                                                                  "all_proxy")}
    env["QUICTUN_HOME"] = str(home)
    env["QUICTUN_PORTMAP"] = "0"
    env["PYTHONUNBUFFERED"] = "1"
    if secret is not None:
        env["QUICTUN_SECRET"] = secret
    if signal is not None:
        env["QUICTUN_SIGNAL"] = signal
    return env


class TcpServer:
    """A threaded TCP server on 127.0.0.1 with a per-connection handler; counts accepts."""

    def __init__(self, handler) -> None:  # type: ignore[no-untyped-def]
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(128)
        self.port = self.sock.getsockname()[1]
        self.accepted = 0
        self._handler = handler
        self._stop = False
        threading.Thread(target=self._loop, daemon=True).start()

    def _loop(self) -> None:
        while not self._stop:
            try:
                c, _ = self.sock.accept()
            except OSError:
                return
            self.accepted += 1
            threading.Thread(target=self._run, args=(c,), daemon=True).start()

    def _run(self, c: socket.socket) -> None:
        try:
            self._handler(c)
        except OSError:
            pass
        finally:
            c.close()

    def close(self) -> None:
        self._stop = True
        self.sock.close()


def echo(c: socket.socket) -> None:
    while data := c.recv(65536):
        c.sendall(data)
    c.shutdown(socket.SHUT_WR)


def hash_then_reply(c: socket.socket) -> None:
    """Read until EOF, then reply with the SHA-256 hex and byte count (half-close test)."""
    h = hashlib.sha256()
    n = 0
    while data := c.recv(262144):
        h.update(data)
        n += len(data)
    c.sendall(f"{h.hexdigest()} {n}\n".encode())


def free_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    p = s.getsockname()[1]
    s.close()
    return p


def v1_ticket(url: str, name: str, secret: str, fingerprint: str) -> str:
    """A format-1 ticket as quictun 0.1 wrote it (no checks: for malformed fields that
    a format-2 encoder refuses to write)."""
    import base64
    import json

    raw = json.dumps({"u": url, "n": name, "s": secret, "f": fingerprint},
                     separators=(",", ":")).encode()
    return "qt1" + base64.b32encode(raw).decode().rstrip("=").lower()


_SIGNERS: dict = {}


def signer(owner: str):  # type: ignore[no-untyped-def]
    """The identity that plays the owner called ``owner`` in a test (one per label)."""
    from quictun.proto.identity import Identity

    return _SIGNERS.setdefault(owner, Identity.generate())


def signed_register(name: str, owner: str, challenge: str | None):  # type: ignore[no-untyped-def]
    """A protocol-2 ``register`` of ``name`` by the identity ``signer(owner)``, signed over
    the ``welcome``'s ``challenge`` (hex) of the connection it is sent on."""
    from quictun.proto import signalling as sp

    ident = signer(owner)
    assert challenge is not None, "a protocol-2 welcome carries a challenge"
    sig = ident.sign(sp.register_signed(bytes.fromhex(challenge), name))
    return sp.Register(name=name, key=ident.public_bytes.hex(), sig=sig.hex())
