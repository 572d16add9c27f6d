"""``quictun demo``: a relay and a server in one process, for a first try on one machine.

Starts ``quictun-signal`` on 127.0.0.1 (in-process), serves the name ``demo`` forwarding
to a local TCP port (default 127.0.0.1:22, i.e. sshd) with a generated secret, prints
the commands to use it from another terminal (by name: the demo's ticket is stored in
the config dir, which both sides share), and runs until Ctrl-C. Needs no root.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
from collections.abc import Callable

import click

from ..config import TunnelConfig
from ..errors import TunnelError
from .common import UserError, one_line, prog, run, tunnel_config, verbose_option

log = logging.getLogger("quictun")

NAME = "demo"


def _reachable(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1):
            return True
    except OSError:
        return False


def _user() -> str:
    """This user's login name for the ssh examples (``$USER`` may be unset)."""
    import getpass

    try:
        return getpass.getuser()
    except (KeyError, OSError):  # no passwd entry and no LOGNAME/USER
        return "USER"


OVERRIDES = ("QUICTUN_SECRET", "QUICTUN_SECRET_FILE", "QUICTUN_TICKET", "QUICTUN_SIGNAL")


def instructions(url: str, ticket_file: str, forward: tuple[str, int],
                 prog: str = "quictun") -> str:
    """The text printed once the demo is up (pure, for tests).

    The commands name ``demo`` only: its ticket (relay, secret, fingerprint) is stored in
    ``ticket_file``, in the config dir both sides share on this machine."""
    host, port = forward
    lines = [
        f"quictun demo: relay {url} is up; serving {NAME!r} -> {host}:{port}",
        f"(its ticket is stored in {ticket_file}: the commands below need no secret)",
        "",
        "From another terminal on this machine:",
        "",
    ]
    if port == 22:
        user = _user()
        lines += [
            "  # ssh through the tunnel:",
            f"  ssh -o ProxyCommand='{prog} connect %h --stdio' {user}@{NAME}",
            "",
            "  # or a local port that forwards through the tunnel:",
            f"  {prog} connect {NAME} --listen 2222     # then: ssh -p 2222 {user}@127.0.0.1",
        ]
    else:
        lines += [
            f"  # a local port that forwards through the tunnel to {host}:{port}:",
            f"  {prog} connect {NAME} --listen 2222",
            "  # then point the service's client at 127.0.0.1:2222, e.g. for a web server:",
            "  curl http://127.0.0.1:2222/",
            "",
            "  # or one connection on stdin/stdout:",
            f"  {prog} connect {NAME} --stdio",
        ]
    overrides = [k for k in OVERRIDES if os.environ.get(k)]
    if overrides:
        lines += ["", f"  # {', '.join(overrides)} would override the stored ticket: first run",
                  f"  unset {' '.join(overrides)}"]
    lines += ["", "Press Ctrl-C to stop."]
    return "\n".join(lines)


async def run_demo(forward: str = "127.0.0.1:22", *, port: int = 8765,
                   echo: Callable[[str], None] = print, prog: str = "quictun",
                   config: TunnelConfig | None = None) -> None:
    """Run the relay and the server until cancelled. Raises TunnelError (one line)."""
    from signal_server.server import RelayConfig, RelayServer

    from .. import store
    from ..aio import server as api
    from ..proto import ticket
    from ..proto.addr import parse_hostport
    from ..proto.pake import box_key_of

    try:
        target = parse_hostport(forward)
    except ValueError as exc:
        raise TunnelError(f"--forward: {exc}") from None
    try:
        ident = store.load_or_create()
    except (OSError, ValueError) as exc:
        raise TunnelError(f"cannot load the identity in {store.config_dir()}: "
                          f"{one_line(exc)}") from None
    try:
        secret = store.stored_secret(NAME)
    except store.ExposedFile as exc:
        raise TunnelError(str(exc)) from None
    except OSError as exc:
        raise TunnelError(f"cannot keep the secret in {store.config_dir()}: "
                          f"{exc.strerror or one_line(exc)}") from None
    relay = RelayServer(RelayConfig(host="127.0.0.1", port=port))
    try:
        await relay.start()
    except OSError as exc:
        raise TunnelError(f"cannot start the relay on 127.0.0.1:{port}: {exc.strerror or exc} "
                          "(is another demo or quictun-signal running? try --port)") from None
    try:
        url = relay.url
        t = ticket.Ticket(url=url, name=NAME, secret=secret, fingerprint=ident.fingerprint,
                          box_key=box_key_of(ident))
        try:
            path = store.store_ticket(t)  # so that `quictun connect demo` finds relay, secret, pin
        except OSError as exc:
            raise TunnelError(f"cannot store the demo's ticket in {store.config_dir()}: "
                              f"{exc.strerror or one_line(exc)}") from None
        task = asyncio.ensure_future(api.serve(NAME, forward=forward, signal=url,
                                               secret=secret, identity=ident, config=config))
        # serve logs "serving ..." once registered; give it a moment, fail fast if it dies
        done, _ = await asyncio.wait({task}, timeout=0.5)
        if done:
            task.result()
        echo(instructions(url, str(path), target, prog))
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


@click.command()
@verbose_option
@click.option("--forward", default="127.0.0.1:22", show_default=True, metavar="HOST:PORT",
              envvar="QUICTUN_DEMO_FORWARD", show_envvar=True,
              help="The local TCP service the demo makes reachable.")
@click.option("--port", type=click.IntRange(1, 65535), default=8765, show_default=True,
              envvar="QUICTUN_DEMO_PORT", show_envvar=True,
              help="Port of the embedded relay on 127.0.0.1 (TCP and STUN UDP).")
def demo(forward: str, port: int) -> None:
    """Try quictun on one machine: an embedded relay plus `serve demo`.

    Starts a relay on 127.0.0.1:PORT, serves the name `demo` forwarding to
    HOST:PORT (sshd by default) with a generated secret, prints the ssh command to
    run in another terminal, and runs until Ctrl-C. Needs no root.

    \b
    Examples:
      quictun demo
      quictun demo --forward 127.0.0.1:8000 --port 9876

    \b
    Environment:
      QUICTUN_DEMO_FORWARD, QUICTUN_DEMO_PORT  (see the options)
      QUICTUN_HOME       identity, the demo's secret and ticket (default ~/.config/quictun)
    """
    import logging

    from ..proto.addr import parse_hostport

    if not (click.get_current_context().find_root().obj or {}).get("verbose"):
        logging.getLogger("quictun.signal").setLevel(logging.WARNING)  # the embedded relay
    try:
        parse_hostport(forward)
    except ValueError as exc:
        raise UserError(f"--forward: {exc}") from None
    run(run_demo(forward, port=port, echo=lambda text: click.echo(text, err=False),
                 config=tunnel_config(),
                  prog=prog()))
