"""``quictun-signal``: run the quictun signalling relay (click entry point ``main``)."""

from __future__ import annotations

import asyncio
import logging
import sys
from pathlib import Path

import click

EPILOG = """\b
Example:
  quictun-signal --port 443 --cert fullchain.pem --key privkey.pem \\
      --token-file /etc/quictun/token --relay-rate 1000000

Clients then use --signal wss://relay.example.org/; `quictun serve` also needs the
same token (QUICTUN_SIGNAL_TOKEN or --token), `quictun connect` does not.
Health check: GET /healthz answers 200 "OK" (503 while --redis is unreachable);
GET /metrics serves Prometheus text.

\b
Several instances as one relay (behind DNS round robin or a load balancer):
  QUICTUN_SIGNAL_REDIS=redis://10.0.0.2:6379/0 quictun-signal --port 443 ...
(needs `pip install 'quictun[redis]'`; see docs/relay-cluster.md).
"""


class UserError(click.ClickException):
    """One ``quictun-signal: error: ...`` line on stderr, exit status 1, no traceback."""

    def show(self, file: object = None) -> None:
        click.echo(f"quictun-signal: error: {self.format_message()}", err=True)


@click.command(epilog=EPILOG, context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--host",
    multiple=True,
    envvar="QUICTUN_SIGNAL_HOST",
    show_envvar=True,
    help="Address to listen on (repeatable). Default: all IPv4 and IPv6 addresses.",
)
@click.option(
    "--port",
    type=click.IntRange(0, 65535),
    default=8765,
    show_default=True,
    envvar="QUICTUN_SIGNAL_PORT",
    show_envvar=True,
    help="TCP port for WebSocket and UDP port for STUN; 0 picks a free one.",
)
@click.option(
    "--cert",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    envvar="QUICTUN_SIGNAL_CERT",
    show_envvar=True,
    help="TLS certificate chain (PEM); serves wss:// when given with --key.",
)
@click.option(
    "--key",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    envvar="QUICTUN_SIGNAL_KEY",
    show_envvar=True,
    help="TLS private key (PEM).",
)
@click.option(
    "--token",
    envvar="QUICTUN_SIGNAL_TOKEN",
    show_envvar=True,
    help="Shared secret a client must present to register a name (serve); clients "
    "that only connect need none. A wrong token is refused. Prefer --token-file.",
)
@click.option(
    "--token-file",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    envvar="QUICTUN_SIGNAL_TOKEN_FILE",
    show_envvar=True,
    help="Read the token from this file (surrounding whitespace stripped).",
)
@click.option(
    "--no-relay",
    is_flag=True,
    envvar="QUICTUN_SIGNAL_NO_RELAY",
    show_envvar=True,
    help="Do not forward QUIC packets; only match peers and answer STUN.",
)
@click.option(
    "--relay-rate",
    type=click.FloatRange(min=1, min_open=False),
    envvar="QUICTUN_SIGNAL_RELAY_RATE",
    show_envvar=True,
    help="Cap relayed traffic per session and direction, in bytes/s. Default: unlimited.",
)
@click.option(
    "--stun-port2",
    type=click.IntRange(0, 65535),
    default=0,
    show_default=True,
    envvar="QUICTUN_SIGNAL_STUN_PORT2",
    show_envvar=True,
    help="Second STUN UDP port (0: any free port).",
)
@click.option(
    "--max-per-ip",
    type=click.IntRange(min=1),
    default=64,
    show_default=True,
    envvar="QUICTUN_SIGNAL_MAX_PER_IP",
    show_envvar=True,
    help="Refuse (HTTP 429) more connections than this from one IP address.",
)
@click.option(
    "--redis",
    "redis_url",
    metavar="URL",
    envvar="QUICTUN_SIGNAL_REDIS",
    show_envvar=True,
    help="Share names and sessions with every instance using this Redis "
    "(redis://HOST:PORT/DB). Prefer the variable if the URL has a password.",
)
@click.option(
    "--peer-link",
    default="auto",
    show_default=True,
    envvar="QUICTUN_SIGNAL_PEER_LINK",
    show_envvar=True,
    help="With --redis: direct TCP links between instances for relayed packets: auto "
    "(the address this host uses to reach Redis), HOST:PORT, or off (Redis pub/sub).",
)
@click.option(
    "--connect-rate",
    type=click.FloatRange(min=0),
    default=20.0,
    show_default=True,
    envvar="QUICTUN_SIGNAL_CONNECT_RATE",
    show_envvar=True,
    help="connects per second from one client IP (ten seconds' worth at once; 0: off).",
)
@click.option(
    "--register-rate",
    type=click.FloatRange(min=0),
    default=5.0,
    show_default=True,
    envvar="QUICTUN_SIGNAL_REGISTER_RATE",
    show_envvar=True,
    help="registrations per second from one client IP (ten seconds' worth at once; 0: off).",
)
@click.option(
    "--name-token",
    "name_token_specs",
    multiple=True,
    metavar="PREFIX=FILE",
    help="Reserve the names starting with PREFIX: only a `quictun serve` whose "
    "QUICTUN_SIGNAL_TOKEN is the token in FILE may register them (repeatable). With "
    "--token too, the prefix's token lets a serve register under its prefix only.",
)
@click.option(
    "--log-format",
    type=click.Choice(["text", "json"]),
    default="text",
    show_default=True,
    envvar="QUICTUN_SIGNAL_LOG_FORMAT",
    show_envvar=True,
    help="json: one JSON object per log line (ts, level, logger, msg).",
)
@click.option("-v", "--verbose", count=True, help="-v: debug logs; -vv: websockets logs too.")
@click.version_option(package_name="quictun", prog_name="quictun-signal")
def main(
    host: tuple[str, ...],
    port: int,
    cert: Path | None,
    key: Path | None,
    token: str | None,
    token_file: Path | None,
    no_relay: bool,
    relay_rate: float | None,
    stun_port2: int,
    max_per_ip: int,
    redis_url: str | None,
    peer_link: str,
    connect_rate: float,
    register_rate: float,
    name_token_specs: tuple[str, ...],
    log_format: str,
    verbose: int,
) -> None:
    """Run the quictun signalling relay: peers meet here, swap offers, punch UDP,
    and fall back to relaying QUIC packets over the WebSocket."""
    from .server import RelayConfig, run_relay
    from .types import MatchmakerConfig

    _setup_logging(verbose, log_format)
    if redis_url:
        _check_redis_option(redis_url)
    logging.getLogger("quictun.signal.websockets").setLevel(
        logging.DEBUG if verbose >= 2 else logging.WARNING
    )
    if token and token_file:
        raise click.UsageError("use either --token or --token-file, not both")
    if token_file is not None:
        token = token_file.read_text(encoding="utf-8").strip()
        if not token:
            raise click.UsageError(f"token file {token_file} is empty")
    if (cert is None) != (key is None):
        raise click.UsageError("--cert and --key go together")
    ssl_context = None
    if cert is not None and key is not None:
        import ssl

        ssl_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        try:
            ssl_context.load_cert_chain(cert, key)
        except (OSError, ssl.SSLError) as exc:
            raise click.UsageError(f"cannot load certificate/key: {exc}") from exc
    name_tokens = _name_tokens(name_token_specs)
    _raise_fd_limit()
    config = RelayConfig(
        host=list(host) or None,
        port=port,
        ssl_context=ssl_context,
        matchmaker=MatchmakerConfig(token=token or None, relay_enabled=not no_relay,
                                    relay_rate=relay_rate, name_tokens=name_tokens,
                                    connect_rate=connect_rate, register_rate=register_rate),
        stun_port2=stun_port2,
        max_per_ip=max_per_ip,
        redis_url=redis_url or None,
        peer_link=peer_link,
    )
    from .types import ClusterError

    try:
        asyncio.run(run_relay(config))
    except KeyboardInterrupt:
        pass
    except ClusterError as exc:
        raise UserError(str(exc)) from None
    except OSError as exc:
        raise UserError(_listen_error(exc, list(host), port)) from None


