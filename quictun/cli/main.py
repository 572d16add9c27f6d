"""The ``quictun`` command line. Heavy imports happen inside commands so ``--help`` is instant."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import click

SIGNAL_HELP = "Relay URL (ws:// or wss://)."
ENV_SIGNAL = "QUICTUN_SIGNAL"
DEFAULT_SIGNAL = "ws://127.0.0.1:8765/"


_JSON_LOGS = [False]  # set by --log-format json: errors and warnings as JSON lines too


def _say(level: str, message: str) -> None:
    """One ``quictun: LEVEL: message`` line on stderr, or a JSON log line in json mode."""
    if _JSON_LOGS[0]:
        import logging

        logging.getLogger("quictun").log(logging.getLevelName(level.upper()), "%s", message)
    else:
        click.echo(f"quictun: {level}: {message}", err=True)


def _warn(message: str) -> None:
    _say("warning", message)


class UserError(click.ClickException):
    """One line on stderr, exit status 1, no traceback."""

    def show(self, file: object = None) -> None:
        _say("error", self.format_message())


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
    _JSON_LOGS[0] = fmt == "json"
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

    Both need the same relay (QUICTUN_SIGNAL) and secret (QUICTUN_SECRET), or run
    `quictun import -` on the other machine and paste the ticket that `serve` prints.
    First time? Run `quictun demo`.

    \b
    Environment: QUICTUN_SIGNAL (relay URL), QUICTUN_SECRET / QUICTUN_SECRET_FILE (shared
    secret), QUICTUN_TICKET (a ticket), QUICTUN_SIGNAL_TOKEN (relay token), QUICTUN_HOME
    (identity, generated secrets, imported tickets; default ~/.config/quictun),
    QUICTUN_SIGNAL_CA (CA file for a wss:// relay with its own certificate),
    QUICTUN_ENGINE (QUIC engine: aioquic, qh3 or auto), QUICTUN_LOG_FORMAT (text or json).
    """
    ctx.obj = {"verbose": verbose, "log_format": log_format}
    _setup_logging(verbose, log_format)


def _more_verbose(ctx: click.Context, _param: click.Parameter, count: int) -> None:
    """``-v`` after the subcommand counts like ``-v`` before it."""
    if count:
        obj = ctx.find_root().obj
        obj["verbose"] += count
        _setup_logging(obj["verbose"], obj["log_format"])


verbose_option = click.option("-v", "--verbose", count=True, expose_value=False,
                              is_eager=True, callback=_more_verbose,
                              help="More detail (-vv for debugging).")


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
        _warn("--secret is visible to other users in the process list; prefer "
              "QUICTUN_SECRET or --secret-file")
        return secret_arg
    return os.environ.get("QUICTUN_SECRET") or None


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


def _load_identity():  # type: ignore[no-untyped-def]
    from ..proto import identity

    try:
        return identity.load_or_create()
    except (OSError, ValueError) as exc:
        raise UserError(f"cannot load the identity in {identity.config_dir()}: "
                        f"{_one_line(exc)}") from None


def _check_name(name: str) -> str:
    from ..proto import ticket as tk

    try:
        return tk.check_name(name)
    except tk.InvalidName as exc:
        raise UserError(str(exc)) from None


def _decode(text: str, where: str = ""):  # type: ignore[no-untyped-def]
    from ..proto import ticket as tk

    try:
        return tk.decode(text)
    except tk.TicketError as exc:
        raise UserError(f"{where}{exc}") from None


def _check_signal(url: str) -> str:
    """``url`` if it is a well-formed relay URL, else a one-line UserError."""
    from ..aio.relay import parse_relay_url
    from ..errors import TunnelError

    try:
        parse_relay_url(url)
    except TunnelError as exc:
        raise UserError(f"--signal / QUICTUN_SIGNAL: {exc}") from None
    return url


