"""``quictun serve`` and ``quictun connect``: the two ends of a tunnel."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import click

from .common import (
    UserError,
    check_name,
    check_signal,
    common_options,
    decode_ticket,
    is_ticket,
    load_identity,
    load_stored,
    mode_of,
    one_line,
    run,
    secret_from,
    tunnel_config,
    verbose_option,
    warn_argv_ticket,
    warn_if_exposed,
    warn_if_local_relay,
)

if TYPE_CHECKING:
    from collections.abc import Callable

    from ..proto.ticket import Ticket


@click.command()
@verbose_option
@click.argument("name")
@click.option("--forward", required=True, metavar="HOST:PORT",
              help="The local TCP service to make reachable, e.g. 127.0.0.1:22.")
@click.option("--pair", "pair", is_flag=True,
              help="Also print a short pairing code: `quictun pair` on the other machine "
                   "turns it into the ticket (single use, 10 minutes, 3 tries).")
@common_options
def serve(name: str, forward: str, pair: bool, signal: str, secret_file: Path | None,
          secret_arg: str | None, token: str | None, direct_only: bool,
          relay_only: bool) -> None:
    """Make a local TCP service reachable as NAME.

    \b
    Examples:
      quictun serve laptop --forward 127.0.0.1:22 --pair
      QUICTUN_SECRET=$(cat ~/.tunnel-secret) quictun serve laptop --forward 127.0.0.1:22

    Without a secret, one is generated (and kept, per name) and a ticket is printed on
    stdout: run `quictun import -` on the other machine and paste it there. With --pair
    a short code is printed as well: `quictun pair` on the other machine, type the code,
    and it receives the ticket through the encrypted exchange.

    \b
    Environment:
      QUICTUN_SIGNAL, QUICTUN_SIGNAL_TOKEN, QUICTUN_SECRET_FILE  (see the options)
      QUICTUN_SECRET     the shared secret (instead of a generated one)
      QUICTUN_HOME       identity, generated secrets (default ~/.config/quictun)
      QUICTUN_SIGNAL_CA  CA file to trust for a wss:// relay (e.g. certs/relay.crt)
      QUICTUN_ENGINE     QUIC engine: aioquic (default), qh3, auto
      QUICTUN_PORTMAP    0: ask the router for no port mapping (--no-portmap)
    """
    from .. import store
    from ..aio import server as api
    from ..proto import ticket
    from ..proto.addr import parse_hostport
    from ..proto.pake import box_key_of

    check_name(name)
    check_signal(signal)
    mode = mode_of(direct_only, relay_only)
    secret = secret_from(secret_file, secret_arg)
    ident = load_identity()
    try:
        parse_hostport(forward)
    except ValueError as exc:
        raise UserError(f"--forward: {exc}") from None
    generated = secret is None
    if secret is None:
        try:
            secret = store.stored_secret(name)
        except store.ExposedFile as exc:
            raise UserError(str(exc)) from None
        except OSError as exc:
            raise UserError(f"cannot keep the secret in {store.config_dir()}: "
                            f"{exc.strerror or one_line(exc)}") from None
    t = ticket.Ticket(url=signal, name=name, secret=secret, fingerprint=ident.fingerprint,
                      box_key=box_key_of(ident))
    pairing = None
    if pair:
        from ..proto.pairing import generate

        pairing = (generate(os.urandom(32)), t)
    on_registered = _announcer(name, t, generated, pairing, signal)
    run(api.serve(name, forward=forward, signal=signal, secret=secret, mode=mode,
                  token=token, identity=ident, on_registered=on_registered, pairing=pairing,
                  config=tunnel_config()))


def _announcer(name: str, t: Ticket, generated: bool,
               pairing: tuple[str, Ticket] | None, signal: str
               ) -> Callable[[], None]:
    """Return the callback that prints the ticket (and the pairing code) once the name is
    registered, so that what is printed is known to work; it prints once."""
    printed: list[bool] = []

    def on_registered() -> None:
        if printed:
            return
        printed.append(True)
        if generated:
            click.echo(f"quictun: the ticket for {name!r} (it holds the secret: pass it on "
                       "privately). On the other machine run `quictun import -`, paste it, "
                       f"then `quictun connect {name} --listen PORT` (or --stdio):", err=True)
            click.echo(t.encode())
            sys.stdout.flush()
        if pairing is not None:
            from ..proto.pairing import describe_odds

            click.echo(f"quictun: pairing code for {name!r}: {pairing[0]}  (single use, "
                       f"valid 10 minutes, 3 tries; a guesser's odds: {describe_odds()}). "
                       "On the other machine run `quictun pair` and type it.", err=True)
        if generated or pairing is not None:
            warn_if_local_relay(signal)

    return on_registered


@click.command()
@verbose_option
@click.argument("target", metavar="[NAME|TICKET]", required=False)
@click.option("--listen", metavar="[HOST:]PORT",
              help="Accept local TCP connections here and forward each one.")
@click.option("--stdio", is_flag=True,
              help="Forward one connection on stdin/stdout (ssh ProxyCommand).")
@click.option("--ticket-file", type=click.Path(dir_okay=False, path_type=Path),
              help="File holding a ticket (instead of `quictun import`). The ticket can "
                   "also come from the QUICTUN_TICKET environment variable.")
@common_options
def connect(target: str | None, listen: str | None, stdio: bool, ticket_file: Path | None,
            signal: str, secret_file: Path | None, secret_arg: str | None,
            token: str | None, direct_only: bool, relay_only: bool) -> None:
    """Connect to the peer serving NAME.

    Relay URL, secret and the server's fingerprint come from the ticket stored for NAME
    by `quictun import` (or --ticket-file, or QUICTUN_TICKET). A secret from
    QUICTUN_SECRET or --secret-file wins over the ticket's, --signal or QUICTUN_SIGNAL
    over its relay; the fingerprint is always checked. A ticket given as NAME works too,
    but other users can read it (secret included) in the process list.

    \b
    Examples:
      quictun import -                              # paste the ticket from `serve`, once
      quictun connect laptop --listen 2222          # then: ssh -p 2222 user@127.0.0.1
      ssh -o ProxyCommand='quictun connect %h --stdio' user@laptop
      QUICTUN_SECRET=... quictun connect laptop --stdio --signal wss://relay.example.org/

    \b
    Environment:
      QUICTUN_SIGNAL, QUICTUN_SIGNAL_TOKEN, QUICTUN_SECRET_FILE  (see the options)
      QUICTUN_SECRET     the shared secret (wins over the ticket's)
      QUICTUN_TICKET     a ticket (instead of a stored one)
      QUICTUN_HOME       identity, imported tickets (default ~/.config/quictun)
      QUICTUN_SIGNAL_CA  CA file to trust for a wss:// relay (e.g. certs/relay.crt)
      QUICTUN_ENGINE     QUIC engine: aioquic (default), qh3, auto
      QUICTUN_PORTMAP    0: ask the router for no port mapping (--no-portmap)
    """
    if bool(listen) == bool(stdio):
        raise UserError("give exactly one of --listen [HOST:]PORT or --stdio")
    mode = mode_of(direct_only, relay_only)
    name, t = _connect_ticket(target, ticket_file)
    secret = secret_from(secret_file, secret_arg)
    pin = box_key = None
    if t is not None:
        pin, box_key = t.fingerprint, t.box_key
        secret = secret or t.secret
        source = click.get_current_context().get_parameter_source("signal")
        if source in (None, click.core.ParameterSource.DEFAULT):
            signal = t.url
    if secret is None:
        raise UserError(f"no secret for {name!r}: run `quictun import -` and paste the ticket "
                        "that `quictun serve` printed, or set QUICTUN_SECRET or --secret-file")
    ident = load_identity()
    config = tunnel_config()
    from .run import run_connect
    from .status import StatusLine

    ctx = click.get_current_context()
    json_logs = (ctx.find_root().obj or {}).get("log_format") == "json"
    status = StatusLine(spinner=False if json_logs else None)

    async def go() -> None:
        try:
            await run_connect(name, signal=signal, secret=secret, mode=mode, token=token,
                              listen=listen, stdio=stdio, pin=pin, box_key=box_key,
                              on_status=status,
                              identity=ident, config=config)
        finally:
            status.close()

    run(go())


def _connect_ticket(target: str | None, ticket_file: Path | None) -> tuple[str, Ticket | None]:
    """(name, ticket or None) for connect: a ticket argument, --ticket-file,
    QUICTUN_TICKET, else the ticket stored for the name (if any)."""
    if target is not None and is_ticket(target):
        t = decode_ticket(target)
        warn_argv_ticket(t.name)
        return check_name(t.name), t
    t = None
    if ticket_file is not None:
        try:
            text = ticket_file.read_text()
            warn_if_exposed(ticket_file)
        except OSError as exc:
            raise UserError(f"cannot read the ticket file {ticket_file}: "
                            f"{exc.strerror or one_line(exc)}") from None
        t = decode_ticket(text, f"{ticket_file}: ")
    elif os.environ.get("QUICTUN_TICKET"):
        t = decode_ticket(os.environ["QUICTUN_TICKET"], "QUICTUN_TICKET: ")
    if t is not None:
        if target is not None and target != t.name:
            raise UserError(f"the ticket is for {t.name!r}, not {target!r}")
        return check_name(t.name), t
    if target is None:
        raise UserError("give a NAME (with a ticket stored by `quictun import`), or "
                        "--ticket-file, or QUICTUN_TICKET")
    return target, load_stored(check_name(target))
