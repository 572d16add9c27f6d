"""The UPnP client against hostile devices on loopback: huge, malformed and entity-laden
XML, redirects and URLs pointing at other hosts, and silence. Also one well-behaved IGD
that makes the client go through AddAnyPortMapping's absence and port conflicts.

Every device here is a real socket server; the "other host" is another loopback address
(127.0.0.2) whose server counts connections: refusing a URL means never connecting.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

import pytest

from quictun.aio import upnp as upnp_io
from quictun.aio.portmap import PortmapConfig, PortMapper

WAN1 = "urn:schemas-upnp-org:service:WANIPConnection:1"
SOAP_NS = ('xmlns:s="http://schemas.xmlsoap.org/soap/envelope/" '
           's:encodingStyle="http://schemas.xmlsoap.org/soap/encoding/"')


def desc(control: str, stype: str = WAN1) -> bytes:
    return ('<?xml version="1.0"?><root xmlns="urn:schemas-upnp-org:device-1-0"><device>'
            "<serviceList><service><serviceType>" + stype + "</serviceType><controlURL>"
            + control + "</controlURL></service></serviceList></device></root>").encode()


def soap(inner: str) -> bytes:
    return f'<?xml version="1.0"?><s:Envelope {SOAP_NS}><s:Body>{inner}</s:Body>' \
           "</s:Envelope>".encode()


def fault(code: int) -> bytes:
    return soap("<s:Fault><faultcode>s:Client</faultcode><faultstring>UPnPError"
                '</faultstring><detail><UPnPError xmlns="urn:schemas-upnp-org:control-1-0">'
                f"<errorCode>{code}</errorCode><errorDescription>x</errorDescription>"
                "</UPnPError></detail></s:Fault>")


def http(status: int, body: bytes, extra: str = "") -> bytes:
    return (f"HTTP/1.1 {status} X\r\nContent-Length: {len(body)}\r\n{extra}"
            "Connection: close\r\n\r\n").encode() + body


Handler = Callable[[str, bytes], "bytes | AsyncIterator[bytes] | None"]


@dataclass
class HttpServer:
    """Answers each request with ``handler(path, request)``: bytes, an async iterator of
    chunks (streamed), or None (never answer)."""

    host: str
    handler: Handler
    connections: int = 0
    sent: int = 0
    requests: list[bytes] = field(default_factory=list)
    port: int = 0
    server: asyncio.Server | None = None

    async def start(self) -> HttpServer:
        self.server = await asyncio.start_server(self._serve, self.host, 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            length = 0
            for line in head.split(b"\r\n"):
                if line.lower().startswith(b"content-length:"):
                    length = int(line.split(b":")[1])
            request = head + await reader.readexactly(length)
            self.requests.append(request)
            answer = self.handler(request.split(b" ")[1].decode(), request)
            if answer is None:
                await asyncio.sleep(3600)
            elif isinstance(answer, bytes):
                writer.write(answer)
                self.sent += len(answer)
            else:
                async for chunk in answer:
                    writer.write(chunk)
                    self.sent += len(chunk)
                    await writer.drain()
            await writer.drain()
        except (OSError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    def close(self) -> None:
        if self.server is not None:
            self.server.close()


class Ssdp(asyncio.DatagramProtocol):
    """Answers every M-SEARCH with ``answers()`` (a list of datagrams)."""

    def __init__(self, answers: Callable[[], list[bytes]]) -> None:
        self.answers = answers
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: tuple) -> None:  # type: ignore[type-arg]
        if data.startswith(b"M-SEARCH") and self.transport is not None:
            for answer in self.answers():
                self.transport.sendto(answer, addr)


def ssdp_answer(location: str) -> bytes:
    return (f"HTTP/1.1 200 OK\r\nST: {WAN1}\r\nUSN: uuid:x\r\nLOCATION: {location}\r\n\r\n"
            ).encode()


@contextlib.asynccontextmanager
async def device(handler: Handler, *, answers: Callable[[str], list[bytes]] | None = None,
                 host: str = "127.0.0.1") -> AsyncIterator[tuple[HttpServer, tuple[str, int]]]:
    """An HTTP server plus an SSDP responder (unicast) pointing at its /desc.xml."""
    srv = await HttpServer(host, handler).start()
    base = f"http://{host}:{srv.port}"
    make = answers or (lambda b: [ssdp_answer(b + "/desc.xml")])
    loop = asyncio.get_running_loop()
    transport, _ = await loop.create_datagram_endpoint(lambda: Ssdp(lambda: make(base)),
                                                       local_addr=(host, 0))
    try:
        yield srv, transport.get_extra_info("sockname")
    finally:
        transport.close()
        srv.close()


@pytest.fixture
async def other_host() -> AsyncIterator[HttpServer]:
    """A server on another loopback address: nothing may ever connect to it."""
    srv = await HttpServer("127.0.0.2", lambda p, r: http(200, desc("/ctl"))).start()
    yield srv
    srv.close()
    assert srv.connections == 0, "the client followed a URL to another host"


async def discover(ssdp_addr: tuple[str, int], *, gateway: str | None = "127.0.0.1",
                   timeout: float = 1.0) -> upnp_io.Igd | None:
    return await upnp_io.discover(gateway=gateway, local_ip=None, wait=0.6,
                                  http_timeout=timeout, ssdp_addr=ssdp_addr)


async def stream(total: int) -> AsyncIterator[bytes]:
    yield b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n<root>"
    for _ in range(total // 65536):
        yield b"<a>" + b"x" * 65529 + b"</a>"


BILLION_LAUGHS = b"""<?xml version="1.0"?>
<!DOCTYPE root [<!ENTITY a "aaaaaaaaaa"><!ENTITY b "&a;&a;&a;&a;&a;&a;&a;&a;&a;&a;">
<!ENTITY c "&b;&b;&b;&b;&b;&b;&b;&b;&b;&b;"><!ENTITY d "&c;&c;&c;&c;&c;&c;&c;&c;&c;&c;">]>
<root><device><serviceList><service><serviceType>&d;</serviceType></service></serviceList>
</device></root>"""


async def test_good_device_is_found() -> None:
    async with device(lambda p, r: http(200, desc("/ctl"))) as (srv, addr):
        igd = await discover(addr)
    assert igd is not None and igd.service.control_url.path == "/ctl"
    assert igd.service.control_url.port == srv.port


@pytest.mark.parametrize("name, handler", [
    ("huge streamed description", lambda p, r: stream(8 << 20)),
    ("huge Content-Length", lambda p, r: http(200, b"x" * 70000)),
    ("entity expansion", lambda p, r: http(200, BILLION_LAUGHS)),
    ("malformed XML", lambda p, r: http(200, b"<root><device></root>")),
    ("not XML at all", lambda p, r: http(200, bytes(range(256)) * 4)),
    ("no port-mapping service", lambda p, r: http(200, desc("/x", "urn:x:service:Foo:1"))),
    ("redirect to another host", lambda p, r: http(
        302, b"", "Location: http://127.0.0.2:80/desc.xml\r\n")),
    ("control URL on another host", lambda p, r: http(200, desc("http://127.0.0.2:9/ctl"))),
    ("protocol-relative control URL", lambda p, r: http(200, desc("//127.0.0.2:9/ctl"))),
    ("garbage status", lambda p, r: b"HTTP/9.9 OK\r\n\r\n"),
    ("never answers", lambda p, r: None),
])
async def test_hostile_description_is_refused(name: str, handler: Handler,
                                              other_host: HttpServer) -> None:
    async with device(handler) as (srv, addr):
        assert await discover(addr, timeout=0.5) is None, name
    assert srv.sent < 9 << 20


async def test_huge_description_is_not_read_to_the_end() -> None:
    async with device(lambda p, r: stream(64 << 20)) as (srv, addr):
        assert await discover(addr) is None
        await asyncio.sleep(0.1)
    assert srv.sent < 16 << 20  # the client hung up near its 64 KiB cap


async def test_location_on_another_host_is_never_fetched(other_host: HttpServer) -> None:
    answers = lambda base: [ssdp_answer(f"http://127.0.0.2:{other_host.port}/desc.xml")]  # noqa: E731
    async with device(lambda p, r: http(200, desc("/ctl")), answers=answers) as (srv, addr):
        assert await discover(addr) is None
    assert srv.connections == 0


@pytest.mark.parametrize("answer", [
    b"HTTP/1.1 200 OK\r\nLOCATION: http://127.0.0.1/x\r\n" + b"X: y\r\n" * 400 + b"\r\n",
    b"NOTIFY * HTTP/1.1\r\nLOCATION: http://127.0.0.1/x\r\n\r\n",
    b"\xff" * 100,
    b"HTTP/1.1 200 OK\r\nST: x\r\nLOCATION: http://127.0.0.1:1/x\r\nLOCATION: "
    b"http://127.0.0.2/\r\n\r\n",
])
async def test_hostile_ssdp_answers_are_ignored(answer: bytes, other_host: HttpServer) -> None:
    async with device(lambda p, r: http(200, desc("/ctl")), answers=lambda b: [answer]) \
            as (_, addr):
        assert await discover(addr) is None


async def test_answer_from_another_host_than_the_gateway() -> None:
    async with device(lambda p, r: http(200, desc("/ctl"))) as (srv, addr):
        assert await discover(addr, gateway="127.0.0.9") is None
        assert srv.connections == 0
        assert await discover(addr, gateway=None) is not None  # no known gateway: accepted


async def test_flood_of_answers_is_bounded() -> None:
    answers = lambda base: [ssdp_answer(f"{base}/d{i}.xml") for i in range(60)]  # noqa: E731
    async with device(lambda p, r: http(404, b""), answers=answers) as (srv, addr):
        assert await discover(addr) is None
    assert srv.connections <= 8


# -- the whole client through PortMapper -----------------------------------------------
@dataclass
class Igd:
    """A well-behaved IGD v1 with one quirk at a time."""

    conflicts: int = 0
    permanent_only: bool = False
    soap_answer: bytes | None = None
    actions: list[str] = field(default_factory=list)
    mapped: dict[int, str] = field(default_factory=dict)

    def __call__(self, path: str, request: bytes) -> bytes:
        if path == "/desc.xml":
            return http(200, desc("/ctl"))
        action = request.split(b"#", 1)[1].split(b'"', 1)[0].decode()
        self.actions.append(action)
        body = request.split(b"\r\n\r\n", 1)[1].decode()
        if self.soap_answer is not None:
            return http(200, self.soap_answer)
        if action == "GetExternalIPAddress":
            return http(200, soap('<u:GetExternalIPAddressResponse xmlns:u="x">'
                                  "<NewExternalIPAddress>203.0.113.7</NewExternalIPAddress>"
                                  "</u:GetExternalIPAddressResponse>"))
        port = int(body.split("<NewExternalPort>")[1].split("<")[0])
        if action == "AddPortMapping":
            lease = int(body.split("<NewLeaseDuration>")[1].split("<")[0])
            if self.permanent_only and lease:
                return http(500, fault(725))
            if self.conflicts:
                self.conflicts -= 1
                return http(500, fault(718))
            self.mapped[port] = body.split("<NewInternalClient>")[1].split("<")[0]
            return http(200, soap('<u:AddPortMappingResponse xmlns:u="x"/>'))
        if action == "DeletePortMapping":
            self.mapped.pop(port, None)
            return http(200, soap('<u:DeletePortMappingResponse xmlns:u="x"/>'))
        return http(500, fault(401))


def upnp_config(addr: tuple[str, int]) -> PortmapConfig:
    return PortmapConfig(protocols=("upnp",), gateway="127.0.0.1", ssdp_addr=addr,
                         ssdp_wait=0.6, http_timeout=1.0, require_global=False)


async def test_portmapper_over_upnp_with_conflicts() -> None:
    igd = Igd(conflicts=2)
    async with device(igd) as (_, addr):
        pm = PortMapper(40100, config=upnp_config(addr))
        pm.start()
        got = await pm.wait_first(5)
        assert len(got) == 1 and got[0].protocol == "upnp"
        port = got[0].external[1]
        assert got[0].external[0] == "203.0.113.7" and port != 40100  # taken twice
        assert igd.mapped == {port: "127.0.0.1"}  # our address on the HTTP connection
        assert igd.actions.count("AddPortMapping") == 3
        await pm.close()
        assert igd.mapped == {} and igd.actions[-1] == "DeletePortMapping"


async def test_portmapper_over_upnp_permanent_lease() -> None:
    igd = Igd(permanent_only=True)
    async with device(igd) as (_, addr):
        pm = PortMapper(40101, config=upnp_config(addr))
        pm.start()
        got = await pm.wait_first(5)
        assert got and got[0].lifetime == 0 and got[0].expires_at is None
        await pm.close()
        assert igd.mapped == {}


@pytest.mark.parametrize("answer", [BILLION_LAUGHS, b"<x>", fault(606), b"\x00" * 20000])
async def test_portmapper_over_upnp_hostile_soap(answer: bytes) -> None:
    igd = Igd(soap_answer=answer)
    async with device(igd) as (_, addr):
        pm = PortMapper(40102, config=upnp_config(addr))
        pm.start()
        assert await pm.wait_first(5) == []
        assert pm.tried["upnp"].startswith("refused")
        await pm.close()
        assert "DeletePortMapping" not in igd.actions  # nothing confirmed, nothing deleted
