"""The ``quictun`` command group (entry point :func:`main`).

Each command lives in the module of its job (:mod:`.tunnels`, :mod:`.tickets`,
:mod:`.demo`, :mod:`.netcheck`); heavy imports happen inside the commands, so ``--help``
is instant. ``main(obj={"config": TunnelConfig(...)})`` runs the CLI with other tunables
(the benchmark's levers); the default is :meth:`TunnelConfig.from_environment`.
"""

from __future__ import annotations

import click

from .common import setup_logging
from .demo import demo
from .netcheck import netcheck
from .tickets import import_ticket, pair, ssh_config
from .tunnels import connect, serve


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
    QUICTUN_ENGINE (QUIC engine: auto, the default, is qh3 when installed; aioquic, qh3),
    QUICTUN_LOG_FORMAT (text or json).
    """
    ctx.ensure_object(dict)
    ctx.obj.update(verbose=verbose, log_format=log_format)
    setup_logging(verbose, log_format)


for _command in (serve, connect, import_ticket, pair, demo, netcheck, ssh_config):
    main.add_command(_command)
