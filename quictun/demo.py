"""``quictun demo``: a relay and a server in one process, for a first try on one machine.

Starts ``quictun-signal`` on 127.0.0.1 (in-process), serves the name ``demo`` forwarding
to a local TCP port (default 127.0.0.1:22, i.e. sshd) with a generated secret, prints
the commands to use it from another terminal, and runs until Ctrl-C. Needs no root.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shlex
import socket
from collections.abc import Callable

from .errors import TunnelError

log = logging.getLogger("quictun")

NAME = "demo"


def _reachable(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1):
            return True
    except OSError:
        return False


def instructions(url: str, ticket: str, secret_file: str, forward: tuple[str, int],
                 prog: str = "quictun") -> str:
    """The text printed once the demo is up (pure, for tests)."""
    user = os.environ.get("USER") or "$USER"
    host, port = forward
    tf = shlex.quote(secret_file)
    lines = [
        f"quictun demo: relay {url} is up; serving {NAME!r} -> {host}:{port}",
        "",
        "From another terminal on this machine:",
        "",
        "  # ssh through the tunnel (the ticket carries relay, name and secret):",
        f"  ssh -o ProxyCommand='{prog} connect {ticket} --stdio' {user}@{NAME}",
        "",
        "  # or by name, with the secret from its file:",
        f"  export QUICTUN_SECRET_FILE={tf}",
        f"  ssh -o ProxyCommand='{prog} connect {NAME} --stdio --signal {url}' {user}@{NAME}",
        "",
        "  # or a local port that forwards through the tunnel:",
        f"  {prog} connect {ticket} --listen 2222     # then: ssh -p 2222 {user}@127.0.0.1",
        "",
        "Press Ctrl-C to stop.",
    ]
    return "\n".join(lines)


async def run_demo(forward: str = "127.0.0.1:22", *, port: int = 8765,
                   echo: Callable[[str], None] = print, prog: str = "quictun") -> None:
    """Run the relay and the server until cancelled. Raises TunnelError (one line)."""
    from signal_server.server import RelayConfig, RelayServer

    from . import api, identity, ticket

    try:
        target = api.parse_hostport(forward)
    except ValueError as exc:
        raise TunnelError(f"--forward: {exc}") from None
    try:
        ident = identity.load_or_create()
        secret = ticket.stored_secret(NAME)
    except (OSError, ValueError) as exc:
        raise TunnelError(f"cannot load the identity in {identity.config_dir()}: {exc}") \
            from None
    relay = RelayServer(RelayConfig(host="127.0.0.1", port=port))
    try:
        await relay.start()
    except OSError as exc:
        raise TunnelError(f"cannot start the relay on 127.0.0.1:{port}: {exc.strerror or exc} "
                          "(is another demo or quictun-signal running? try --port)") from None
    try:
        url = relay.url
        t = ticket.Ticket(url=url, name=NAME, secret=secret, fingerprint=ident.fingerprint)
        task = asyncio.ensure_future(api.serve(NAME, forward=forward, signal=url,
                                               secret=secret, identity=ident))
        # serve logs "serving ..." once registered; give it a moment, fail fast if it dies
        done, _ = await asyncio.wait({task}, timeout=0.5)
        if done:
            task.result()
        echo(instructions(url, t.encode(), str(ticket.secret_path(NAME)), target, prog))
        if not _reachable(*target):
            log.warning("nothing is listening on %s:%d yet: start sshd there, or use "
                        "--forward HOST:PORT", *target)
        await task
    finally:
        if "task" in locals() and not task.done():
            task.cancel()
            with contextlib.suppress(BaseException):
                await task
        await relay.stop()