class _JsonFormatter(logging.Formatter):
    """One JSON object per line, the same fields as ``quictun --log-format json``."""

    def format(self, record: logging.LogRecord) -> str:
        import json

        out = {"ts": round(record.created, 3), "level": record.levelname.lower(),
               "logger": record.name, "msg": record.getMessage()}
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out)


def _setup_logging(verbose: int, log_format: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    if log_format == "json":
        handler.setFormatter(_JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.DEBUG if verbose else logging.INFO)


def _check_redis_option(url: str) -> None:
    """One line for a missing redis package; a warning for a password on the command
    line (visible to every user in the process list)."""
    try:
        import redis  # noqa: F401
    except ImportError:
        raise UserError("--redis needs the redis package: pip install 'quictun[redis]'"
                        ) from None
    from urllib.parse import urlsplit

    ctx = click.get_current_context()
    source = ctx.get_parameter_source("redis_url")
    try:
        has_password = urlsplit(url).password is not None
    except ValueError:
        has_password = False
    if has_password and source == click.core.ParameterSource.COMMANDLINE:
        logging.getLogger("quictun.signal").warning(
            "the Redis password in --redis is visible to other users in the process list; "
            "set QUICTUN_SIGNAL_REDIS instead")


def _name_tokens(specs: tuple[str, ...]) -> dict[str, str]:
    """``--name-token PREFIX=FILE`` options as {prefix: token}; one-line usage errors."""
    out: dict[str, str] = {}
    for spec in specs:
        prefix, sep, path = spec.partition("=")
        if not sep or not prefix or not path:
            raise click.UsageError(f"--name-token {spec!r}: expected PREFIX=FILE")
        try:
            token = Path(path).read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise click.UsageError(f"--name-token {prefix}=...: cannot read {path}: "
                                   f"{exc.strerror}") from None
        if not token:
            raise click.UsageError(f"--name-token {prefix}=...: {path} is empty")
        out[prefix] = token
    return out


def _listen_error(exc: OSError, hosts: list[str], port: int) -> str:
    """One line for a listener that could not be opened, with what to do about it."""
    import errno

    where = f"{', '.join(hosts) or 'all addresses'} port {port}"
    if exc.errno == errno.EADDRINUSE:
        return (f"cannot listen on {where}: the port is already in use (is another "
                "quictun-signal or `quictun demo` running?); stop it or pick another --port")
    if exc.errno == errno.EACCES:
        return (f"cannot listen on {where}: permission denied (ports below 1024 need root "
                "or CAP_NET_BIND_SERVICE); pick a --port above 1023")
    if exc.errno == errno.EADDRNOTAVAIL:
        return (f"cannot listen on {where}: no such local address; check --host")
    return f"cannot listen on {where}: {exc.strerror or exc}"


def _raise_fd_limit() -> None:
    """Each peer holds a socket: lift the soft open-files limit to the hard limit."""
    try:
        import resource

        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if hard == resource.RLIM_INFINITY:
            hard = 1 << 20
        if soft < hard:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    except (ImportError, ValueError, OSError):
        pass


if __name__ == "__main__":  # pragma: no cover
    main()
