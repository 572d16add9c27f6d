"""What the ``quictun`` commands share: options, one-line errors and warnings, logging,
and the small steps around secrets, identities and tickets."""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from ..config import DEFAULT_SIGNAL

if TYPE_CHECKING:
    from ..config import TunnelConfig
    from ..proto.identity import Identity
    from ..proto.ticket import Ticket

SIGNAL_HELP = "Relay URL (ws:// or wss://)."
ENV_SIGNAL = "QUICTUN_SIGNAL"


_JSON_LOGS = [False]  # set by --log-format json: errors and warnings as JSON lines too


def say(level: str, message: str) -> None:
    """One ``quictun: LEVEL: message`` line on stderr, or a JSON log line in json mode."""
    if _JSON_LOGS[0]:
        import logging

        logging.getLogger("quictun").log(logging.getLevelName(level.upper()), "%s", message)
    else:
        click.echo(f"quictun: {level}: {message}", err=True)


def warn(message: str) -> None:
    """One warning line (see :func:`say`)."""
    say("warning", message)


class UserError(click.ClickException):
    """One line on stderr, exit status 1, no traceback."""

    def show(self, file: object = None) -> None:
        say("error", self.format_message())


def setup_logging(verbose: int, fmt: str) -> None:
    """Log lines on stderr: ``quictun: ...`` or JSON objects; -v and -vv add detail."""
    import json
    import logging
    import time

    class JsonFormatter(logging.Formatter):
        def format(self, record: logging.LogRecord) -> str:
            line = {"ts": round(time.time(), 3), "level": record.levelname.lower(),
                    "logger": record.name, "msg": record.getMessage()}
            fields = getattr(record, "fields", None)
            if isinstance(fields, dict):  # structured detail (serve's per-client summary)
                line.update({k: v for k, v in fields.items() if k not in line})
            return json.dumps(line)

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
    # -v: what the port mapper tried, was granted, renewed, refused and deleted
    logging.getLogger("quictun.portmap").setLevel(logging.DEBUG if verbose else logging.NOTSET)



def _more_verbose(ctx: click.Context, _param: click.Parameter, count: int) -> None:
    """``-v`` after the subcommand counts like ``-v`` before it."""
    if count:
        obj = ctx.find_root().obj
        obj["verbose"] += count
        setup_logging(obj["verbose"], obj["log_format"])


verbose_option = click.option("-v", "--verbose", count=True, expose_value=False,
                              is_eager=True, callback=_more_verbose,
                              help="More detail (-vv for debugging).")


def _portmap_switch(ctx: click.Context, _param: click.Parameter, value: bool) -> None:
    if value:
        ctx.find_root().ensure_object(dict)["no_portmap"] = True


portmap_option = click.option(
    "--no-portmap", is_flag=True, expose_value=False, callback=_portmap_switch,
    help="Do not ask the router for a port mapping of the tunnel's UDP socket (UPnP "
         "IGD, NAT-PMP, PCP; asked by default: short-lived, renewed while in use, "
         "deleted on exit). Same as QUICTUN_PORTMAP=0.")


def common_options(f: Callable[..., Any]) -> Callable[..., Any]:
    """--signal, --secret-file, --secret, --token, --direct-only, --relay-only,
    --no-portmap."""
    f = portmap_option(f)
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


def tunnel_config() -> TunnelConfig:
    """The tunables for this run: ``main(obj={"config": ...})``'s, else the defaults with
    the environment's lab switch (:meth:`TunnelConfig.from_environment`); port mapping
    off after ``--no-portmap``."""
    import dataclasses

    from ..config import TunnelConfig

    ctx = click.get_current_context(silent=True)
    obj = ctx.find_root().obj if ctx is not None else None
    cfg = obj.get("config") if isinstance(obj, dict) else None
    if cfg is None:
        try:
            cfg = TunnelConfig.from_environment(os.environ)
        except ValueError as exc:  # e.g. QUICTUN_UDP_OFFLOAD=nonsense
            raise UserError(str(exc)) from None
    if isinstance(obj, dict) and obj.get("no_portmap"):
        cfg = cfg.replace(portmap=dataclasses.replace(cfg.portmap, enabled=False))
    return cfg


def mode_of(direct_only: bool, relay_only: bool) -> str:
    """The tunnel mode the two switches ask for."""
    if direct_only and relay_only:
        raise UserError("--direct-only and --relay-only exclude each other")
    return "direct" if direct_only else "relay" if relay_only else "auto"


SHORT_SECRET = 12  # characters: below this, warn (see docs/architecture.md's odds)


def secret_from(secret_file: Path | None, secret_arg: str | None) -> str | None:
    """The secret from --secret-file, else --secret (warns), else $QUICTUN_SECRET.
    Warns about a file others can read and about a short secret."""
    secret = None
    if secret_file is not None:
        try:
            secret = secret_file.read_text().strip()
        except OSError as exc:
            raise UserError(f"cannot read the secret file {secret_file}: {exc.strerror}") from None
        if not secret:
            raise UserError(f"the secret file {secret_file} is empty")
        warn_if_exposed(secret_file)
    elif secret_arg:
        warn("--secret is visible to other users in the process list; prefer "
             "QUICTUN_SECRET or --secret-file")
        secret = secret_arg
    else:
        secret = os.environ.get("QUICTUN_SECRET") or None
    if secret is not None and len(secret) < SHORT_SECRET:
        warn(f"the secret is short ({len(secret)} characters): nobody can test guesses "
             "offline, but someone can try about 300 a day against the server; prefer "
             "a generated one (leave QUICTUN_SECRET unset: `serve` makes one, and "
             "`serve --pair` hands it over)")
    return secret


