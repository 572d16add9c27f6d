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
    warn,
    warn_argv_ticket,
    warn_if_exposed,
    warn_if_local_relay,
)

if TYPE_CHECKING:
    from collections.abc import Callable

    from ..proto.pairing import PairingCode
    from ..proto.services import ListenSpec
    from ..proto.ticket import Ticket


@click.command()
@verbose_option
@click.argument("name")
@click.option("--forward", "forwards", multiple=True, metavar="[SERVICE=]TARGET",
              help="A service to make reachable (repeat for several): HOST:PORT (TCP), "
                   "udp:HOST:PORT or unix:PATH, named SERVICE= (without a name: the "
                   "default service).")
@click.option("--allow", "allows", multiple=True, metavar="HOSTS[:PORTS]",
              help="Let `connect --socks` reach these targets from here (repeat for "
                   "several): a CIDR, an address, a host name or *.domain, then ports "
                   "(22,80,8000-8999). Without --allow: no SOCKS.")
@click.option("--pair", "pair", is_flag=True,
              help="Also print a short pairing code: `quictun pair` on the other machine "
                   "turns it into the ticket (single use, 10 minutes, 3 tries).")
@common_options
def serve(name: str, forwards: tuple[str, ...], allows: tuple[str, ...], pair: bool,
          signal: str, secret_file: Path | None, secret_arg: str | None, token: str | None,
          direct_only: bool, relay_only: bool) -> None:
    """Make local services (TCP, UDP, Unix sockets) reachable as NAME.

    \b
    Examples:
      quictun serve laptop --forward 127.0.0.1:22 --pair
      QUICTUN_SECRET=$(cat ~/.tunnel-secret) quictun serve laptop --forward 127.0.0.1:22
      quictun serve home --forward ssh=127.0.0.1:22 --forward web=127.0.0.1:8080 \\
          --forward wg=udp:127.0.0.1:51820 --forward app=unix:/run/app.sock
      quictun serve home --forward 127.0.0.1:22 --allow 192.168.1.0/24:22,80,443

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
      QUICTUN_ENGINE     QUIC engine: auto (default: qh3 if installed), aioquic, qh3
      QUICTUN_PORTMAP    0: ask the router for no port mapping (--no-portmap)
      QUICTUN_UDP_OFFLOAD  Linux UDP offloads: auto (default), off, gso, gro
    """
    from .. import store
    from ..aio import server as api
    from ..proto import ticket
    from ..proto.pake import box_key_of

    check_name(name)
    check_signal(signal)
    mode = mode_of(direct_only, relay_only)
    _check_forwarding(forwards, allows)
    secret = secret_from(secret_file, secret_arg)
    ident = load_identity()
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
    on_registered, on_pairing = _announcer(name, t, generated, pairing is not None, signal)
    run(api.serve(name, forward=list(forwards), allow=list(allows), signal=signal,
                  secret=secret, mode=mode, token=token, identity=ident,
                  on_registered=on_registered, pairing=pairing, on_pairing=on_pairing,
                  known=store.KnownClients(name), config=tunnel_config()))


def _announcer(name: str, t: Ticket, generated: bool, pair: bool, signal: str
               ) -> tuple[Callable[[], None], Callable[[PairingCode], None]]:
    """The callbacks that print the ticket once the name is registered, and the pairing
    code once its name is (so that what is printed is known to work); each prints once."""
    printed: list[str] = []

    def on_registered() -> None:
        if "ticket" in printed:
            return
        printed.append("ticket")
        if generated:
            click.echo(f"quictun: the ticket for {name!r} (it holds the secret: pass it on "
                       "privately). On the other machine run `quictun import -`, paste it, "
                       f"then `quictun connect {name} --listen PORT` (or --stdio):", err=True)
            click.echo(t.encode())
            sys.stdout.flush()
            if not pair:
                warn_if_local_relay(signal)

    def on_pairing(code: PairingCode) -> None:
        from ..proto.pairing import describe_odds

        click.echo(f"quictun: pairing code for {name!r}: {code}  (single use, valid 10 "
                   f"minutes, 3 tries; a guesser's odds: {describe_odds()}). On the other "
                   "machine run `quictun pair` and type it.", err=True)
        warn_if_local_relay(signal)

    return on_registered, on_pairing


def _check_forwarding(forwards: tuple[str, ...], allows: tuple[str, ...]) -> None:
    """Malformed specs, and a unix target path that exists and is not a socket, are
    one-line errors; a unix path that does not exist yet gets a warning (the service may
    start later)."""
    import stat

    from ..aio.server import forwarding
    from ..errors import TunnelError

    try:
        table = forwarding(list(forwards), list(allows))
    except TunnelError as exc:
        raise UserError(str(exc)) from None
    for svc in table.services:
        if svc.kind == "tcp":
            _warn_if_down(svc.name, svc.host, svc.port, svc.target_text())
        if svc.kind != "unix":
            continue
        try:
            mode = os.stat(svc.path).st_mode
        except FileNotFoundError:
            warn(f"--forward {svc.name}=unix:{svc.path}: no socket there yet; clients get "
                 "'connection refused' until the service creates it")
            continue
        except OSError as exc:
            raise UserError(f"--forward unix:{svc.path}: {exc.strerror}") from None
        if not stat.S_ISSOCK(mode):
            raise UserError(f"--forward unix:{svc.path}: the path exists and is not a "
                            "socket; give the service's socket path")


