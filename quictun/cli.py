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
              show_default=True, help="Log lines for people or for machines.")
@click.version_option(package_name="quictun")
@click.pass_context
def main(ctx: click.Context, verbose: int, log_format: str) -> None:
    """Reach a TCP port on a machine behind NAT: punch UDP, run QUIC, forward TCP.

    \b
    On the machine to reach:   quictun serve laptop --forward 127.0.0.1:22
    On the other machine:      ssh -o ProxyCommand='quictun connect %h --stdio' user@laptop

    Both need the same relay (QUICTUN_SIGNAL) and secret (QUICTUN_SECRET), or use the
    ticket that `serve` prints.
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
                          "list: prefer QUICTUN_SECRET or --secret-file).")(f)
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
        secret = _stored_secret(name)
        t = ticket.Ticket(url=signal, name=name, secret=secret, fingerprint=ident.fingerprint)
        click.echo("quictun: on the other machine run (add --listen PORT or --stdio):", err=True)
        click.echo(f"quictun connect {t.encode()}")
        sys.stdout.flush()
    _run(api.serve(name, forward=forward, signal=signal, secret=secret, mode=mode,
                   token=token, identity=ident))


def _stored_secret(name: str) -> str:
    """The generated secret for ``name``, created once and kept in the config dir."""
    import secrets as _secrets

    from .identity import _write, config_dir

    path = config_dir() / "secrets" / name
    if path.exists():
        return path.read_text().strip()
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    value = _secrets.token_urlsafe(32)
    _write(path, value.encode())
    return value


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

    _run(run_connect(name, signal=signal, secret=secret, mode=mode, token=token,
                     listen=listen, stdio=stdio, pin=pin))
