"""The long-running parts of ``quictun connect``: local listeners, the SOCKS entry,
stdio, or the service listing."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import stat
import sys
from collections.abc import Awaitable, Callable

from ..aio.bridge import StreamBridge, WriteSide, reset_reason
from ..aio.client import Tunnel, open_tunnel
from ..aio.local import Listener, TunnelSlot
from ..aio.socks import start_socks
from ..config import TunnelConfig
from ..errors import TunnelError, printable
from ..proto import control as ctl
from ..proto.control import (
    ERR_NO_DEFAULT,
    ERR_TARGET_REFUSED,
    ERR_TARGET_TIMEOUT,
    ERR_TARGET_UNREACHABLE,
    describe_refusal,
)
from ..proto.identity import Identity
from ..proto.services import ListenSpec
from .status import log_stats_every, stats_line

log = logging.getLogger("quictun")

MIN_RETRY = 0.5  # seconds between two attempts to re-open a tunnel, at least


def _status(line: str) -> None:
    log.info("%s", line)


async def run_connect(
    name: str, *, signal: str, secret: str, mode: str, token: str | None,
    listen: list[ListenSpec] | None = None, stdio: bool = False,
    socks: tuple[str, int] | None = None, service: str | None = None,
    list_only: bool = False, unix_mode: int = 0o600, pin: str | None = None,
    box_key: bytes | None = None,
    on_status: Callable[[str], None] | None = None, stats_interval: float = 60.0,
    identity: Identity | None = None, config: TunnelConfig | None = None,
) -> None:
    """Open a tunnel, then serve the ``listen`` endpoints and the ``socks`` entry (all
    over that one tunnel, re-established when it dies), or stdio, or print the service
    listing (``list_only``). Raises TunnelError."""
    config = config or TunnelConfig()

    def opener() -> Awaitable[Tunnel]:
        return open_tunnel(name, signal=signal, secret=secret, mode=mode, token=token,
                           on_status=on_status or _status, pin=pin, box_key=box_key,
                           identity=identity,
                           config=config)

    if stdio or list_only:
        tunnel = await opener()
        try:
            if list_only:
                _print_listing(name, await tunnel.services())
            else:
                await _stdio(tunnel, service)
        finally:
            await tunnel.close()
        return
    # bind first: a busy or forbidden port is reported before any tunnel is built; a
    # connection made before the tunnel is up (or while it is re-established) waits
    current = TunnelSlot()
    listeners = [Listener(spec, service, current, config, unix_mode)
                 for spec in listen or []]
    servers: list[asyncio.AbstractServer] = []
    lines = []
    try:
        for lst in listeners:
            bound = await lst.start()
            svc = f" (service {lst.service})" if lst.service else ""
            lines.append(f"listening on {bound}{svc}")
        if socks is not None:
            if not _loopback(socks[0]):
                log.warning("--socks on %s: anyone who can reach this port can use the "
                            "serving side's --allow targets (the entry asks for no "
                            "password); 127.0.0.1 keeps it to this machine", socks[0])
            try:
                servers.append(await start_socks(socks[0], socks[1], current))
            except OSError as exc:
                raise TunnelError(f"--socks: cannot listen on {socks[0]}:{socks[1]}: "
                                  f"{exc.strerror}") from None
            host, port = servers[0].sockets[0].getsockname()[:2]
            lines.append(f"SOCKS5 and HTTP CONNECT proxy on {host}:{port}")
        first = await opener()  # meanwhile, early local connections wait (aio/local.py)
        try:
            await _check_listing(name, first, listeners, socks is not None)
        except BaseException:
            await first.close()
            raise
        current.set(first)
        for line in lines:  # once the tunnel is up: scripts wait for these lines
            log.info("%s", line)
        await _listen(current, opener, name, stats_interval)
    finally:
        for lst in listeners:
            if (text := lst.stats_text()) is not None:
                log.info("%s", text)
            lst.close()
        for srv in servers:
            srv.close()
        if current.tunnel is not None:
            await current.tunnel.close()


def _loopback(host: str) -> bool:
    import ipaddress

    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def _print_listing(name: str, listing: ctl.Listing) -> None:
    """``connect --list``: one line per service, then the proxy rules (stdout)."""
    lines = [f"{'service':<20} kind"]
    for svc, kind, default in listing.services:
        lines.append(f"{svc:<20} {kind}{'  (default)' if default else ''}")
    if not listing.services:
        lines.append("(no services)")
    if listing.allow:
        lines.append(f"socks: --socks reaches {', '.join(listing.allow)}")
    else:
        lines.append("socks: not offered (serve has no --allow)")
    print(f"{name}:\n" + "\n".join("  " + line for line in lines), flush=True)


async def _check_listing(name: str, tunnel: Tunnel, listeners: list[Listener],
                         socks: bool) -> None:
    """Listeners and --socks that cannot work against what the server offers stop the
    command at once with one line (an older server that cannot list: no check)."""
    try:
        listing = await tunnel.services()
    except TunnelError:
        return
    if socks and not listing.allow:
        raise TunnelError(f"{name!r} allows no SOCKS targets (start its serve with "
                          "--allow, e.g. --allow 192.168.1.0/24:22,80,443)")
    kinds = {svc: kind for svc, kind, _default in listing.services}
    offered = ", ".join(f"{s} ({k})" for s, k in kinds.items()) or "none"
    for lst in listeners:
        want_udp = lst.spec.kind == "udp"
        if lst.service is None:
            if not any(d and (k == "udp") == want_udp for _s, k, d in listing.services):
                raise TunnelError(f"--listen {lst.spec.local_text()}: {name!r} has no default "
                                  f"{'udp' if want_udp else 'stream'} service; name one with "
                                  f"--service or SERVICE= (offered: {offered})")
        elif lst.service not in kinds:
            raise TunnelError(f"--listen {lst.spec.local_text()}: {name!r} has no service "
                              f"{lst.service!r} (offered: {offered})")
        elif (kinds[lst.service] == "udp") != want_udp:
            raise TunnelError(f"--listen {lst.spec.local_text()}: the service "
                              f"{lst.service!r} is {kinds[lst.service]}")


async def _listen(
    current: TunnelSlot, opener: Callable[[], Awaitable[Tunnel]], name: str,
    stats_interval: float,
) -> None:
    """Serve the bound listeners with the tunnel in ``current`` (up); when the tunnel
    dies, keep listening and re-establish it.

    Stream connections that arrive while the tunnel is down wait for the next one (up to
    ``tunnel_wait``), and one arriving makes the next attempt start at once instead of
    after the backoff; datagrams are dropped meanwhile. Errors another attempt cannot
    fix (wrong secret, an impostor) end the command. The caller closes the listeners
    and ``current.tunnel``.
    """
    wanted = asyncio.Event()
    current.on_wanted = wanted.set
    while True:
        t = current.tunnel
        assert t is not None
        stats = asyncio.ensure_future(log_stats_every(t, stats_interval))
        try:
            reason = await t.wait_closed()
        finally:
            stats.cancel()
            log.info("%s", stats_line(t))
            current.set(None)
            await t.close()
        log.warning("the tunnel to %r closed (%s); reconnecting", name, reason)
        current.set(await _reopen(opener, wanted))


async def _reopen(opener: Callable[[], Awaitable[Tunnel]], wanted: asyncio.Event) -> Tunnel:
    """A new tunnel, retried with backoff (1 s doubling to 30 s) that a waiting local
    connection cuts short (attempts stay at least :data:`MIN_RETRY` apart)."""
    loop = asyncio.get_running_loop()
    delay = 0.2  # the peer may be back at once (a restarted serve)
    last = loop.time() - MIN_RETRY
    while True:
        wanted.clear()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(wanted.wait(), delay)
        await asyncio.sleep(max(0.0, last + MIN_RETRY - loop.time()))
        last = loop.time()
        try:
            return await opener()
        except TunnelError as exc:
            if exc.permanent:
                raise
            delay = min(max(delay, 0.5) * 2, 30.0)
            log.warning("reconnect failed: %s; retrying in %.0f s", exc, delay)


async def _stdio(tunnel: Tunnel, service: str | None) -> None:
    loop = asyncio.get_running_loop()
    done = loop.create_future()
    bridge = tunnel.bridge(service)
    bridge.duplex = False  # stdin reads, stdout writes
    handler_done = bridge.on_done

    def finished(b: StreamBridge) -> None:
        if handler_done is not None:
            handler_done(b)  # the tunnel forgets the stream as well
        if not done.done():
            done.set_result(None)

    bridge.on_done = finished
    # asyncio refuses regular files for pipe transports (and uvloop aborts on them), so
    # files get small thread/synchronous transports instead
    # the writer first: a stdin that ends at once must find it (else its EOF looked like
    # a reset)
    if _is_file(sys.stdout):
        wt: asyncio.WriteTransport = _FileWriter(sys.stdout.buffer)
    else:
        wt, _ = await loop.connect_write_pipe(lambda: WriteSide(bridge), sys.stdout.buffer)
    bridge.attach_writer(wt)
    if _is_file(sys.stdin):
        _FileReader(sys.stdin.buffer, bridge)
    else:
        await loop.connect_read_pipe(lambda: bridge, sys.stdin.buffer)
    closed = asyncio.ensure_future(tunnel.wait_closed())
    await asyncio.wait({done, closed}, return_when=asyncio.FIRST_COMPLETED)
    if not done.done():
        raise TunnelError(f"the tunnel closed: {closed.result()}")
    closed.cancel()
    reply = bridge.reply
    if reply is not None and reply.status in ctl.TARGET_FAILURES:
        raise TunnelError(describe_refusal(tunnel.name, service, reply.status,
                                           detail=printable(reply.text)))
    if reply is not None and not reply.ok:
        raise TunnelError(f"{tunnel.name!r} refused the connection: {printable(reply.text)}")
    if bridge.reset_code == ERR_NO_DEFAULT:
        raise TunnelError(f"{tunnel.name!r}: {reset_reason(ERR_NO_DEFAULT)}")
    if bridge.reset_code in (ERR_TARGET_REFUSED, ERR_TARGET_TIMEOUT, ERR_TARGET_UNREACHABLE):
        raise TunnelError(describe_refusal(tunnel.name, service, bridge.reset_code,
                                           await _target_of(tunnel, service)))
    if not bridge.clean:
        raise TunnelError("the connection was reset (the peer, its target or the tunnel "
                          "went away)")


async def _target_of(tunnel: Tunnel, service: str | None) -> str:
    """The target ``serve`` has for ``service`` (from its listing), or "" if unknown."""
    try:
        listing = await asyncio.wait_for(tunnel.services(), 5.0)
    except (TunnelError, TimeoutError) as exc:
        log.debug("no listing: %r", exc)
        return ""
    log.debug("listing: %r", listing)
    return printable(listing.target_of(service))


def _is_file(f) -> bool:  # type: ignore[no-untyped-def]
    try:
        return stat.S_ISREG(os.fstat(f.fileno()).st_mode)
    except (OSError, ValueError):
        return False


class _FileReader(asyncio.ReadTransport):
    """A read transport over a regular file (which asyncio's pipe transports refuse)."""

    def __init__(self, f, protocol: asyncio.Protocol) -> None:  # type: ignore[no-untyped-def]
        super().__init__()
        self._f = f
        self._protocol = protocol
        self._resume = asyncio.Event()
        self._resume.set()
        self._closing = False
        protocol.connection_made(self)
        self._task = asyncio.ensure_future(self._pump())

    async def _pump(self) -> None:
        loop = asyncio.get_running_loop()
        while not self._closing:
            await self._resume.wait()
            data = await loop.run_in_executor(None, self._f.read1, 65536)
            if not data:
                self._protocol.eof_received()
                return
            self._protocol.data_received(data)

    def pause_reading(self) -> None:
        self._resume.clear()

    def resume_reading(self) -> None:
        self._resume.set()

    def is_closing(self) -> bool:
        return self._closing

    def close(self) -> None:
        self._closing = True
        self._resume.set()


class _FileWriter(asyncio.WriteTransport):
    """A write transport over a regular file: writes are immediate."""

    def __init__(self, f) -> None:  # type: ignore[no-untyped-def]
        super().__init__()
        self._f = f
        self._closing = False

    def write(self, data: bytes) -> None:  # type: ignore[override]
        self._f.write(data)
        self._f.flush()

    def write_eof(self) -> None:
        self.close()

    def can_write_eof(self) -> bool:
        return True

    def get_write_buffer_size(self) -> int:
        return 0

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        pass

    def is_closing(self) -> bool:
        return self._closing

    def close(self) -> None:
        if not self._closing:
            self._closing = True
            self._f.flush()

    def abort(self) -> None:
        self.close()
