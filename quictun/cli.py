"""The ``quictun`` command line. Heavy imports happen inside commands so ``--help`` is instant."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import click

SIGNAL_HELP = "Relay URL (ws:// or wss://)."
ENV_SIGNAL = "QUICTUN_SIGNAL"
DEFAULT_SIGNAL = "ws://127.0.0.1:8765/"


class UserError(click.ClickException):
    """One line on stderr, exit status 1, no traceback."""

    def show(self, file: object = None) -> None:
        click.echo(f"quictun: error: {self.format_message()}", err=True)


def _setup_logging(verbose: int, fmt: str) -> None:
    import json
    import logging
    import time

    class JsonFormatter(logging.Formatter):
        def format(self, record: logging.LogRecord) -> str:
            return json.dumps({"ts": round(time.time(), 3), "level": record.levelname.lower(),
                               "logger": record.name, "msg": record.getMessage()})

    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("quictun: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.DEBUG if verbose > 1 else logging.INFO)
    if verbose < 2:
        for noisy in ("websockets", "quic", "asyncio"):
            logging.getLogger(noisy).setLevel(logging.WARNING)
    if verbose == 0:
        logging.getLogger("quictun.forward").setLevel(logging.WARNING)
        logging.getLogger("quictun.tunnel").setLevel(logging.WARNING)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-v", "--verbose", count=True, help="More detail (-vv for debugging).")
@click.option("--log-format", type=click.Choice(["text", "json"]), default="text",
              show_default=True, envvar="QUICTUN_LOG_FORMAT", show_envvar=True,
              help="Log lines for people or for machines.")
@click.version_option(package_name="quictun")
@click.pass_context
def main(ctx: click.Context, verbose: int, log_format: str) -> None:
    """Reach a TCP port on a machine behind NAT: punch UDP, run QUIC, forward TCP.

    \b
    On the machine to reach:   quictun serve laptop --forward 127.0.0.1:22
    On the other machine:      ssh -o ProxyCommand='quictun connect %h --stdio' user@laptop

    Both need the same relay (QUICTUN_SIGNAL) and secret (QUICTUN_SECRET), or use the
    ticket that `serve` prints. First time? Run `quictun demo`.

    \b
    Environment: QUICTUN_SIGNAL (relay URL), QUICTUN_SECRET / QUICTUN_SECRET_FILE (shared
    secret), QUICTUN_SIGNAL_TOKEN (relay token), QUICTUN_HOME (identity and generated
    secrets; default ~/.config/quictun), QUICTUN_LOG_FORMAT (text or json).
    """
    ctx.obj = {"verbose": verbose, "log_format": log_format}
    _setup_logging(verbose, log_format)


def _common(f):  # type: ignore[no-untyped-def]
    f = click.option("--signal", "signal", envvar=ENV_SIGNAL, show_envvar=True,
                     default=DEFAULT_SIGNAL, show_default=True, help=SIGNAL_HELP)(f)
    f = click.option("--secret-file", type=click.Path(dir_okay=False, path_type=Path),
                     envvar="QUICTUN_SECRET_FILE", show_envvar=True,
                     help="File holding the shared secret.")(f)
    f = click.option("--secret", "secret_arg", metavar="SECRET",
                     help="The shared secret (visible to other users in the process "
                          "list: prefer the QUICTUN_SECRET environment variable or "
                          "--secret-file).")(f)
    f = click.option("--token", envvar="QUICTUN_SIGNAL_TOKEN", show_envvar=True,
                     help="The relay's access token, if it requires one.")(f)
    f = click.option("--direct-only", is_flag=True, help="Never use the relay for data.")(f)
    f = click.option("--relay-only", is_flag=True,
                     help="Always relay data through the signalling server.")(f)
    return f


def _mode(direct_only: bool, relay_only: bool) -> str:
    if direct_only and relay_only:
        raise UserError("--direct-only and --relay-only exclude each other")
    return "direct" if direct_only else "relay" if relay_only else "auto"


def _secret(secret_file: Path | None, secret_arg: str | None) -> str | None:
    if secret_file is not None:
        try:
            text = secret_file.read_text().strip()
        except OSError as exc:
            raise UserError(f"cannot read the secret file {secret_file}: {exc.strerror}") from None
        if not text:
            raise UserError(f"the secret file {secret_file} is empty")
        return text
    if secret_arg:
        click.echo("quictun: warning: --secret is visible to other users in the process "
                   "list; prefer QUICTUN_SECRET or --secret-file", err=True)
        return secret_arg
    return os.environ.get("QUICTUN_SECRET") or None


def _run(coro) -> None:  # type: ignore[no-untyped-def]
    import asyncio

    from .errors import TunnelError

    try:
        asyncio.run(coro)
    except TunnelError as exc:
        raise UserError(str(exc)) from None
    except KeyboardInterrupt:
        sys.exit(130)


@main.command()
@click.argument("name")
@click.option("--forward", required=True, metavar="HOST:PORT",
              help="The local TCP service to make reachable, e.g. 127.0.0.1:22.")
@_common
def serve(name: str, forward: str, signal: str, secret_file: Path | None,
          secret_arg: str | None, token: str | None, direct_only: bool,
          relay_only: bool) -> None:
    """Make a local TCP service reachable as NAME.

    \b
    Example:
      QUICTUN_SECRET=$(cat ~/.tunnel-secret) quictun serve laptop --forward 127.0.0.1:22

    Without a secret, one is generated (and kept, per name) and a ready-to-paste
    `quictun connect <ticket>` line is printed.
    """
    from . import api, identity, ticket

    mode = _mode(direct_only, relay_only)
    secret = _secret(secret_file, secret_arg)
    try:
        ident = identity.load_or_create()
    except (OSError, ValueError) as exc:
        raise UserError(f"cannot load the identity in {identity.config_dir()}: {exc}") from None
    try:
        api.parse_hostport(forward)
    except ValueError as exc:
        raise UserError(f"--forward: {exc}") from None
    if secret is None:
        secret = ticket.stored_secret(name)
        t = ticket.Ticket(url=signal, name=name, secret=secret, fingerprint=ident.fingerprint)
        click.echo("quictun: on the other machine run (add --listen PORT or --stdio):", err=True)
        click.echo(f"quictun connect {t.encode()}")
        sys.stdout.flush()
    _run(api.serve(name, forward=forward, signal=signal, secret=secret, mode=mode,
                   token=token, identity=ident))


@main.command()
@click.argument("target", metavar="NAME|TICKET")
@click.option("--listen", metavar="[HOST:]PORT",
              help="Accept local TCP connections here and forward each one.")
@click.option("--stdio", is_flag=True,
              help="Forward one connection on stdin/stdout (ssh ProxyCommand).")
@_common
def connect(target: str, listen: str | None, stdio: bool, signal: str,
            secret_file: Path | None, secret_arg: str | None, token: str | None,
            direct_only: bool, relay_only: bool) -> None:
    """Connect to the peer serving NAME (or described by TICKET).

    \b
    Examples:
      quictun connect laptop --listen 2222        # then: ssh -p 2222 user@127.0.0.1
      ssh -o ProxyCommand='quictun connect %h --stdio' user@laptop
      quictun connect qt1... --listen 8080         # a ticket from `quictun serve`
    """
    from . import ticket as tk

    if bool(listen) == bool(stdio):
        raise UserError("give exactly one of --listen [HOST:]PORT or --stdio")
    mode = _mode(direct_only, relay_only)
    secret = _secret(secret_file, secret_arg)
    name, pin = target, None
    if target.startswith("qt") and tk.looks_like_ticket(target):
        try:
            t = tk.decode(target)
        except tk.TicketError as exc:
            raise UserError(str(exc)) from None
        name, pin = t.name, t.fingerprint
        secret = secret or t.secret
        if signal == DEFAULT_SIGNAL and not os.environ.get(ENV_SIGNAL):
            signal = t.url
    if secret is None:
        raise UserError("no secret: set QUICTUN_SECRET or --secret-file, or paste the "
                        "ticket that `quictun serve` printed")
    from .run import run_connect
    from .status import StatusLine

    ctx = click.get_current_context()
    json_logs = (ctx.find_root().obj or {}).get("log_format") == "json"
    status = StatusLine(spinner=False if json_logs else None)

    async def go() -> None:
        try:
            await run_connect(name, signal=signal, secret=secret, mode=mode, token=token,
                              listen=listen, stdio=stdio, pin=pin, on_status=status)
        finally:
            status.close()

    _run(go())


@main.command()
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
    """
    import logging

    from . import api
    from .demo import run_demo

    if not (click.get_current_context().find_root().obj or {}).get("verbose"):
        logging.getLogger("quictun.signal").setLevel(logging.WARNING)  # the embedded relay
    try:
        api.parse_hostport(forward)
    except ValueError as exc:
        raise UserError(f"--forward: {exc}") from None
    _run(run_demo(forward, port=port, echo=lambda text: click.echo(text, err=False),
                  prog=_prog()))


