"""The --forward / --listen grammar and which service a request reaches."""

from __future__ import annotations

import pytest

from quictun.proto.services import (
    ListenSpec,
    Service,
    ServiceError,
    ServiceTable,
    parse_forward,
    parse_listen,
    services_from,
)


@pytest.mark.parametrize(("text", "want"), [
    ("127.0.0.1:22", Service("default", "tcp", "127.0.0.1", 22)),
    ("ssh=127.0.0.1:22", Service("ssh", "tcp", "127.0.0.1", 22)),
    ("web=tcp:localhost:8080", Service("web", "tcp", "localhost", 8080)),
    ("wg=udp:127.0.0.1:51820", Service("wg", "udp", "127.0.0.1", 51820)),
    ("udp:[::1]:53", Service("default", "udp", "::1", 53)),
    ("app=unix:/run/app.sock", Service("app", "unix", path="/run/app.sock")),
    ("unix:/tmp/a=b.sock", Service("default", "unix", path="/tmp/a=b.sock")),
])
def test_forward_specs(text: str, want: Service) -> None:
    assert parse_forward(text) == want


@pytest.mark.parametrize("text", [
    "22", "ssh=22", "host:0", "host:99999", "::1:22", "unix:relative.sock",
    "unix:/" + "x" * 200, "bad name=127.0.0.1:22", "=127.0.0.1:22", "udp:nohost",
])
def test_malformed_forward_specs(text: str) -> None:
    with pytest.raises(ServiceError) as exc:
        parse_forward(text)
    assert "\n" not in str(exc.value)


@pytest.mark.parametrize(("text", "want"), [
    ("2222", ListenSpec("tcp", "127.0.0.1", 2222)),
    ("0.0.0.0:2222", ListenSpec("tcp", "0.0.0.0", 2222)),
    ("web=8080", ListenSpec("tcp", "127.0.0.1", 8080, service="web")),
    ("udp:51820", ListenSpec("udp", "127.0.0.1", 51820)),
    ("wg=udp:[::1]:0", ListenSpec("udp", "::1", 0, service="wg")),
    ("unix:/tmp/home-web.sock", ListenSpec("unix", path="/tmp/home-web.sock")),
])
def test_listen_specs(text: str, want: ListenSpec) -> None:
    assert parse_listen(text) == want


def table() -> ServiceTable:
    return services_from(["127.0.0.1:22", "web=127.0.0.1:8080", "wg=udp:127.0.0.1:51820"])


def test_resolution_by_name_and_kind() -> None:
    t = table()
    assert t.resolve(None, stream=True).name == "default"
    assert t.resolve("web", stream=True).port == 8080
    assert t.resolve(None, stream=False).name == "wg"  # the only udp service
    with pytest.raises(ServiceError, match="no service 'nope'.*web"):
        t.resolve("nope", stream=True)
    with pytest.raises(ServiceError, match="'wg' is udp"):
        t.resolve("wg", stream=True)
    with pytest.raises(ServiceError, match="'web' is tcp"):
        t.resolve("web", stream=False)


def test_no_default_among_several_asks_for_a_name() -> None:
    t = services_from({"ssh": "127.0.0.1:22", "web": "127.0.0.1:80"})
    with pytest.raises(ServiceError, match="several services.*--service"):
        t.resolve(None, stream=True)
    with pytest.raises(ServiceError, match="no a udp service|no a udp"):
        t.resolve(None, stream=False)
    assert services_from({"only": "unix:/run/x.sock"}).resolve(None, True).kind == "unix"


def test_duplicate_names_are_refused() -> None:
    with pytest.raises(ServiceError, match="two --forward without a name"):
        services_from(["127.0.0.1:22", "127.0.0.1:23"])
    with pytest.raises(ServiceError, match="two services are called 'a'"):
        services_from(["a=127.0.0.1:22", "a=udp:127.0.0.1:23"])
    with pytest.raises(ServiceError, match="not a service name"):
        services_from({"a b": "127.0.0.1:22"})