def _warn_if_local_relay(url: str) -> None:
    """A ticket naming a loopback or unspecified relay cannot work on another machine."""
    import ipaddress

    from ..aio.relay import parse_relay_url

    host = parse_relay_url(url)[1]
    try:
        ip = ipaddress.ip_address(host)
        local = ip.is_loopback or ip.is_unspecified
    except ValueError:
        local = host.lower() == "localhost"
    if local:
        _warn(f"the ticket names the relay {url}, which only this machine can reach; for "
              "another machine pass --signal (or set QUICTUN_SIGNAL) with an address it "
              "can reach")


def _is_ticket(text: str) -> bool:
    from ..proto import ticket as tk

    return text.startswith("qt") and tk.looks_like_ticket(text)


def _store(t):  # type: ignore[no-untyped-def]
    """Store ticket ``t`` in the config dir; returns the path. One-line errors."""
    from ..proto import ticket as tk

    try:
        return tk.store(t)
    except tk.InvalidName as exc:
        raise UserError(f"the ticket's name: {exc}") from None
    except OSError as exc:
        raise UserError(f"cannot store the ticket in {exc.filename or tk.ticket_path(t.name)}: "
                        f"{exc.strerror or _one_line(exc)}") from None


def _load_stored(name: str):  # type: ignore[no-untyped-def]
    from ..proto import ticket as tk

    try:
        return tk.load_stored(name)
    except tk.TicketError as exc:
        raise UserError(str(exc)) from None
    except OSError as exc:
        raise UserError(f"cannot read the stored ticket {exc.filename}: "
                        f"{exc.strerror or _one_line(exc)}") from None


def _run(coro) -> None:  # type: ignore[no-untyped-def]
    import asyncio

    from ..errors import TunnelError

    try:
        asyncio.run(coro)
    except TunnelError as exc:
        raise UserError(str(exc)) from None
    except KeyboardInterrupt:
        sys.exit(130)


@main.command()
@verbose_option
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

    Without a secret, one is generated (and kept, per name) and a ticket is printed on
    stdout: run `quictun import -` on the other machine and paste it there.

    \b
    Environment:
      QUICTUN_SIGNAL, QUICTUN_SIGNAL_TOKEN, QUICTUN_SECRET_FILE  (see the options)
      QUICTUN_SECRET     the shared secret (instead of a generated one)
      QUICTUN_HOME       identity, generated secrets (default ~/.config/quictun)
      QUICTUN_SIGNAL_CA  CA file to trust for a wss:// relay (e.g. certs/relay.crt)
      QUICTUN_ENGINE     QUIC engine: aioquic (default), qh3, auto
    """
    from ..aio import client as api
    from ..proto import identity, ticket
    from ..proto.addr import parse_hostport

    _check_name(name)
    _check_signal(signal)
    mode = _mode(direct_only, relay_only)
    secret = _secret(secret_file, secret_arg)
    ident = _load_identity()
    try:
        parse_hostport(forward)
    except ValueError as exc:
        raise UserError(f"--forward: {exc}") from None
    on_registered = None
    if secret is None:
        try:
            secret = ticket.stored_secret(name)
        except OSError as exc:
            raise UserError(f"cannot keep the secret in {identity.config_dir()}: "
                            f"{exc.strerror or _one_line(exc)}") from None
        t = ticket.Ticket(url=signal, name=name, secret=secret, fingerprint=ident.fingerprint)
        printed: list[bool] = []

        def on_registered() -> None:
            """Print the ticket once the name is registered (so it is known to work)."""
            if printed:
                return
            printed.append(True)
            click.echo(f"quictun: the ticket for {name!r} (it holds the secret: pass it on "
                       "privately). On the other machine run `quictun import -`, paste it, "
                       f"then `quictun connect {name} --listen PORT` (or --stdio):", err=True)
            click.echo(t.encode())
            sys.stdout.flush()
            _warn_if_local_relay(signal)

    _run(api.serve(name, forward=forward, signal=signal, secret=secret, mode=mode,
                   token=token, identity=ident, on_registered=on_registered))


@main.command()
@verbose_option
@click.argument("target", metavar="[NAME|TICKET]", required=False)
@click.option("--listen", metavar="[HOST:]PORT",
              help="Accept local TCP connections here and forward each one.")
@click.option("--stdio", is_flag=True,
              help="Forward one connection on stdin/stdout (ssh ProxyCommand).")
@click.option("--ticket-file", type=click.Path(dir_okay=False, path_type=Path),
              help="File holding a ticket (instead of `quictun import`). The ticket can "
                   "also come from the QUICTUN_TICKET environment variable.")
@_common
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
    """
    if bool(listen) == bool(stdio):
        raise UserError("give exactly one of --listen [HOST:]PORT or --stdio")
    mode = _mode(direct_only, relay_only)
    name, t = _connect_ticket(target, ticket_file)
    secret = _secret(secret_file, secret_arg)
    pin = None
    if t is not None:
        pin = t.fingerprint
        secret = secret or t.secret
        source = click.get_current_context().get_parameter_source("signal")
        if source in (None, click.core.ParameterSource.DEFAULT):
            signal = t.url
    if secret is None:
        raise UserError(f"no secret for {name!r}: run `quictun import -` and paste the ticket "
                        "that `quictun serve` printed, or set QUICTUN_SECRET or --secret-file")
    ident = _load_identity()
    from .run import run_connect
    from .status import StatusLine

    ctx = click.get_current_context()
    json_logs = (ctx.find_root().obj or {}).get("log_format") == "json"
    status = StatusLine(spinner=False if json_logs else None)

    async def go() -> None:
        try:
            await run_connect(name, signal=signal, secret=secret, mode=mode, token=token,
                              listen=listen, stdio=stdio, pin=pin, on_status=status,
                              identity=ident)
        finally:
            status.close()

    _run(go())


