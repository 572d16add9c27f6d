"""``quictun import``, ``pair`` and ``ssh-config``: tickets kept by name, and ssh set up."""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING

import click

from ..config import DEFAULT_SIGNAL
from .common import (
    ENV_SIGNAL,
    SIGNAL_HELP,
    UserError,
    check_name,
    check_signal,
    decode_ticket,
    is_ticket,
    load_identity,
    load_stored,
    prog,
    run,
    store_ticket,
    verbose_option,
    warn_argv_ticket,
)

if TYPE_CHECKING:
    from ..proto.ticket import Ticket


@click.command("import")
@verbose_option
@click.argument("source", metavar="[TICKET|-]", default="-")
def import_ticket(source: str) -> None:
    """Store a ticket so that `quictun connect NAME` needs no secret on its command line.

    The ticket (relay URL, name, secret, the server's fingerprint) is kept in the config
    dir as tickets/NAME, mode 600; importing again replaces it. With `-` (the default)
    the ticket is read from stdin, so it lands neither in the process list nor in your
    shell history.

    \b
    Examples:
      quictun import              # paste the ticket, then Enter
      quictun import - < ticket.txt
      quictun connect laptop --listen 2222

    \b
    Environment:
      QUICTUN_HOME       where tickets/NAME is stored (default ~/.config/quictun)
    """
    if source == "-":
        stdin = sys.stdin
        if stdin.isatty():
            click.echo("quictun: paste the ticket, then press Enter:", err=True)
            text = stdin.readline()
        else:
            text = stdin.read()
        if not text.strip():
            raise UserError("no ticket on stdin")
        where = "stdin: "
    else:
        text, where = source, ""
    t = decode_ticket(text, where)
    if source != "-":
        warn_argv_ticket(t.name)
    _stored(t)


def _stored(t: Ticket) -> None:
    """Store ``t`` and print what to do with it."""
    path = store_ticket(t)
    exe = prog()
    click.echo(f"quictun: stored the ticket for {t.name!r} (relay {t.url}) in {path}", err=True)
    click.echo("\n".join([
        f"{exe} connect {t.name} --listen 2222     # then: ssh -p 2222 USER@127.0.0.1",
        f"ssh -o ProxyCommand='{exe} connect %h --stdio' USER@{t.name}",
        f"{exe} ssh-config {t.name} >> ~/.ssh/config     # then: ssh USER@{t.name}",
        f"{exe} connect {t.name} --list     # the services it offers (--service NAME)",
    ]))




@click.command("pair")
@verbose_option
@click.argument("code", metavar="[CODE]", required=False)
@click.option("--signal", "signal", envvar=ENV_SIGNAL, show_envvar=True,
              default=DEFAULT_SIGNAL, show_default=True, help=SIGNAL_HELP)
def pair(code: str | None, signal: str) -> None:
    """Turn the pairing code that `quictun serve NAME --pair` printed into a stored ticket.

    Without CODE it asks for it (so that it lands neither in the process list nor in the
    shell history). Case, spaces and one typo per word are forgiven. The code is single
    use: a wrong code costs one of its 3 tries, and a right one the code itself.

    \b
    Examples:
      quictun pair --signal wss://relay.example.org/     # then type 7-crossover-clockwork
      quictun connect laptop --listen 2222

    \b
    Environment:
      QUICTUN_SIGNAL     the relay the serving machine uses (see the option)
      QUICTUN_HOME       where the ticket is stored (default ~/.config/quictun)
      QUICTUN_SIGNAL_CA  CA file to trust for a wss:// relay (e.g. certs/relay.crt)
    """
    from ..aio.pairing import pair as run_pair
    from ..proto.pairing import PairingCodeError, parse

    check_signal(signal)
    if code is None:
        if sys.stdin.isatty():
            click.echo("quictun: type the pairing code, then press Enter:", err=True)
        code = sys.stdin.readline()
        if not code.strip():
            raise UserError("no pairing code given")
    try:
        parsed = parse(code)
    except PairingCodeError as exc:
        raise UserError(f"the pairing code: {exc}") from None
    ident = load_identity()
    got: list[Ticket] = []

    async def go() -> None:
        got.append(await run_pair(parsed, signal=signal, identity=ident))

    run(go())
    _stored(got[0])


@click.command("ssh-config")
@verbose_option
@click.argument("name", metavar="NAME|TICKET")
@click.option("--signal", "signal", envvar=ENV_SIGNAL, show_envvar=True,
              default=DEFAULT_SIGNAL, show_default=True, help=SIGNAL_HELP)
@click.option("--service", metavar="SERVICE",
              help="The service ssh reaches, when NAME serves several (see "
                   "`quictun connect NAME --list`).")
def ssh_config(name: str, signal: str, service: str | None) -> None:
    """Print a ~/.ssh/config block so that `ssh NAME` goes through quictun.

    The block names NAME only, never a secret. Given a ticket, it is imported first (as
    `quictun import` does), so the ProxyCommand needs nothing else.

    \b
    Examples:
      quictun ssh-config laptop >> ~/.ssh/config    # after `quictun import`
      quictun ssh-config laptop --signal wss://relay.example.org/ >> ~/.ssh/config
      quictun ssh-config home --service ssh >> ~/.ssh/config
      ssh user@laptop

    \b
    Environment:
      QUICTUN_SIGNAL     (see the option)
      QUICTUN_HOME       where the ticket for NAME is looked up (default ~/.config/quictun)
    """
    from .. import store
    from ..proto.services import valid_service_name

    exe = prog()
    if service is not None and not valid_service_name(service):
        raise UserError(f"--service {service!r}: not a service name "
                        "(1-64 of A-Z a-z 0-9 . _ -)")
    svc = f" --service {service}" if service else ""
    if is_ticket(name):
        t = decode_ticket(name)
        warn_argv_ticket(t.name)
        path = store_ticket(t)
        click.echo(f"quictun: imported the ticket for {t.name!r} into {path}", err=True)
        name = t.name
    else:
        check_name(name)
        t = load_stored(name)
    source = click.get_current_context().get_parameter_source("signal")
    if t is None and source in (None, click.core.ParameterSource.DEFAULT):
        stored = store.stored_names()
        known = f" (stored: {', '.join(stored)})" if stored else ""
        raise UserError(f"no ticket is stored for {name!r}{known}: run `quictun import -` "
                        "and paste the ticket that `quictun serve` printed, or pass --signal "
                        "URL for a block whose secret comes from QUICTUN_SECRET or "
                        "QUICTUN_SECRET_FILE")
    if t is not None:
        lines = [
            f"# quictun: reach {name!r} via {t.url}, with the ticket stored in "
            f"{store.ticket_path(name)}",
            f"Host {name}",
            f"  ProxyCommand {exe} connect %h{svc} --stdio",
        ]
    else:
        lines = [
            f"# quictun: reach {name!r} via {signal}",
            "# The secret comes from `quictun import` (then this --signal can go), or from",
            "# QUICTUN_SECRET or QUICTUN_SECRET_FILE in the environment ssh runs in (e.g.",
            "# `export QUICTUN_SECRET_FILE=~/.config/quictun/laptop.secret` in your shell",
            "# profile), or add `--secret-file PATH` to the ProxyCommand.",
            f"Host {name}",
            f"  ProxyCommand {exe} connect %h{svc} --stdio --signal {signal}",
        ]
    click.echo("\n".join(lines))