def _warn_if_down(name: str, host: str, port: int, text: str) -> None:
    """Warn (as ``demo`` does) when nothing answers at a TCP target yet: ``serve`` still
    starts (the service may come later), but its clients would hear 'refused'."""
    import socket

    try:
        with socket.create_connection((host, port), timeout=1.0):
            return
    except OSError as exc:
        why = exc.strerror or ("timed out" if isinstance(exc, TimeoutError) else str(exc))
    spec = f"{name}={text}" if name != "default" else text
    warn(f"--forward {spec}: nothing answers there yet ({why}); clients are told the "
         "service refused the connection until it runs")


@click.command()
@verbose_option
@click.argument("target", metavar="[NAME|TICKET]", required=False)
@click.option("--listen", "listens", multiple=True, metavar="[SERVICE=]LOCAL",
              help="Accept here and forward (repeat for several): [HOST:]PORT (TCP), "
                   "udp:[HOST:]PORT or unix:PATH; SERVICE= picks the service (else "
                   "--service, else the default).")
@click.option("--stdio", is_flag=True,
              help="Forward one connection on stdin/stdout (ssh ProxyCommand).")
@click.option("--service", metavar="SERVICE",
              help="The service to reach (see --list); default: the server's default.")
@click.option("--socks", metavar="[HOST:]PORT",
              help="A local SOCKS5 (and HTTP CONNECT) proxy: the serving side connects "
                   "to the targets its --allow permits.")
@click.option("--list", "list_only", is_flag=True,
              help="Show the services NAME offers, and exit.")
@click.option("--unix-mode", default="600", show_default=True, metavar="OCTAL",
              help="File mode of a --listen unix: socket.")
@click.option("--ticket-file", type=click.Path(dir_okay=False, path_type=Path),
              help="File holding a ticket (instead of `quictun import`). The ticket can "
                   "also come from the QUICTUN_TICKET environment variable.")
@common_options
def connect(target: str | None, listens: tuple[str, ...], stdio: bool, service: str | None,
            socks: str | None, list_only: bool, unix_mode: str, ticket_file: Path | None,
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
      quictun connect home --list                   # the services home offers
      quictun connect home --service web --listen 8080
      quictun connect home --listen web=8080 --listen wg=udp:51820 --socks 1080
      QUICTUN_SECRET=... quictun connect laptop --stdio --signal wss://relay.example.org/

    \b
    Environment:
      QUICTUN_SIGNAL, QUICTUN_SIGNAL_TOKEN, QUICTUN_SECRET_FILE  (see the options)
      QUICTUN_SECRET     the shared secret (wins over the ticket's)
      QUICTUN_TICKET     a ticket (instead of a stored one)
      QUICTUN_HOME       identity, imported tickets (default ~/.config/quictun)
      QUICTUN_SIGNAL_CA  CA file to trust for a wss:// relay (e.g. certs/relay.crt)
      QUICTUN_ENGINE     QUIC engine: auto (default: qh3 if installed), aioquic, qh3
      QUICTUN_PORTMAP    0: ask the router for no port mapping (--no-portmap)
      QUICTUN_UDP_OFFLOAD  Linux UDP offloads: auto (default), off, gso, gro
    """
    specs, socks_at, mode_bits = _connect_modes(listens, stdio, socks, list_only, service,
                                                unix_mode)
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
                              listen=specs, stdio=stdio, socks=socks_at, service=service,
                              list_only=list_only, unix_mode=mode_bits, pin=pin,
                              box_key=box_key, on_status=status, identity=ident,
                              config=config)
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


def _connect_modes(listens: tuple[str, ...], stdio: bool, socks: str | None, list_only: bool,
                   service: str | None, unix_mode: str,
                   ) -> tuple[list[ListenSpec], tuple[str, int] | None, int]:
    """Check connect's mode options: (listen specs, socks address, unix mode)."""
    from ..proto.addr import parse_hostport
    from ..proto.services import ServiceError, parse_listen, valid_service_name

    if sum((bool(listens or socks), stdio, list_only)) != 1:
        raise UserError("give exactly one of: --listen [SERVICE=]LOCAL and/or --socks "
                        "[HOST:]PORT, --stdio, --list")
    if service is not None and not valid_service_name(service):
        raise UserError(f"--service {service!r}: not a service name "
                        "(1-64 of A-Z a-z 0-9 . _ -)")
    try:
        specs = [parse_listen(text) for text in listens]
        socks_at = parse_hostport(socks, allow_zero=True) if socks is not None else None
    except ServiceError as exc:
        raise UserError(str(exc)) from None
    except ValueError as exc:
        raise UserError(f"--socks: {exc}") from None
    try:
        mode_bits = int(unix_mode, 8)
    except ValueError:
        raise UserError(f"--unix-mode {unix_mode!r}: give an octal mode such as 600") from None
    if not 0 <= mode_bits <= 0o777:
        raise UserError(f"--unix-mode {unix_mode!r}: give an octal mode such as 600")
    return specs, socks_at, mode_bits
