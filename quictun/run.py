"""The long-running parts of ``quictun connect``: a local listener or stdio."""

from __future__ import annotations

import asyncio
import logging
import sys

from .api import open_tunnel, parse_hostport
from .errors import TunnelError
from .forward import WriteSide

log = logging.getLogger("quictun")


def _status(line: str) -> None:
    log.info("%s", line)


async def run_connect(
    name: str, *, signal: str, secret: str, mode: str, token: str | None,
    listen: str | None, stdio: bool, pin: str | None = None,
) -> None:
    """Open a tunnel, then serve ``listen`` or stdio until done. Raises TunnelError."""
    tunnel = await open_tunnel(name, signal=signal, secret=secret, mode=mode, token=token,
                               on_status=_status, pin=pin)
    try:
        if stdio:
            await _stdio(tunnel)
        else:
            assert listen is not None
            try:
                host, port = parse_hostport(listen)
            except ValueError as exc:
                raise TunnelError(f"--listen: {exc}") from None
            loop = asyncio.get_running_loop()
            try:
                server = await loop.create_server(tunnel.bridge, host, port)
            except OSError as exc:
                raise TunnelError(f"cannot listen on {host}:{port}: {exc.strerror}") from None
            bound = server.sockets[0].getsockname()
            log.info("listening on %s:%d", bound[0], bound[1])
            reason = await tunnel.wait_closed()
            server.close()
            raise TunnelError(f"the tunnel to {name!r} closed: {reason}")
    finally:
        await tunnel.close()


async def _stdio(tunnel) -> None:  # type: ignore[no-untyped-def]
    loop = asyncio.get_running_loop()
    done = loop.create_future()
    bridge = tunnel.bridge()
    bridge._on_done = lambda b: done.done() or done.set_result(None)
    await loop.connect_read_pipe(lambda: bridge, sys.stdin.buffer)
    wt, _ = await loop.connect_write_pipe(lambda: WriteSide(bridge), sys.stdout.buffer)
    bridge.attach_writer(wt)
    closed = asyncio.ensure_future(tunnel.wait_closed())
    await asyncio.wait({done, closed}, return_when=asyncio.FIRST_COMPLETED)
    if not done.done():
        raise TunnelError(f"the tunnel closed: {closed.result()}")
    closed.cancel()
