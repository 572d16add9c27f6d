"""A small, pure UPnP IGD client codec: SSDP discovery, device description, SOAP actions.

Theory of operation
-------------------
Asking a UPnP Internet Gateway Device for a port mapping takes three steps, each a
request built here and an answer parsed here (the shell in :mod:`quictun.aio.portmap`
moves the bytes):

1. SSDP (UDP multicast to 239.255.255.250:1900): :func:`msearch` builds the M-SEARCH;
   :func:`parse_ssdp_response` reads a unicast ``HTTP/1.1 200 OK`` answer (LOCATION, ST,
   USN). :func:`check_location` accepts the LOCATION only if it names, as an IP literal,
   the very address that answered.
2. HTTP GET of the LOCATION (:func:`http_get`, :func:`parse_http_response`), then
   :func:`parse_description` finds the WANIPConnection (v2, then v1) or WANPPPConnection
   service and its control URL, which must stay on the host that answered SSDP.
3. SOAP POSTs to the control URL: GetExternalIPAddress, AddPortMapping,
   AddAnyPortMapping (IGD v2), DeletePortMapping; :func:`parse_soap_response` returns the
   action's output arguments or raises :class:`UpnpFault` with the UPnP error code.

Everything from the network is hostile until parsed: sizes are capped (SSDP datagram
2 KiB, HTTP head 8 KiB, description 64 KiB, SOAP answer 16 KiB), XML goes through
``defusedxml`` with DTDs, entities and external references forbidden (no entity
expansion, no fetches), URLs must be plain ``http://<ip>[:port]/path`` with no control
characters, and redirects are not followed (a 3xx is an error). Every failure raises
:class:`UpnpError` (a refusal from the device: its subclass :class:`UpnpFault`). No I/O,
no clock, no randomness.
"""

from __future__ import annotations

import ipaddress
import re
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from urllib.parse import urljoin, urlsplit
from xml.sax.saxutils import escape

import defusedxml
import defusedxml.ElementTree as SafeET

__all__ = [
    "SSDP_ADDR",
    "ST_IGD1",
    "ST_IGD2",
    "SEARCH_TARGETS",
    "WAN_SERVICES",
    "MAX_SSDP",
    "MAX_HEAD",
    "MAX_DESCRIPTION",
    "MAX_SOAP",
    "FAULT_CONFLICT",
    "FAULT_ONLY_PERMANENT_LEASES",
    "UpnpError",
    "UpnpFault",
    "HttpUrl",
    "HttpResponse",
    "SsdpResponse",
    "IgdService",
    "msearch",
    "parse_ssdp_response",
    "parse_url",
    "check_location",
    "http_get",
    "parse_http_response",
    "parse_description",
    "soap_request",
    "get_external_ip_request",
    "add_port_mapping_request",
    "add_any_port_mapping_request",
    "delete_port_mapping_request",
    "parse_soap_response",
    "external_ip_of",
    "reserved_port_of",
]

SSDP_ADDR = ("239.255.255.250", 1900)
ST_IGD1 = "urn:schemas-upnp-org:device:InternetGatewayDevice:1"
ST_IGD2 = "urn:schemas-upnp-org:device:InternetGatewayDevice:2"
_WANIP1 = "urn:schemas-upnp-org:service:WANIPConnection:1"
_WANIP2 = "urn:schemas-upnp-org:service:WANIPConnection:2"
_WANPPP1 = "urn:schemas-upnp-org:service:WANPPPConnection:1"
SEARCH_TARGETS = (ST_IGD2, ST_IGD1, _WANIP1)
"""What the shell searches for: IGD devices of both versions and the WANIP service."""
WAN_SERVICES = (_WANIP2, _WANIP1, _WANPPP1)
"""Services that map ports, in order of preference."""
MAX_SSDP = 2048
MAX_HEAD = 8192
MAX_DESCRIPTION = 65536
MAX_SOAP = 16384
FAULT_CONFLICT = 718
"""ConflictInMappingEntry: the external port is taken."""
FAULT_ONLY_PERMANENT_LEASES = 725
"""OnlyPermanentLeasesSupported: the device wants NewLeaseDuration 0."""