def _warn_argv_ticket(name: str) -> None:
    _warn("a ticket on the command line (secret included) is visible to other users in "
          f"the process list; store it with `quictun import -` (reads stdin), then use the "
          f"name {name!r}")


def _connect_ticket(target: str | None, ticket_file: Path | None):  # type: ignore[no-untyped-def]
    """(name, ticket or None) for connect: a ticket argument, --ticket-file,
    QUICTUN_TICKET, else the ticket stored for the name (if any)."""
    if target is not None and _is_ticket(target):
        t = _decode(target)
        _warn_argv_ticket(t.name)
        return _check_name(t.name), t
    t = None
    if ticket_file is not None:
        try:
            text = ticket_file.read_text()
        except OSError as exc:
            raise UserError(f"cannot read the ticket file {ticket_file}: "
                            f"{exc.strerror or _one_line(exc)}") from None
        t = _decode(text, f"{ticket_file}: ")
    elif os.environ.get("QUICTUN_TICKET"):
        t = _decode(os.environ["QUICTUN_TICKET"], "QUICTUN_TICKET: ")
    if t is not None:
        if target is not None and target != t.name:
            raise UserError(f"the ticket is for {t.name!r}, not {target!r}")
        return _check_name(t.name), t
    if target is None:
        raise UserError("give a NAME (with a ticket stored by `quictun import`), or "
                        "--ticket-file, or QUICTUN_TICKET")
    return target, _load_stored(_check_name(target))


@main.command("import")
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
    t = _decode(text, where)
    if source != "-":
        _warn_argv_ticket(t.name)
    path = _store(t)
    prog = _prog()
    click.echo(f"quictun: stored the ticket for {t.name!r} (relay {t.url}) in {path}", err=True)
    click.echo("\n".join([
        f"{prog} connect {t.name} --listen 2222     # then: ssh -p 2222 USER@127.0.0.1",
        f"ssh -o ProxyCommand='{prog} connect %h --stdio' USER@{t.name}",
        f"{prog} ssh-config {t.name} >> ~/.ssh/config     # then: ssh USER@{t.name}",
    ]))


@main.command()
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
    from .demo import run_demo

    if not (click.get_current_context().find_root().obj or {}).get("verbose"):
        logging.getLogger("quictun.signal").setLevel(logging.WARNING)  # the embedded relay
    try:
        parse_hostport(forward)
    except ValueError as exc:
        raise UserError(f"--forward: {exc}") from None
    _run(run_demo(forward, port=port, echo=lambda text: click.echo(text, err=False),
                  prog=_prog()))