@main.command()
@click.option("--signal", "signal", envvar=ENV_SIGNAL, show_envvar=True,
              default=DEFAULT_SIGNAL, show_default=True, help=SIGNAL_HELP)
@click.option("--token", envvar="QUICTUN_SIGNAL_TOKEN", show_envvar=True,
              help="The relay's access token, if it requires one.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def netcheck(signal: str, token: str | None, as_json: bool) -> None:
    """Check what this network allows: UDP, NAT mapping, IPv6, relay round trip.

    Asks the relay's two STUN reflectors for this machine's public address; if both
    see the same address the NAT keeps one mapping per socket, and direct tunnels
    work with most peers.

    \b
    Examples:
      quictun netcheck --signal wss://relay.example.org/
      quictun netcheck --json | jq .verdict
    """
    from . import netcheck as nc

    async def go() -> nc.Report:
        return nc.report(await nc.probe(signal, token=token))

    import asyncio

    from .errors import TunnelError

    try:
        rep = asyncio.run(go())
    except TunnelError as exc:
        raise UserError(str(exc)) from None
    except KeyboardInterrupt:
        sys.exit(130)
    click.echo(rep.to_json() if as_json else rep.to_text())


def _prog() -> str:
    """How to run quictun from a shell: ``quictun`` if on PATH, else this Python."""
    import shlex
    import shutil

    return "quictun" if shutil.which("quictun") else f"{shlex.quote(sys.executable)} -m quictun"


@main.command("ssh-config")
@click.argument("name", metavar="NAME|TICKET")
@click.option("--signal", "signal", envvar=ENV_SIGNAL, show_envvar=True,
              default=DEFAULT_SIGNAL, show_default=True, help=SIGNAL_HELP)
def ssh_config(name: str, signal: str) -> None:
    """Print a ~/.ssh/config block so that `ssh NAME` goes through quictun.

    \b
    Examples:
      quictun ssh-config laptop --signal wss://relay.example.org/ >> ~/.ssh/config
      ssh user@laptop
    """
    from . import sigproto
    from . import ticket as tk

    prog = _prog()
    if name.startswith("qt") and tk.looks_like_ticket(name):
        try:
            t = tk.decode(name)
        except tk.TicketError as exc:
            raise UserError(str(exc)) from None
        lines = [
            f"# quictun: reach {t.name!r} via {t.url}",
            "# This block holds a ticket, which includes the secret: keep this file private.",
            f"Host {t.name}",
            f"  ProxyCommand {prog} connect {name} --stdio",
        ]
    else:
        if not sigproto.valid_name(name):
            raise UserError(f"{name!r} is not a valid name (1-64 of A-Z a-z 0-9 . _ -)")
        lines = [
            f"# quictun: reach {name!r} via {signal}",
            "# The secret comes from QUICTUN_SECRET or QUICTUN_SECRET_FILE in the environment",
            "# ssh runs in (e.g. `export QUICTUN_SECRET_FILE=~/.config/quictun/laptop.secret`",
            "# in your shell profile), or add `--secret-file PATH` to the ProxyCommand.",
            f"Host {name}",
            f"  ProxyCommand {prog} connect %h --stdio --signal {signal}",
        ]
    click.echo("\n".join(lines))
