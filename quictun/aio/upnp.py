"""The asyncio shell of the UPnP IGD client: SSDP over UDP multicast, HTTP over TCP.

The codec is :mod:`quictun.proto.upnp`; this module only moves its bytes and bounds the
time and the amount read. Used by :mod:`quictun.aio.portmap`; nothing here is specific to
a tunnel. Every network or protocol failure raises :class:`~quictun.proto.upnp.UpnpError`
(or returns None where documented), with a reason fit for a ``-v`` log line.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from dataclasses import dataclass

from ..proto import upnp

__all__ = ["Igd", "discover", "http_exchange", "http_exchange_sync", "soap", "soap_sync"]

log = logging.getLogger("quictun.portmap")

_MAX_SSDP_ANSWERS = 8


@dataclass(frozen=True)
class Igd:
    """A gateway found by :func:`discover`."""

    responder: str
    """The address that answered SSDP."""
    service: upnp.IgdService
    """Its port-mapping service."""


class _SsdpProtocol(asyncio.DatagramProtocol):
    def __init__(self) -> None:
        self.answers: asyncio.Queue[tuple[bytes, str]] = asyncio.Queue(maxsize=64)

    def datagram_received(self, data: bytes, addr: tuple) -> None:  # type: ignore[type-arg]
        with contextlib.suppress(asyncio.QueueFull):
            self.answers.put_nowait((data, addr[0]))

    def error_received(self, exc: Exception) -> None:
        log.debug("portmap: upnp: SSDP socket error: %s", exc)


def _ssdp_socket(local_ip: str | None) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_TTL, 2)
        if local_ip:
            sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_IF,
                            socket.inet_aton(local_ip))
        sock.bind((local_ip or "0.0.0.0", 0))
    except BaseException:
        sock.close()
        raise
    return sock


async def discover(*, gateway: str | None, local_ip: str | None, wait: float,
                   http_timeout: float,
                   ssdp_addr: tuple[str, int] = upnp.SSDP_ADDR) -> Igd | None:
    """Search the LAN for an IGD and read its description; None if none is usable.

    Sends M-SEARCHes for :data:`~quictun.proto.upnp.SEARCH_TARGETS` twice (at once and
    after a quarter of ``wait``), then takes answers for up to ``wait`` seconds. An answer
    counts only if its LOCATION is on the answering address and, when ``gateway`` is
    given, that address is the gateway; the first one whose description names a
    port-mapping service (on the same host) wins. At most 8 answers are examined.
    ``ssdp_addr`` is where M-SEARCHes go (a unicast address reaches one known device).
    """
    loop = asyncio.get_running_loop()
    try:
        sock = _ssdp_socket(local_ip)
    except OSError as exc:
        log.debug("portmap: upnp: no SSDP socket: %s", exc)
        return None
    transport, proto = await loop.create_datagram_endpoint(_SsdpProtocol, sock=sock)
    try:
        probes = [upnp.msearch(st) for st in upnp.SEARCH_TARGETS]

        def send_all() -> int:
            sent = 0
            for probe in probes:
                try:
                    sock.sendto(probe, ssdp_addr)  # raw: an error raises here
                    sent += 1
                except OSError as exc:  # e.g. no route for multicast: nothing to find
                    log.debug("portmap: upnp: M-SEARCH not sent: %s", exc)
            return sent

        if not send_all():
            return None
        resend = loop.call_later(wait / 4, send_all)
        deadline = loop.time() + wait
        seen: set[str] = set()
        try:
            for _ in range(_MAX_SSDP_ANSWERS):
                left = deadline - loop.time()
                if left <= 0:
                    break
                try:
                    data, src = await asyncio.wait_for(proto.answers.get(), left)
                except TimeoutError:
                    break
                igd = await _consider(data, src, gateway, seen, http_timeout)
                if igd is not None:
                    return igd
        finally:
            resend.cancel()
        log.debug("portmap: upnp: no usable SSDP answer in %.1f s", wait)
        return None
    finally:
        transport.close()


async def _consider(data: bytes, src: str, gateway: str | None, seen: set[str],
                    http_timeout: float) -> Igd | None:
    try:
        answer = upnp.parse_ssdp_response(data)
        if gateway is not None and src != gateway:
            raise upnp.UpnpError(f"not from the gateway {gateway}")
        location = upnp.check_location(answer.location, src)
    except upnp.UpnpError as exc:
        log.debug("portmap: upnp: SSDP answer from %s ignored: %s", src, exc)
        return None
    if str(location) in seen:
        return None
    seen.add(str(location))
    try:
        resp, _ = await http_exchange(location, upnp.http_get(location),
                                      max_body=upnp.MAX_DESCRIPTION, timeout=http_timeout)
        if resp.status != 200:
            raise upnp.UpnpError(f"HTTP {resp.status} for the description (redirects are "
                                 "not followed)")
        service = upnp.parse_description(resp.body, location)
    except upnp.UpnpError as exc:
        log.debug("portmap: upnp: description %s refused: %s", location, exc)
        return None
    log.debug("portmap: upnp: %s offers %s at %s", src, service.service_type,
              service.control_url)
    return Igd(responder=src, service=service)


async def http_exchange(url: upnp.HttpUrl, request: bytes, *, max_body: int,
                        timeout: float) -> tuple[upnp.HttpResponse, str]:
    """Send ``request`` to ``url``'s host and read one response (at most ``max_body``
    bytes of body) within ``timeout`` seconds. Returns the response and our own address
    on that connection (the "internal client" a gateway in secure mode expects).

    Raises:
        UpnpError: connection failure, timeout, or a malformed or oversized response.
    """
    try:
        async with asyncio.timeout(timeout):
            reader, writer = await asyncio.open_connection(url.host, url.port)
            try:
                local_ip = writer.get_extra_info("sockname")[0]
                writer.write(request)
                await writer.drain()
                buf = bytearray()
                while True:
                    chunk = await reader.read(16384)
                    buf += chunk
                    resp = upnp.parse_http_response(bytes(buf), eof=not chunk,
                                                    max_body=max_body)
                    if resp is not None:
                        return resp, local_ip
            finally:
                writer.close()
                with contextlib.suppress(OSError):
                    await writer.wait_closed()
    except TimeoutError as exc:
        raise upnp.UpnpError(f"no HTTP answer from {url.netloc} in {timeout} s") from exc
    except OSError as exc:
        raise upnp.UpnpError(f"HTTP to {url.netloc} failed: {exc}") from exc


async def soap(igd: Igd, request: bytes, action: str, *,
               timeout: float) -> tuple[dict[str, str], str]:
    """POST a SOAP request built by the codec; returns the output arguments and our own
    address on the connection.

    Raises:
        UpnpFault: the gateway refused (with its UPnP error code).
        UpnpError: anything else went wrong.
    """
    resp, local_ip = await http_exchange(igd.service.control_url, request,
                                         max_body=upnp.MAX_SOAP, timeout=timeout)
    return upnp.parse_soap_response(resp, action), local_ip


def http_exchange_sync(url: upnp.HttpUrl, request: bytes, *, max_body: int,
                       timeout: float) -> upnp.HttpResponse:
    """Blocking :func:`http_exchange` for paths without an event loop (exit handlers).

    Raises:
        UpnpError: as :func:`http_exchange`.
    """
    try:
        with socket.create_connection((url.host, url.port), timeout=timeout) as sock:
            sock.settimeout(timeout)
            sock.sendall(request)
            buf = bytearray()
            while True:
                chunk = sock.recv(16384)
                buf += chunk
                resp = upnp.parse_http_response(bytes(buf), eof=not chunk, max_body=max_body)
                if resp is not None:
                    return resp
    except OSError as exc:
        raise upnp.UpnpError(f"HTTP to {url.netloc} failed: {exc}") from exc


def soap_sync(igd: Igd, request: bytes, action: str, *, timeout: float) -> dict[str, str]:
    """Blocking :func:`soap`; raises like it."""
    resp = http_exchange_sync(igd.service.control_url, request, max_body=upnp.MAX_SOAP,
                              timeout=timeout)
    return upnp.parse_soap_response(resp, action)