@main.command()
@verbose_option
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

    \b
    Environment:
      QUICTUN_SIGNAL, QUICTUN_SIGNAL_TOKEN  (see the options)
      QUICTUN_SIGNAL_CA  CA file to trust for a wss:// relay (e.g. certs/relay.crt)
    """
    from . import netcheck as nc

    async def go() -> nc.Report:
        return nc.report(await nc.probe(signal, token=token))

    import asyncio

    from ..errors import TunnelError

    try:
        rep = asyncio.run(go())
    except TunnelError as exc:
        if as_json:  # `| jq` still gets an object: {"error": ..., "relay_url": ...}
            import json

            click.echo(json.dumps({"error": str(exc), "relay_url": signal}, indent=2))
        raise UserError(str(exc)) from None
    except KeyboardInterrupt:
        sys.exit(130)
    click.echo(rep.to_json() if as_json else rep.to_text())


def _prog() -> str:
    """How another shell runs this very quictun (another terminal, ssh's ProxyCommand):
    the absolute path of this installation's ``quictun`` script, so that it works where
    its virtual environment is not active; else ``PYTHON -m quictun`` with this Python."""
    import shlex

    script = Path(sys.executable).parent / "quictun"
    if script.is_file() and os.access(script, os.X_OK):
        return shlex.quote(str(script))
    return f"{shlex.quote(sys.executable)} -m quictun"


@main.command("ssh-config")
@verbose_option
@click.argument("name", metavar="NAME|TICKET")
@click.option("--signal", "signal", envvar=ENV_SIGNAL, show_envvar=True,
              default=DEFAULT_SIGNAL, show_default=True, help=SIGNAL_HELP)
def ssh_config(name: str, signal: str) -> None:
    """Print a ~/.ssh/config block so that `ssh NAME` goes through quictun.

    The block names NAME only, never a secret. Given a ticket, it is imported first (as
    `quictun import` does), so the ProxyCommand needs nothing else.

    \b
    Examples:
      quictun ssh-config laptop >> ~/.ssh/config    # after `quictun import`
      quictun ssh-config laptop --signal wss://relay.example.org/ >> ~/.ssh/config
      ssh user@laptop

    \b
    Environment:
      QUICTUN_SIGNAL     (see the option)
      QUICTUN_HOME       where the ticket for NAME is looked up (default ~/.config/quictun)
    """
    from ..proto import ticket as tk

    prog = _prog()
    if _is_ticket(name):
        t = _decode(name)
        _warn_argv_ticket(t.name)
        path = _store(t)
        click.echo(f"quictun: imported the ticket for {t.name!r} into {path}", err=True)
        name = t.name
    else:
        _check_name(name)
        t = _load_stored(name)
    source = click.get_current_context().get_parameter_source("signal")
    if t is None and source in (None, click.core.ParameterSource.DEFAULT):
        stored = tk.stored_names()
        known = f" (stored: {', '.join(stored)})" if stored else ""
        raise UserError(f"no ticket is stored for {name!r}{known}: run `quictun import -` "
                        "and paste the ticket that `quictun serve` printed, or pass --signal "
                        "URL for a block whose secret comes from QUICTUN_SECRET or "
                        "QUICTUN_SECRET_FILE")
    if t is not None:
        lines = [
            f"# quictun: reach {name!r} via {t.url}, with the ticket stored in "
            f"{tk.ticket_path(name)}",
            f"Host {name}",
            f"  ProxyCommand {prog} connect %h --stdio",
        ]
    else:
        lines = [
            f"# quictun: reach {name!r} via {signal}",
            "# The secret comes from `quictun import` (then this --signal can go), or from",
            "# QUICTUN_SECRET or QUICTUN_SECRET_FILE in the environment ssh runs in (e.g.",
            "# `export QUICTUN_SECRET_FILE=~/.config/quictun/laptop.secret` in your shell",
            "# profile), or add `--secret-file PATH` to the ProxyCommand.",
            f"Host {name}",
            f"  ProxyCommand {prog} connect %h --stdio --signal {signal}",
        ]
    click.echo("\n".join(lines))
