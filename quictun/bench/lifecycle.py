"""Measure what a user's day costs a tunnel on loopback: ``python -m quictun.bench.lifecycle
[--runs 3] [--json PATH]``.

* **ghost**: ``connect --stdio`` (as ssh's ProxyCommand runs it) gets SIGHUP (what ssh
  sends when the session ends) or SIGKILL (a crash): seconds until ``serve`` logs that
  the client's session ended (a ghost lives until then).
* **serve restart**: ``serve`` stopped (SIGTERM, or SIGKILL) and started again at once
  while ``connect --listen`` runs: seconds until the client knows the old tunnel is gone
  (its "closed; reconnecting" line), and from the new ``serve``'s "serving" line until a
  local connection through the listener echoes again (tried every 0.2 s; a connection
  made meanwhile that waits counts as soon as it echoes).
* **relay restart**: ``quictun-signal`` stopped (SIGTERM) and started again on the same
  port while ``connect --listen`` and ``serve`` run: seconds from the new relay's
  "listening" line until ``serve`` has registered its name again, whether the running
  tunnel kept working (an echo through the listener), and until a new ``connect``
  reaches the name again (first echo of a fresh ``connect --stdio``).

Prints a markdown table (median of ``--runs``) on stdout.
"""

from __future__ import annotations

import argparse
import json
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from .rig import PY, WRAPPER, Proc, Rig

GIVE_UP = 90.0


def _seen(proc: Proc, pattern: str, since: int, timeout: float) -> float | None:
    """Monotonic time at which ``pattern`` appears in ``proc``'s log after byte offset
    ``since`` (polled every 20 ms), or None."""
    rx = re.compile(pattern)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if rx.search(proc.log.read_bytes()[since:].decode(errors="replace")):
            return time.monotonic()
        time.sleep(0.02)
    return None


def _echo(port: int, timeout: float = 40.0) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
            s.sendall(b"Eping")
            got = b""
            while len(got) < 4:
                chunk = s.recv(16)
                if not chunk:
                    return False
                got += chunk
            return got == b"ping"
    except OSError:
        return False


def ghost(rig: Rig, serve: Proc, sig: int) -> float | None:
    """Seconds from ``sig`` to ``connect --stdio`` until ``serve`` ends that session."""
    log = rig.work / f"stdio-{sig}-{time.monotonic_ns()}.log"
    with open(log, "wb") as err:
        p = subprocess.Popen([PY, "-c", WRAPPER, "connect", "box", "--stdio", "--signal",
                              rig.url], env=rig._env("cli"), stdin=subprocess.PIPE,
                             stdout=subprocess.DEVNULL, stderr=err, start_new_session=True)
    try:
        deadline = time.monotonic() + 30
        while b"path=" not in log.read_bytes() and time.monotonic() < deadline:
            time.sleep(0.02)
        time.sleep(0.5)
        since = serve.log.stat().st_size
        t0 = time.monotonic()
        p.send_signal(sig)
        seen = _seen(serve, r"disconnected after", since, GIVE_UP)
        return None if seen is None else round(seen - t0, 2)
    finally:
        if p.poll() is None:
            p.kill()
        p.wait(10)


def restart(rig: Rig, serve: Proc, conn: Proc, port: int, sig: int) -> tuple[dict[str, Any],
                                                                              Proc]:
    """Stop ``serve`` with ``sig``, start a new one at once; the figures and the new one."""
    since = conn.log.stat().st_size
    t0 = time.monotonic()
    serve.stop(sig)
    new = rig.serve("box")
    t_serving = time.monotonic()
    noticed = _seen(conn, r"closed .*; reconnecting", since, GIVE_UP)
    t_echo = None
    while time.monotonic() < t_serving + GIVE_UP:
        if _echo(port):
            t_echo = time.monotonic()
            break
        time.sleep(0.2)
    return {"noticed": None if noticed is None else round(noticed - t0, 2),
            "echo_after_restart": None if t_echo is None else round(t_echo - t_serving, 2)
            }, new