def warn_if_exposed(path: Path) -> None:
    """Warn when a secret file the user manages can be read by other users."""
    from .. import store

    try:
        store.check_private(path)
    except (store.ExposedFile, OSError) as exc:
        if isinstance(exc, store.ExposedFile):
            warn(str(exc))


def one_line(exc: BaseException) -> str:
    """An exception as one line of text."""
    return " ".join(str(exc).split()) or type(exc).__name__


def load_identity() -> Identity:
    """This machine's identity (made on first use); one-line errors."""
    from .. import store

    try:
        return store.load_or_create()
    except (OSError, ValueError) as exc:
        raise UserError(f"cannot load the identity in {store.config_dir()}: "
                        f"{one_line(exc)}") from None


def check_name(name: str) -> str:
    """``name`` if it can name a tunnel (and a file in the config dir); else UserError."""
    from ..proto import ticket as tk

    try:
        return tk.check_name(name)
    except tk.InvalidName as exc:
        raise UserError(str(exc)) from None


def decode_ticket(text: str, where: str = "") -> Ticket:
    """Parse a ticket; a one-line UserError (prefixed with ``where``) if it is not one."""
    from ..proto import ticket as tk

    try:
        return tk.decode(text)
    except tk.TicketError as exc:
        raise UserError(f"{where}{exc}") from None


def check_signal(url: str) -> str:
    """``url`` if it is a well-formed relay URL, else a one-line UserError."""
    from ..errors import TunnelError
    from ..proto.addr import parse_relay_url

    try:
        parse_relay_url(url)
    except TunnelError as exc:
        raise UserError(f"--signal / QUICTUN_SIGNAL: {exc}") from None
    return url


def warn_if_local_relay(url: str) -> None:
    """A ticket naming a loopback or unspecified relay cannot work on another machine."""
    import ipaddress

    from ..proto.addr import parse_relay_url

    host = parse_relay_url(url)[1]
    try:
        ip = ipaddress.ip_address(host)
        local = ip.is_loopback or ip.is_unspecified
    except ValueError:
        local = host.lower() == "localhost"
    if local:
        warn(f"the ticket names the relay {url}, which only this machine can reach; for "
              "another machine pass --signal (or set QUICTUN_SIGNAL) with an address it "
              "can reach")


def is_ticket(text: str) -> bool:
    """Whether ``text`` is a ticket rather than a name."""
    from ..proto import ticket as tk

    return text.startswith("qt") and tk.looks_like_ticket(text)


def store_ticket(t: Ticket) -> Path:
    """Store ticket ``t`` in the config dir; returns the path. One-line errors."""
    from .. import store
    from ..proto import ticket as tk

    try:
        return store.store_ticket(t)
    except tk.InvalidName as exc:
        raise UserError(f"the ticket's name: {exc}") from None
    except OSError as exc:
        where = exc.filename or store.ticket_path(t.name)
        raise UserError(f"cannot store the ticket in {where}: "
                        f"{exc.strerror or one_line(exc)}") from None


def load_stored(name: str) -> Ticket | None:
    """The ticket stored for ``name``, or None; one-line errors."""
    from .. import store
    from ..proto import ticket as tk

    try:
        return store.load_ticket(name)
    except (tk.TicketError, store.ExposedFile) as exc:
        raise UserError(str(exc)) from None
    except OSError as exc:
        raise UserError(f"cannot read the stored ticket {exc.filename}: "
                        f"{exc.strerror or one_line(exc)}") from None


class _Signalled(Exception):
    """The command was stopped by SIGTERM or SIGHUP (after its clean-up ran)."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


async def _stoppable(coro: Coroutine[Any, Any, None]) -> None:
    """Await ``coro``; SIGTERM and SIGHUP cancel it like Ctrl-C does, so its ``finally``
    blocks run (tunnels close, port mappings are deleted) before the process exits."""
    import asyncio
    import signal

    loop = asyncio.get_running_loop()
    task = asyncio.current_task()
    got: list[int] = []

    def stop(signum: int) -> None:
        got.append(signum)
        if task is not None:
            task.cancel()

    for signum in (signal.SIGTERM, signal.SIGHUP):
        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
            loop.add_signal_handler(signum, stop, signum)
    try:
        await coro
    except asyncio.CancelledError:
        if got:
            raise _Signalled(got[0]) from None
        raise


def run(coro: Coroutine[Any, Any, None]) -> None:
    """Run a command's coroutine; a TunnelError is its one-line error, Ctrl-C exit 130,
    SIGTERM / SIGHUP 128 + the signal's number (after the same clean-up)."""
    import asyncio

    from ..errors import TunnelError

    try:
        asyncio.run(_stoppable(coro))
    except TunnelError as exc:
        raise UserError(str(exc)) from None
    except KeyboardInterrupt:
        sys.exit(130)
    except _Signalled as exc:
        sys.exit(128 + exc.signum)


def prog() -> str:
    """How another shell runs this very quictun (another terminal, ssh's ProxyCommand):
    the absolute path of this installation's ``quictun`` script, so that it works where
    its virtual environment is not active; else ``PYTHON -m quictun`` with this Python."""
    import shlex

    script = Path(sys.executable).parent / "quictun"
    if script.is_file() and os.access(script, os.X_OK):
        return shlex.quote(str(script))
    return f"{shlex.quote(sys.executable)} -m quictun"


def warn_argv_ticket(name: str) -> None:
    """Warn that a ticket given as an argument is visible in the process list."""
    warn("a ticket on the command line (secret included) is visible to other users in "
          f"the process list; store it with `quictun import -` (reads stdin), then use the "
          f"name {name!r}")


