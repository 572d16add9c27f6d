"""What ``serve`` connects a client's stream to: a named service (TCP or a Unix socket)
or, for the proxy entry, a ``host:port`` that ``--allow`` permits.

The decisions are pure (:class:`~quictun.proto.services.ServiceTable`,
:class:`~quictun.proto.allow.AllowList`); this module does the I/O between them: DNS on
the serving side, only after the first check passed, then connecting only to the
addresses the second check returned, with a deadline. Every outcome is one
:class:`~quictun.proto.control.OpenReply` (its status tells the client, and a proxy
client, why), and a refusal is logged in one line.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import socket
from collections.abc import Callable
from dataclasses import dataclass, field

from ..proto import control as ctl
from ..proto.allow import AllowList, Connect, Refused
from ..proto.flows import FlowStats
from ..proto.services import Service, ServiceTable

log = logging.getLogger("quictun")

SOCKS_STATS = "socks"  # the stats key of proxy targets

_ERRNO_STATUS = {
    errno.ECONNREFUSED: ctl.ST_REFUSED,
    errno.ENOENT: ctl.ST_REFUSED,  # a unix socket that is not there (yet)
    errno.ENETUNREACH: ctl.ST_NET_UNREACHABLE,
    errno.EHOSTUNREACH: ctl.ST_HOST_UNREACHABLE,
    errno.ETIMEDOUT: ctl.ST_TIMEOUT,
    errno.EACCES: ctl.ST_NOT_ALLOWED,
    errno.EAFNOSUPPORT: ctl.ST_BAD_ADDRESS,
}


@dataclass
class ServiceStats:
    """One service's traffic for one client: ``in`` toward the target."""

    connections: int = 0
    refused: int = 0
    bytes_in: int = 0
    bytes_out: int = 0
    udp: FlowStats | None = None

    def as_dict(self) -> dict[str, int]:
        out = {"connections": self.connections, "refused": self.refused,
               "bytes_in": self.bytes_in, "bytes_out": self.bytes_out}
        if self.udp is not None:
            u = self.udp
            out.update(flows=self.connections, datagrams_in=u.datagrams_in,
                       datagrams_out=u.datagrams_out, bytes_in=u.bytes_in,
                       bytes_out=u.bytes_out, dropped_too_big=u.dropped_too_big,
                       dropped_queue=u.dropped_queue)
        return out

    def text(self) -> str:
        if self.udp is not None:
            u = self.udp
            return (f"{self.connections} flows, {u.datagrams_in}/{u.datagrams_out} datagrams "
                    f"in/out, {u.bytes_in} bytes in, {u.bytes_out} out, "
                    f"{u.dropped_too_big} too big, {u.dropped_queue} dropped")
        extra = f", {self.refused} refused" if self.refused else ""
        return (f"{self.connections} connections{extra}, {self.bytes_in} bytes in, "
                f"{self.bytes_out} out")


@dataclass
class Forwarding:
    """What one ``serve`` makes reachable: its services and its proxy rules."""

    services: ServiceTable
    allow: AllowList = field(default_factory=AllowList)

    def listing(self) -> ctl.Listing:
        default = {s.name for s in (self._default(True), self._default(False)) if s}
        return ctl.Listing(tuple((s.name, s.kind, s.name in default) for s in self.services),
                           tuple(self.allow.texts()),
                           tuple((s.name, s.target_text()) for s in self.services))

    def _default(self, stream: bool) -> Service | None:
        try:
            return self.services.resolve(None, stream)
        except ValueError:
            return None

    def describe(self) -> str:
        parts = [f"{s.name}={s.target_text()}" if s.name != "default" else s.target_text()
                 for s in self.services]
        if self.allow:
            parts.append(f"socks to {', '.join(self.allow.texts())}")
        return "; ".join(parts) or "nothing"


def status_of(exc: BaseException) -> int:
    """The open status for a failed connect or resolve."""
    if isinstance(exc, socket.gaierror):
        return ctl.ST_NAME_NOT_FOUND
    if isinstance(exc, TimeoutError):
        return ctl.ST_TIMEOUT
    if isinstance(exc, OSError) and exc.errno in _ERRNO_STATUS:
        return _ERRNO_STATUS[exc.errno]
    return ctl.ST_FAILURE


ProtocolFactory = Callable[[], asyncio.Protocol]


async def connect_service(service: Service, factory: ProtocolFactory,
                          timeout: float) -> ctl.OpenReply:
    """Connect a stream service (tcp or unix) with ``factory``'s protocol."""
    loop = asyncio.get_running_loop()
    try:
        if service.kind == "unix":
            coro = loop.create_unix_connection(factory, service.path)
        else:
            coro = loop.create_connection(factory, service.host, service.port)
        await asyncio.wait_for(coro, timeout)
    except (OSError, TimeoutError) as exc:
        return ctl.OpenReply(status_of(exc), f"{service.target_text()}: {_why(exc)}")
    return ctl.OpenReply(ctl.ST_OK)


async def connect_proxy_target(allow: AllowList, host: str, port: int,
                               factory: ProtocolFactory, timeout: float,
                               who: str) -> ctl.OpenReply:
    """Check ``host:port`` against ``allow`` (before DNS, then after), then connect to
    an allowed address. ``who`` names the client in the log line of a refusal."""
    verdict = allow.check(host, port)
    loop = asyncio.get_running_loop()
    if not isinstance(verdict, (Connect, Refused)):  # a name: resolve on this side
        try:
            infos = await asyncio.wait_for(
                loop.getaddrinfo(verdict.name, port, type=socket.SOCK_STREAM), timeout)
        except (OSError, TimeoutError) as exc:
            return ctl.OpenReply(status_of(exc), f"cannot resolve {verdict.name}: {_why(exc)}")
        verdict = allow.check_resolved(verdict.name, port, [str(i[4][0]) for i in infos])
    if isinstance(verdict, Refused):
        log.warning("refused proxy target %s for client %s: %s", _shown(host, port), who,
                    verdict.reason)
        return ctl.OpenReply(ctl.ST_NOT_ALLOWED, verdict.reason)
    last: BaseException | None = None
    for addr in verdict.addresses:
        try:
            await asyncio.wait_for(loop.create_connection(factory, addr, port), timeout)
            return ctl.OpenReply(ctl.ST_OK)
        except (OSError, TimeoutError) as exc:
            last = exc
    assert last is not None
    return ctl.OpenReply(status_of(last), f"{_shown(host, port)}: {_why(last)}")


def _why(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError):
        return "timed out"
    if isinstance(exc, OSError) and exc.errno:
        return os.strerror(exc.errno)  # asyncio's text is "Connect call failed (...)"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc) or type(exc).__name__


def _shown(host: str, port: int) -> str:
    clean = "".join(c if c.isprintable() else "?" for c in host[:100])
    return f"[{clean}]:{port}" if ":" in clean else f"{clean}:{port}"