def relay_restart(rig: Rig, serve: Proc, port: int) -> dict[str, Any]:
    """Stop the relay, start a new one on the same port at once; the figures."""
    since = serve.log.stat().st_size
    relay_port = rig.url.rsplit(":", 1)[1].strip("/")
    rig.relay.stop(signal.SIGTERM)
    relay = Proc([PY, "-m", "signal_server", "--host", "127.0.0.1", "--port", relay_port,
                  "--max-per-ip", "1000"], rig.work / f"relay-{time.monotonic_ns()}.log",
                 env=rig._env("relay"))
    rig.procs.append(relay)
    rig.relay = relay
    relay.wait_for(r"listening on ws://")
    t_up = time.monotonic()
    registered = _seen(serve, r"serving 'box'", since, GIVE_UP)
    kept = _echo(port, timeout=10)
    t_new = None
    while time.monotonic() < t_up + GIVE_UP:
        try:
            rig.ttfb("box")
            t_new = time.monotonic()
            break
        except (RuntimeError, OSError):
            time.sleep(0.2)
    return {"registered": None if registered is None else round(registered - t_up, 2),
            "tunnel_kept": kept,
            "new_connect": None if t_new is None else round(t_new - t_up, 2)}


def _median(xs: list[float | None]) -> str:
    vals = [x for x in xs if x is not None]
    text = f"{statistics.median(vals):.2f}" if vals else "-"
    missing = len(xs) - len(vals)
    return text + (f" ({missing} of {len(xs)} > {GIVE_UP:.0f} s)" if missing else "")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    out: dict[str, list[Any]] = {"ghost_sighup": [], "ghost_sigkill": [],
                                 "restart_sigterm": [], "restart_sigkill": [],
                                 "relay_restart": []}
    with tempfile.TemporaryDirectory(prefix="qt-bench-life-") as tmp:
        rig = Rig(Path(tmp), {}, None)
        try:
            serve = rig.serve("box")
            for _ in range(args.runs):
                out["ghost_sighup"].append(ghost(rig, serve, signal.SIGHUP))
                out["ghost_sigkill"].append(ghost(rig, serve, signal.SIGKILL))
            conn, port = rig.listen("box")
            for _ in range(args.runs):
                for sig, key in ((signal.SIGTERM, "restart_sigterm"),
                                 (signal.SIGKILL, "restart_sigkill")):
                    fig, serve = restart(rig, serve, conn, port, sig)
                    out[key].append(fig)
                    print(f"{key}: {fig}", file=sys.stderr, flush=True)
            for _ in range(args.runs):
                fig = relay_restart(rig, serve, port)
                out["relay_restart"].append(fig)
                print(f"relay_restart: {fig}", file=sys.stderr, flush=True)
        finally:
            rig.close()
    if args.json:
        args.json.write_text(json.dumps(out, indent=2))
    rows = [
        ("ghost session after SIGHUP to connect --stdio", _median(out["ghost_sighup"])),
        ("ghost session after SIGKILL to connect --stdio", _median(out["ghost_sigkill"])),
        ("serve SIGTERM: client knows", _median([f["noticed"] for f in out["restart_sigterm"]])),
        ("serve SIGTERM + restart: echo again after", _median(
            [f["echo_after_restart"] for f in out["restart_sigterm"]])),
        ("serve SIGKILL: client knows", _median([f["noticed"] for f in out["restart_sigkill"]])),
        ("serve SIGKILL + restart: echo again after", _median(
            [f["echo_after_restart"] for f in out["restart_sigkill"]])),
        ("relay SIGTERM + restart: serve registered again after", _median(
            [f["registered"] for f in out["relay_restart"]])),
        ("relay SIGTERM + restart: a new connect works after", _median(
            [f["new_connect"] for f in out["relay_restart"]])),
        ("relay SIGTERM + restart: running tunnel kept (runs)",
         f"{sum(f['tunnel_kept'] for f in out['relay_restart'])}/{args.runs}"),
    ]
    print("| case | seconds (median) |\n|---|---|")
    for name, value in rows:
        print(f"| {name} | {value} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