_SOAP_ENV = "http://schemas.xmlsoap.org/soap/envelope/"
_URL_CHARS = re.compile(r"^[\x21-\x7e]*$")
_TOKEN = re.compile(r"^[A-Za-z0-9_.:-]{1,64}$")


class UpnpError(ValueError):
    """Raised for anything malformed, oversized, off-host or otherwise unusable."""


class UpnpFault(UpnpError):
    """The device answered a SOAP action with a well-formed fault (a refusal).

    Attributes:
        code: the UPnP ``errorCode`` (e.g. 718 ConflictInMappingEntry), or None.
        description: the ``errorDescription`` text (bounded), possibly empty.
    """

    def __init__(self, code: int | None, description: str) -> None:
        super().__init__(f"UPnP fault {code}: {description}")
        self.code = code
        self.description = description


# -- SSDP ------------------------------------------------------------------------------
def msearch(st: str, *, mx: int = 1) -> bytes:
    """An SSDP M-SEARCH for search target ``st``; answers within ``mx`` seconds (1..5)."""
    if not _TOKEN.match(st) or not 1 <= mx <= 5:
        raise UpnpError(f"bad search target or MX: {st!r} {mx!r}")
    return (f"M-SEARCH * HTTP/1.1\r\nHOST: {SSDP_ADDR[0]}:{SSDP_ADDR[1]}\r\n"
            f'MAN: "ssdp:discover"\r\nMX: {mx}\r\nST: {st}\r\n\r\n').encode("ascii")


@dataclass(frozen=True)
class SsdpResponse:
    """An SSDP search answer."""

    location: str
    """The device description's URL (unchecked; see :func:`check_location`)."""
    st: str
    """The search target that matched."""
    usn: str
    """The unique service name (may be empty)."""
    server: str
    """The SERVER header (may be empty)."""


def _head_lines(text: str) -> tuple[str, dict[str, str]]:
    lines = text.replace("\r\n", "\n").split("\n")
    headers: dict[str, str] = {}
    for line in lines[1:]:
        if not line:
            break
        name, sep, value = line.partition(":")
        if not sep or not name or name != name.strip():
            raise UpnpError(f"malformed header line {line[:60]!r}")
        headers.setdefault(name.lower(), value.strip())
    return lines[0], headers


def _ascii(data: bytes, what: str) -> str:
    try:
        text = data.decode("ascii")
    except UnicodeDecodeError as exc:
        raise UpnpError(f"{what} is not ASCII") from exc
    if any(ch < " " and ch not in "\r\n\t" for ch in text) or "\x7f" in text:
        raise UpnpError(f"{what} has control characters")
    return text


def parse_ssdp_response(data: bytes) -> SsdpResponse:
    """Parse an SSDP search answer (``HTTP/1.1 200 OK`` with LOCATION and ST).

    Raises:
        UpnpError: over ``MAX_SSDP`` bytes, not ASCII, not a 200 answer (a NOTIFY or an
            M-SEARCH from another client too), or LOCATION/ST missing or empty.
    """
    if len(data) > MAX_SSDP:
        raise UpnpError(f"SSDP answer of {len(data)} bytes (limit {MAX_SSDP})")
    status, headers = _head_lines(_ascii(bytes(data), "SSDP answer"))
    parts = status.split(" ", 2)
    if len(parts) < 2 or not parts[0].startswith("HTTP/1.") or parts[1] != "200":
        raise UpnpError(f"not an SSDP search answer: {status[:60]!r}")
    location, st = headers.get("location", ""), headers.get("st", "")
    if not location or not st:
        raise UpnpError("SSDP answer without LOCATION or ST")
    return SsdpResponse(location=location, st=st, usn=headers.get("usn", ""),
                        server=headers.get("server", "")[:200])


