"""UPnP IGD codec (quictun.proto.upnp): SSDP, URLs, descriptions, SOAP, hostile input.

The well-formed samples are what miniupnpd 2.3.1 (Debian) sends in the lab, trimmed.
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from quictun.proto import upnp

SSDP = (b"HTTP/1.1 200 OK\r\nCACHE-CONTROL: max-age=120\r\n"
        b"ST: urn:schemas-upnp-org:device:InternetGatewayDevice:1\r\n"
        b"USN: uuid:5941e5b8::urn:schemas-upnp-org:device:InternetGatewayDevice:1\r\n"
        b"EXT:\r\nSERVER: Debian UPnP/1.1 MiniUPnPd/2.3.1\r\n"
        b"LOCATION: http://198.19.1.1:42819/rootDesc.xml\r\n\r\n")
LOCATION = upnp.HttpUrl("198.19.1.1", 42819, "/rootDesc.xml")


def description(services: str, *, urlbase: str = "") -> bytes:
    return (
        '<?xml version="1.0"?>\n<root xmlns="urn:schemas-upnp-org:device-1-0">'
        f"{urlbase}<device><deviceType>urn:schemas-upnp-org:device:InternetGatewayDevice:2"
        "</deviceType><serviceList><service><serviceType>urn:schemas-upnp-org:service:"
        "Layer3Forwarding:1</serviceType><controlURL>/ctl/L3F</controlURL></service>"
        "</serviceList><deviceList><device><deviceType>urn:schemas-upnp-org:device:"
        "WANDevice:2</deviceType><deviceList><device><serviceList>"
        f"{services}</serviceList></device></deviceList></device></deviceList></device>"
        "</root>").encode()


def service(stype: str, control: str) -> str:
    return (f"<service><serviceType>urn:schemas-upnp-org:service:{stype}</serviceType>"
            f"<controlURL>{control}</controlURL></service>")


IGD2 = description(service("WANIPConnection:2", "/ctl/IPConn")
                   + service("WANIPv6FirewallControl:1", "/ctl/IP6FCtl"))
SOAP_NS = ('xmlns:s="http://schemas.xmlsoap.org/soap/envelope/" '
           's:encodingStyle="http://schemas.xmlsoap.org/soap/encoding/"')


def soap_body(inner: str) -> bytes:
    return f'<?xml version="1.0"?>\n<s:Envelope {SOAP_NS}><s:Body>{inner}</s:Body>' \
           '</s:Envelope>'.encode()


def http(status: int, body: bytes) -> upnp.HttpResponse:
    return upnp.HttpResponse(status=status, headers={}, body=body)


FAULT_718 = soap_body(
    "<s:Fault><faultcode>s:Client</faultcode><faultstring>UPnPError</faultstring><detail>"
    '<UPnPError xmlns="urn:schemas-upnp-org:control-1-0"><errorCode>718</errorCode>'
    "<errorDescription>ConflictInMappingEntry</errorDescription></UPnPError></detail>"
    "</s:Fault>")
SVC = upnp.IgdService("urn:schemas-upnp-org:service:WANIPConnection:2",
                      upnp.HttpUrl("198.19.1.1", 42819, "/ctl/IPConn"))


# -- SSDP ------------------------------------------------------------------------------
def test_msearch() -> None:
    text = upnp.msearch(upnp.ST_IGD1, mx=2).decode()
    assert text.startswith("M-SEARCH * HTTP/1.1\r\nHOST: 239.255.255.250:1900\r\n")
    assert 'MAN: "ssdp:discover"\r\n' in text and "MX: 2\r\n" in text
    assert text.endswith(f"ST: {upnp.ST_IGD1}\r\n\r\n")
    with pytest.raises(upnp.UpnpError):
        upnp.msearch("bad\r\nX: y")


def test_parse_ssdp_response() -> None:
    answer = upnp.parse_ssdp_response(SSDP)
    assert answer.location == "http://198.19.1.1:42819/rootDesc.xml"
    assert answer.st == upnp.ST_IGD1 and answer.usn.startswith("uuid:")
    assert "MiniUPnPd" in answer.server
    assert upnp.check_location(answer.location, "198.19.1.1") == LOCATION
    assert upnp.check_location(answer.location, "::ffff:198.19.1.1") == LOCATION


@pytest.mark.parametrize("data, why", [
    (SSDP.replace(b"200 OK", b"404 Not Found"), "not an SSDP"),
    (b"NOTIFY * HTTP/1.1\r\nLOCATION: http://198.19.1.1/\r\nNT: x\r\n\r\n", "not an SSDP"),
    (b"M-SEARCH * HTTP/1.1\r\nST: ssdp:all\r\n\r\n", "not an SSDP"),
    (SSDP.replace(b"LOCATION", b"X-LOCATION"), "without LOCATION"),
    (SSDP + b"X: " + b"a" * 3000 + b"\r\n", "limit"),
    (SSDP.replace(b"EXT:", b"EXT: \xff"), "ASCII"),
    (SSDP.replace(b"EXT:", b"EXT: \x00"), "control"),
    (SSDP.replace(b"EXT:", b" folded"), "malformed header"),
])
def test_ssdp_rejects(data: bytes, why: str) -> None:
    with pytest.raises(upnp.UpnpError, match=why):
        upnp.parse_ssdp_response(data)


@pytest.mark.parametrize("location, why", [
    ("http://198.19.1.99:80/d.xml", "not the responder"),  # another host on the LAN
    ("http://203.0.113.5/d.xml", "not the responder"),
    ("http://router.lan/d.xml", "not an IP"),
    ("https://198.19.1.1/d.xml", "plain http"),
    ("http://user@198.19.1.1/d.xml", "plain http"),
    ("http://198.19.1.1:99999/d.xml", "unusable"),
    ("http://198.19.1.1/d.xml\r\nX-Injected: 1", "unusable"),
    ("http://198.19.1.1/a b", "unusable"),
    ("file:///etc/passwd", "plain http"),
    ("http://198.19.1.1/" + "a" * 2000, "unusable"),
])
def test_location_must_be_the_responder(location: str, why: str) -> None:
    with pytest.raises(upnp.UpnpError, match=why):
        upnp.check_location(location, "198.19.1.1")


def test_url_forms() -> None:
    assert upnp.parse_url("http://198.19.1.1") == upnp.HttpUrl("198.19.1.1", 80, "/")
    v6 = upnp.parse_url("http://[2001:db8::1]:5000/x?y=1")
    assert (v6.host, v6.port, v6.path, v6.netloc) == ("2001:db8::1", 5000, "/x?y=1",
                                                      "[2001:db8::1]:5000")
    assert str(LOCATION) == "http://198.19.1.1:42819/rootDesc.xml"
    assert upnp.http_get(LOCATION).startswith(
        b"GET /rootDesc.xml HTTP/1.1\r\nHost: 198.19.1.1:42819\r\nConnection: close\r\n")


# -- HTTP ------------------------------------------------------------------------------
def test_http_content_length_and_incremental() -> None:
    raw = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nConnection: close\r\n\r\nhello"
    for cut in range(len(raw)):
        assert upnp.parse_http_response(raw[:cut], eof=False, max_body=100) is None
    resp = upnp.parse_http_response(raw + b"trailing junk", eof=False, max_body=100)
    assert resp is not None and resp.status == 200 and resp.body == b"hello"
    assert resp.headers["connection"] == "close"


def test_http_chunked_and_read_to_eof() -> None:
    raw = (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
           b"3\r\nabc\r\n2;x=y\r\nde\r\n0\r\n\r\n")
    assert upnp.parse_http_response(raw[:-7], eof=False, max_body=100) is None
    resp = upnp.parse_http_response(raw, eof=False, max_body=100)
    assert resp is not None and resp.body == b"abcde"
    plain = b"HTTP/1.0 500 Internal Server Error\r\n\r\nbody"
    assert upnp.parse_http_response(plain, eof=False, max_body=100) is None
    done = upnp.parse_http_response(plain, eof=True, max_body=100)
    assert done is not None and done.status == 500 and done.body == b"body"


@pytest.mark.parametrize("raw, eof, why", [
    (b"HTTP/1.1 200 OK\r\n" + b"X: y\r\n" * 2000, False, "head over"),
    (b"HTTP/1.1 200 OK\r\nContent-Length: 999999\r\n\r\n", False, "limit"),
    (b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n", False, "Content-Length"),
    (b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc", True, "closed before"),
    (b"HTTP/1.1 200 OK\r\n\r\n" + b"x" * 200, False, "over"),
    (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nfffffff\r\n", False, "over"),
    (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n", False, "chunk size"),
    (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabcX\r\n0\r\n\r\n", False,
     "malformed chunk"),
    (b"SSH-2.0-OpenSSH\r\n\r\n", False, "not an HTTP"),
    (b"HTTP/1.1 200", True, "before the end"),
])
def test_http_rejects(raw: bytes, eof: bool, why: str) -> None:
    with pytest.raises(upnp.UpnpError, match=why):
        upnp.parse_http_response(raw, eof=eof, max_body=100)


# -- description -----------------------------------------------------------------------
def test_description_finds_the_wan_service() -> None:
    svc = upnp.parse_description(IGD2, LOCATION)
    assert svc.service_type.endswith("WANIPConnection:2") and svc.version == 2
    assert svc.control_url == upnp.HttpUrl("198.19.1.1", 42819, "/ctl/IPConn")


def test_description_preference_and_urlbase() -> None:
    both = description(service("WANPPPConnection:1", "/ppp")
                       + service("WANIPConnection:1", "ip1"),
                       urlbase="<URLBase>http://198.19.1.1:5000/base/</URLBase>")
    svc = upnp.parse_description(both, LOCATION)
    assert svc.version == 1 and svc.service_type.endswith("WANIPConnection:1")
    assert svc.control_url == upnp.HttpUrl("198.19.1.1", 5000, "/base/ip1")
    ppp = upnp.parse_description(description(service("WANPPPConnection:1", "/ppp")), LOCATION)
    assert ppp.service_type.endswith("WANPPPConnection:1")


BILLION_LAUGHS = b"""<?xml version="1.0"?>
<!DOCTYPE root [<!ENTITY a "aaaaaaaaaa"><!ENTITY b "&a;&a;&a;&a;&a;&a;&a;&a;&a;&a;">
<!ENTITY c "&b;&b;&b;&b;&b;&b;&b;&b;&b;&b;"><!ENTITY d "&c;&c;&c;&c;&c;&c;&c;&c;&c;&c;">]>
<root><x>&d;</x></root>"""
EXTERNAL_ENTITY = (b'<?xml version="1.0"?><!DOCTYPE root [<!ENTITY e SYSTEM '
                   b'"file:///etc/passwd">]><root>&e;</root>')


@pytest.mark.parametrize("data, why", [
    (BILLION_LAUGHS, "refused"),
    (EXTERNAL_ENTITY, "refused"),
    (b'<?xml version="1.0"?><!DOCTYPE root SYSTEM "http://198.19.1.1/x.dtd"><root/>',
     "refused"),
    (b"<root><unclosed></root>", "not well-formed"),
    (b"\x00\x01\x02", "not well-formed"),
    (b"<root>" + b"<a/>" * 20000 + b"</root>", "limit"),
    (description(service("WANIPConnection:1", "http://203.0.113.9:80/ctl")), "another host"),
    (description(service("WANIPConnection:1", "http://198.19.1.77/ctl")), "another host"),
    (description(service("WANIPConnection:1", "//203.0.113.9/ctl")), "another host"),
    (description(service("WANIPConnection:1", "")), "no controlURL"),
    (description(service("WANIPConnection:1", "http://198.19.1.1/a\tb")), "unusable"),
    (description(service("WANIPConnection:1", "/x"),
                 urlbase="<URLBase>http://203.0.113.9/</URLBase>"), "another host"),
    (description(service("Layer3Forwarding:1", "/l3f")), "no WANIPConnection"),
])
def test_description_rejects(data: bytes, why: str) -> None:
    with pytest.raises(upnp.UpnpError, match=why):
        upnp.parse_description(data, LOCATION)


# -- SOAP ------------------------------------------------------------------------------
def test_soap_requests() -> None:
    req = upnp.add_port_mapping_request(SVC, 40000, 40001, "198.19.1.2",
                                        description="quictun <&>\x07", lease=300)
    head, _, body = req.partition(b"\r\n\r\n")
    assert head.startswith(b"POST /ctl/IPConn HTTP/1.1\r\nHost: 198.19.1.1:42819\r\n")
    assert b'SOAPAction: "urn:schemas-upnp-org:service:WANIPConnection:2#AddPortMapping"' \
        in head
    assert f"Content-Length: {len(body)}".encode() in head
    assert (b"<NewRemoteHost></NewRemoteHost><NewExternalPort>40000</NewExternalPort>"
            b"<NewProtocol>UDP</NewProtocol><NewInternalPort>40001</NewInternalPort>"
            b"<NewInternalClient>198.19.1.2</NewInternalClient><NewEnabled>1</NewEnabled>"
            b"<NewPortMappingDescription>quictun &lt;&amp;&gt;</NewPortMappingDescription>"
            b"<NewLeaseDuration>300</NewLeaseDuration>") in body
    assert b"<u:AddAnyPortMapping " in upnp.add_any_port_mapping_request(
        SVC, 0, 1, "198.19.1.2", description="", lease=0)
    delete = upnp.delete_port_mapping_request(SVC, 40000)
    assert b"<NewExternalPort>40000</NewExternalPort><NewProtocol>UDP" in delete
    assert b"<u:GetExternalIPAddress xmlns:u=" in upnp.get_external_ip_request(SVC)
    for bad in ({"internal_client": "::1"}, {"lease": -1}, {"external_port": 70000}):
        args = {"external_port": 1, "internal_client": "198.19.1.2", "lease": 1} | bad
        with pytest.raises(upnp.UpnpError):
            upnp.add_port_mapping_request(SVC, args["external_port"], 1,
                                          args["internal_client"], description="",
                                          lease=args["lease"])


def test_soap_answers() -> None:
    ext = soap_body('<u:GetExternalIPAddressResponse xmlns:u="urn:x"><NewExternalIPAddress>'
                    "198.18.0.11</NewExternalIPAddress></u:GetExternalIPAddressResponse>")
    values = upnp.parse_soap_response(http(200, ext), "GetExternalIPAddress")
    assert upnp.external_ip_of(values) == "198.18.0.11"
    anyport = soap_body('<u:AddAnyPortMappingResponse xmlns:u="urn:x"><NewReservedPort>5555'
                        "</NewReservedPort></u:AddAnyPortMappingResponse>")
    assert upnp.reserved_port_of(upnp.parse_soap_response(http(200, anyport),
                                                          "AddAnyPortMapping")) == 5555
    with pytest.raises(upnp.UpnpFault) as info:
        upnp.parse_soap_response(http(500, FAULT_718), "AddPortMapping")
    assert info.value.code == upnp.FAULT_CONFLICT
    assert info.value.description == "ConflictInMappingEntry"


@pytest.mark.parametrize("values", [{}, {"NewExternalIPAddress": ""},
                                    {"NewExternalIPAddress": "0.0.0.0"},
                                    {"NewExternalIPAddress": "2001:db8::1"},
                                    {"NewExternalIPAddress": "<script>"}])
def test_no_usable_external_address(values: dict[str, str]) -> None:
    with pytest.raises(upnp.UpnpError):
        upnp.external_ip_of(values)


@pytest.mark.parametrize("resp, why", [
    (http(302, b""), "redirect refused"),
    (http(404, b""), "HTTP 404"),
    (http(200, b"<html>hi</html>"), "Envelope"),
    (http(200, soap_body("")), "without a Body"),
    (http(200, soap_body('<u:OtherResponse xmlns:u="urn:x"/>')), "not an answer"),
    (http(500, soap_body('<u:AddPortMappingResponse xmlns:u="urn:x"/>')), "not an answer"),
    (http(200, BILLION_LAUGHS), "refused"),
    (http(200, soap_body('<u:AddPortMappingResponse xmlns:u="urn:x"><x>' + "a" * 2000 + "</x>"
                         "</u:AddPortMappingResponse>")), "too long"),
])
def test_soap_rejects(resp: upnp.HttpResponse, why: str) -> None:
    with pytest.raises(upnp.UpnpError, match=why) as info:
        upnp.parse_soap_response(resp, "AddPortMapping")
    assert not isinstance(info.value, upnp.UpnpFault)


def test_fault_text_is_bounded_and_printable() -> None:
    body = soap_body("<s:Fault><detail><UPnPError><errorCode>x</errorCode><errorDescription>"
                     + "evil\u202e" + "d" * 500
                     + "</errorDescription></UPnPError></detail></s:Fault>")
    with pytest.raises(upnp.UpnpFault) as info:
        upnp.parse_soap_response(http(500, body), "AddPortMapping")
    assert info.value.code is None and len(info.value.description) <= 200
    assert info.value.description.isprintable()


# -- fuzzing ---------------------------------------------------------------------------
@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=3000))
def test_fuzz_ssdp(data: bytes) -> None:
    try:
        upnp.parse_ssdp_response(data)
    except upnp.UpnpError:
        pass


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=600), st.booleans())
def test_fuzz_http(data: bytes, eof: bool) -> None:
    try:
        upnp.parse_http_response(b"HTTP/1.1 200 OK\r\n" + data, eof=eof, max_body=256)
    except upnp.UpnpError:
        pass


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=300))
def test_fuzz_description_and_soap(text: str) -> None:
    data = text.encode("utf-8", "surrogatepass")
    for call in (lambda: upnp.parse_description(data, LOCATION),
                 lambda: upnp.parse_soap_response(http(200, data), "AddPortMapping"),
                 lambda: upnp.parse_url(text)):
        try:
            call()
        except upnp.UpnpError:
            pass


@settings(max_examples=200, deadline=None)
@given(st.sampled_from([IGD2, FAULT_718, SSDP]), st.integers(0, 10**6), st.integers(0, 255))
def test_fuzz_mutated_samples(sample: bytes, pos: int, value: int) -> None:
    data = bytearray(sample)
    data[pos % len(data)] = value
    for call in (lambda: upnp.parse_description(bytes(data), LOCATION),
                 lambda: upnp.parse_soap_response(http(500, bytes(data)), "AddPortMapping"),
                 lambda: upnp.parse_ssdp_response(bytes(data))):
        try:
            call()
        except upnp.UpnpError:
            pass