# -- URLs ------------------------------------------------------------------------------
@dataclass(frozen=True)
class HttpUrl:
    """A checked ``http://`` URL whose host is an IP literal."""

    host: str
    """The IP address, normalised (no brackets)."""
    port: int
    path: str
    """Path and query, starting with ``/``, printable ASCII without spaces."""

    @property
    def netloc(self) -> str:
        """``host:port`` as written in a Host header (IPv6 in brackets)."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    def __str__(self) -> str:
        return f"http://{self.netloc}{self.path}"


def parse_url(text: str) -> HttpUrl:
    """Parse ``http://<ip>[:port][/path]``.

    Raises:
        UpnpError: another scheme, a host name, user info, a bad port, a fragment or any
            character outside printable ASCII (which could smuggle a header into a
            request line).
    """
    if len(text) > 1024 or not _URL_CHARS.match(text):
        raise UpnpError(f"unusable URL {text[:80]!r}")
    try:
        parts = urlsplit(text)
        port = parts.port or 80
    except ValueError as exc:
        raise UpnpError(f"unusable URL {text[:80]!r}: {exc}") from exc
    if parts.scheme != "http" or parts.username is not None or "@" in parts.netloc:
        raise UpnpError(f"not a plain http:// URL: {text[:80]!r}")
    if parts.fragment or not parts.hostname:
        raise UpnpError(f"unusable URL {text[:80]!r}")
    try:
        host = str(ipaddress.ip_address(parts.hostname))
    except ValueError as exc:
        raise UpnpError(f"URL host is not an IP address: {parts.hostname[:60]!r}") from exc
    path = parts.path or "/"
    if parts.query:
        path += "?" + parts.query
    return HttpUrl(host=host, port=port, path=path)


def _same_host(host: str, responder_ip: str) -> bool:
    try:
        a, b = ipaddress.ip_address(host), ipaddress.ip_address(responder_ip.split("%")[0])
    except ValueError:
        return False
    if isinstance(b, ipaddress.IPv6Address) and b.ipv4_mapped is not None:
        b = b.ipv4_mapped
    return a == b


def check_location(location: str, responder_ip: str) -> HttpUrl:
    """The LOCATION as an :class:`HttpUrl`, if it is on ``responder_ip`` (the SSDP
    answer's source address).

    Raises:
        UpnpError: unusable URL, or another host (a device must not send us elsewhere).
    """
    url = parse_url(location)
    if not _same_host(url.host, responder_ip):
        raise UpnpError(f"LOCATION host {url.host} is not the responder {responder_ip}")
    return url


# -- HTTP ------------------------------------------------------------------------------
def http_get(url: HttpUrl) -> bytes:
    """A ``GET`` request for ``url`` (HTTP/1.1, ``Connection: close``)."""
    return (f"GET {url.path} HTTP/1.1\r\nHost: {url.netloc}\r\nConnection: close\r\n"
            "User-Agent: quictun\r\n\r\n").encode("ascii")


@dataclass(frozen=True)
class HttpResponse:
    """A complete HTTP response."""

    status: int
    headers: dict[str, str]
    """Header names lower-cased; the first of repeated headers kept."""
    body: bytes


def _dechunk(data: bytes, eof: bool, max_body: int) -> bytes | None:
    out = bytearray()
    pos = 0
    while True:
        end = data.find(b"\r\n", pos)
        if end < 0:
            if eof or len(data) - pos > 64:
                raise UpnpError("truncated or malformed chunk size")
            return None
        size_text = data[pos:end].split(b";", 1)[0].strip()
        if not size_text or len(size_text) > 8 or not re.fullmatch(rb"[0-9A-Fa-f]+", size_text):
            raise UpnpError("malformed chunk size")
        size = int(size_text, 16)
        if size == 0:
            return bytes(out)
        if len(out) + size > max_body:
            raise UpnpError(f"HTTP body over {max_body} bytes")
        start = end + 2
        if len(data) < start + size + 2:
            if eof:
                raise UpnpError("truncated chunk")
            return None
        if data[start + size:start + size + 2] != b"\r\n":
            raise UpnpError("malformed chunk")
        out += data[start:start + size]
        pos = start + size + 2


def parse_http_response(data: bytes, *, eof: bool, max_body: int) -> HttpResponse | None:
    """Parse an HTTP/1.x response read so far.

    Call after every read with ``eof`` telling whether the peer closed; returns None
    while more bytes are needed (only when ``eof`` is False). The body ends by
    Content-Length, chunked encoding, or the connection's end.

    Raises:
        UpnpError: head over ``MAX_HEAD`` bytes, body over ``max_body``, a malformed or
            truncated message, or not HTTP.
    """
    data = bytes(data)
    head_end = data.find(b"\r\n\r\n")
    if head_end < 0:
        if len(data) > MAX_HEAD:
            raise UpnpError(f"HTTP head over {MAX_HEAD} bytes")
        if eof:
            raise UpnpError("connection closed before the end of the HTTP head")
        return None
    if head_end > MAX_HEAD:
        raise UpnpError(f"HTTP head over {MAX_HEAD} bytes")
    status_line, headers = _head_lines(_ascii(data[:head_end], "HTTP head"))
    m = re.match(r"^HTTP/1\.[01] ([1-5][0-9][0-9])(?: |$)", status_line)
    if not m:
        raise UpnpError(f"not an HTTP response: {status_line[:60]!r}")
    body = data[head_end + 4:]
    if "chunked" in headers.get("transfer-encoding", "").lower():
        dechunked = _dechunk(body, eof, max_body)
        if dechunked is None:
            return None
        body = dechunked
    elif "content-length" in headers:
        text = headers["content-length"]
        if not text.isdigit() or len(text) > 9:
            raise UpnpError(f"bad Content-Length {text[:20]!r}")
        length = int(text)
        if length > max_body:
            raise UpnpError(f"HTTP body of {length} bytes (limit {max_body})")
        if len(body) < length:
            if eof:
                raise UpnpError("connection closed before the end of the HTTP body")
            return None
        body = body[:length]
    else:
        if len(body) > max_body:
            raise UpnpError(f"HTTP body over {max_body} bytes")
        if not eof:
            return None
    return HttpResponse(status=int(m.group(1)), headers=headers, body=body)


# -- XML -------------------------------------------------------------------------------
def _xml(data: bytes, limit: int, what: str) -> ET.Element:
    if len(data) > limit:
        raise UpnpError(f"{what} of {len(data)} bytes (limit {limit})")
    try:
        return SafeET.fromstring(data, forbid_dtd=True, forbid_entities=True,
                                 forbid_external=True)
    except defusedxml.DefusedXmlException as exc:
        raise UpnpError(f"{what} refused: {type(exc).__name__}") from exc
    except ET.ParseError as exc:
        raise UpnpError(f"{what} is not well-formed XML: {exc}") from exc


def _local(tag: object) -> str:
    return tag.rsplit("}", 1)[-1] if isinstance(tag, str) else ""


def _child_text(elem: ET.Element, name: str, limit: int = 1024) -> str:
    for child in elem:
        if _local(child.tag) == name:
            text = (child.text or "").strip()
            if len(text) > limit:
                raise UpnpError(f"<{name}> longer than {limit} characters")
            return text
    return ""


@dataclass(frozen=True)
class IgdService:
    """The port-mapping service of a gateway."""

    service_type: str
    """One of :data:`WAN_SERVICES`."""
    control_url: HttpUrl
    """Where SOAP actions go (on the host that answered SSDP)."""

    @property
    def version(self) -> int:
        """1 or 2 (AddAnyPortMapping exists only in version 2)."""
        return int(self.service_type.rsplit(":", 1)[1])


def parse_description(data: bytes, location: HttpUrl) -> IgdService:
    """Find the best WAN*Connection service in a device description.

    Relative control URLs resolve against ``<URLBase>`` or ``location``. The result must
    be on ``location``'s host (any port).

    Raises:
        UpnpError: too large, not well-formed or forbidden XML (DTD, entities), no
            port-mapping service, or a control URL that is unusable or on another host.
    """
    root = _xml(bytes(data), MAX_DESCRIPTION, "device description")
    base = _child_text(root, "URLBase") or str(location)
    found: dict[str, str] = {}
    for elem in root.iter():
        if _local(elem.tag) != "service":
            continue
        stype = _child_text(elem, "serviceType", 256)
        if stype in WAN_SERVICES and stype not in found:
            found[stype] = _child_text(elem, "controlURL")
    for stype in WAN_SERVICES:
        if stype in found:
            if not found[stype]:
                raise UpnpError(f"{stype} has no controlURL")
            if not (_URL_CHARS.match(found[stype]) and _URL_CHARS.match(base)):
                raise UpnpError(f"unusable controlURL {found[stype][:80]!r}")
            try:
                absolute = urljoin(base, found[stype])
            except ValueError as exc:
                raise UpnpError(f"unusable controlURL {found[stype][:80]!r}") from exc
            url = parse_url(absolute)
            if not _same_host(url.host, location.host):
                raise UpnpError(f"control URL on another host: {url.host} "
                                f"(the device is {location.host})")
            return IgdService(service_type=stype, control_url=url)
    raise UpnpError("no WANIPConnection or WANPPPConnection service in the description")


# -- SOAP ------------------------------------------------------------------------------
def soap_request(service: IgdService, action: str, args: list[tuple[str, str]]) -> bytes:
    """A complete HTTP POST carrying SOAP ``action`` with ``args`` (XML-escaped)."""
    if not _TOKEN.match(action) or any(not _TOKEN.match(name) for name, _ in args):
        raise UpnpError(f"bad action or argument name in {action!r}")
    inner = "".join(f"<{n}>{escape(v)}</{n}>" for n, v in args)
    body = ('<?xml version="1.0"?>\r\n'
            f'<s:Envelope xmlns:s="{_SOAP_ENV}" '
            's:encodingStyle="http://schemas.xmlsoap.org/soap/encoding/">'
            f'<s:Body><u:{action} xmlns:u="{service.service_type}">{inner}</u:{action}>'
            "</s:Body></s:Envelope>\r\n").encode()
    url = service.control_url
    head = (f"POST {url.path} HTTP/1.1\r\nHost: {url.netloc}\r\n"
            'Content-Type: text/xml; charset="utf-8"\r\n'
            f'SOAPAction: "{service.service_type}#{action}"\r\n'
            f"Content-Length: {len(body)}\r\nConnection: close\r\n"
            "User-Agent: quictun\r\n\r\n")
    return head.encode("ascii") + body


def get_external_ip_request(service: IgdService) -> bytes:
    """GetExternalIPAddress (answer: ``NewExternalIPAddress``)."""
    return soap_request(service, "GetExternalIPAddress", [])


def _mapping_args(external_port: int, internal_port: int, internal_client: str,
                  description: str, lease: int, protocol: str) -> list[tuple[str, str]]:
    for port in (external_port, internal_port):
        if not 0 <= port <= 0xFFFF:
            raise UpnpError(f"port out of range: {port}")
    if protocol not in ("UDP", "TCP") or not 0 <= lease <= 604800:
        raise UpnpError(f"bad protocol or lease: {protocol!r} {lease!r}")
    try:
        ipaddress.IPv4Address(internal_client)
    except ValueError as exc:
        raise UpnpError(f"internal client is not an IPv4 address: {internal_client!r}") \
            from exc
    desc = "".join(ch for ch in description if " " <= ch <= "~")[:64]
    return [("NewRemoteHost", ""), ("NewExternalPort", str(external_port)),
            ("NewProtocol", protocol), ("NewInternalPort", str(internal_port)),
            ("NewInternalClient", internal_client), ("NewEnabled", "1"),
            ("NewPortMappingDescription", desc), ("NewLeaseDuration", str(lease))]


def add_port_mapping_request(service: IgdService, external_port: int, internal_port: int,
                             internal_client: str, *, description: str, lease: int,
                             protocol: str = "UDP") -> bytes:
    """AddPortMapping: ``external_port`` exactly, or fault 718 if taken. ``lease`` in
    seconds, 0 meaning permanent (IGD v1 only)."""
    return soap_request(service, "AddPortMapping", _mapping_args(
        external_port, internal_port, internal_client, description, lease, protocol))


def add_any_port_mapping_request(service: IgdService, external_port: int,
                                 internal_port: int, internal_client: str, *,
                                 description: str, lease: int,
                                 protocol: str = "UDP") -> bytes:
    """AddAnyPortMapping (IGD v2): ``external_port`` is a wish; the answer's
    ``NewReservedPort`` is the port granted."""
    return soap_request(service, "AddAnyPortMapping", _mapping_args(
        external_port, internal_port, internal_client, description, lease, protocol))


def delete_port_mapping_request(service: IgdService, external_port: int,
                                protocol: str = "UDP") -> bytes:
    """DeletePortMapping of ``external_port``."""
    if not 0 < external_port <= 0xFFFF or protocol not in ("UDP", "TCP"):
        raise UpnpError(f"bad port or protocol: {external_port!r} {protocol!r}")
    return soap_request(service, "DeletePortMapping", [
        ("NewRemoteHost", ""), ("NewExternalPort", str(external_port)),
        ("NewProtocol", protocol)])


def _fault(body: ET.Element) -> UpnpFault:
    code: int | None = None
    description = ""
    for elem in body.iter():
        if _local(elem.tag) == "UPnPError":
            code_text = _child_text(elem, "errorCode", 16)
            code = int(code_text) if code_text.isdigit() else None
            description = _child_text(elem, "errorDescription", 4096)[:200]
            break
    if code is None and not description:
        for elem in body.iter():
            if _local(elem.tag) == "faultstring":
                description = (elem.text or "").strip()[:200]
    clean = "".join(ch if ch.isprintable() else "?" for ch in description)
    return UpnpFault(code, clean)


def parse_soap_response(resp: HttpResponse, action: str) -> dict[str, str]:
    """The output arguments of ``action`` from a SOAP answer.

    Raises:
        UpnpFault: the device refused (a SOAP Fault, usually HTTP 500, with its code).
        UpnpError: a redirect or any other status, or a body that is not a SOAP answer
            to ``action``.
    """
    if 300 <= resp.status < 400:
        raise UpnpError(f"HTTP {resp.status} redirect refused")
    if resp.status not in (200, 500):
        raise UpnpError(f"HTTP {resp.status} from the control URL")
    root = _xml(resp.body, MAX_SOAP, "SOAP answer")
    if _local(root.tag) != "Envelope":
        raise UpnpError("SOAP answer without an Envelope")
    body = next((c for c in root if _local(c.tag) == "Body"), None)
    if body is None or len(body) == 0:
        raise UpnpError("SOAP answer without a Body")
    first = body[0]
    if _local(first.tag) == "Fault":
        raise _fault(first)
    if resp.status != 200 or _local(first.tag) != f"{action}Response":
        raise UpnpError(f"not an answer to {action}: <{_local(first.tag)[:60]}>")
    out: dict[str, str] = {}
    for child in first:
        text = (child.text or "").strip()
        if len(text) > 1024:
            raise UpnpError(f"<{_local(child.tag)[:60]}> too long")
        out[_local(child.tag)] = text
    return out


def external_ip_of(values: dict[str, str]) -> str:
    """``NewExternalIPAddress`` as a usable IPv4 address.

    Raises:
        UpnpError: missing, empty, not IPv4, or unspecified (the device has no address).
    """
    text = values.get("NewExternalIPAddress", "")
    try:
        ip = ipaddress.IPv4Address(text)
    except ValueError as exc:
        raise UpnpError(f"no usable external address: {text[:40]!r}") from exc
    if ip.is_unspecified or ip.is_multicast or ip.is_loopback:
        raise UpnpError(f"no usable external address: {ip}")
    return str(ip)


def reserved_port_of(values: dict[str, str]) -> int:
    """``NewReservedPort`` of an AddAnyPortMapping answer.

    Raises:
        UpnpError: missing or not a port number 1..65535.
    """
    text = values.get("NewReservedPort", "")
    if not text.isdigit() or len(text) > 5 or not 0 < int(text) <= 0xFFFF:
        raise UpnpError(f"bad NewReservedPort {text[:20]!r}")
    return int(text)
