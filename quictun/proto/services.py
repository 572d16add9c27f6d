"""What ``serve`` offers and what ``connect`` binds: the ``--forward`` and ``--listen``
spec grammar, and the table that turns a client's request into one service (pure).

Grammar (one spec per ``--forward`` / ``--listen``)::

    forward  := [NAME "="] target        listen := [NAME "="] local
    target   := HOST:PORT | "tcp:" HOST:PORT | "udp:" HOST:PORT | "unix:" PATH
    local    := [HOST:]PORT | "tcp:" [HOST:]PORT | "udp:" [HOST:]PORT | "unix:" PATH
    NAME     := 1-64 of A-Z a-z 0-9 . _ -     (on --listen: the service to reach)

IPv6 hosts go in brackets (``[::1]:22``); a local host defaults to 127.0.0.1. A text
before ``=`` that is not a NAME belongs to the target (``unix:/tmp/a=b.sock``).

Services have a **kind**: ``tcp`` and ``unix`` are byte streams (one QUIC stream per
connection), ``udp`` is datagrams (one flow per client source address). A spec without
a name is the service called :data:`DEFAULT`. A request that names no service
(preamble version 0, or ``connect`` without ``--service``) gets, for its kind of
transport: the service ``default`` if it has that kind, else the only service of that
kind, else a refusal that lists the names (:meth:`ServiceTable.resolve`).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from .addr import parse_hostport

__all__ = ["DEFAULT", "KINDS", "ListenSpec", "Service", "ServiceError", "ServiceTable",
           "parse_forward", "parse_listen", "services_from", "valid_service_name"]

DEFAULT = "default"
KINDS = ("tcp", "udp", "unix")
STREAM_KINDS = ("tcp", "unix")
_NAME = re.compile(r"[A-Za-z0-9._-]{1,64}")
MAX_PATH = 107  # sun_path holds 108 bytes on Linux, one for the NUL


class ServiceError(ValueError):
    """A malformed spec, or a request no service answers; the text is for a person."""


def valid_service_name(name: str) -> bool:
    return bool(_NAME.fullmatch(name))


@dataclass(frozen=True)
class Service:
    """One thing ``serve`` makes reachable."""

    name: str
    kind: str
    """``tcp``, ``udp`` or ``unix``."""
    host: str = ""
    port: int = 0
    path: str = ""
    """For ``unix``: the socket's path."""

    @property
    def stream(self) -> bool:
        """True for byte-stream services (tcp, unix), False for datagrams (udp)."""
        return self.kind in STREAM_KINDS

    def target_text(self) -> str:
        if self.kind == "unix":
            return f"unix:{self.path}"
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{'udp:' if self.kind == 'udp' else ''}{host}:{self.port}"


@dataclass(frozen=True)
class ListenSpec:
    """One local endpoint of ``connect``: where to accept, and which service to reach
    (``service`` None: the one ``--service`` names, else the default)."""

    kind: str
    host: str = ""
    port: int = 0
    path: str = ""
    service: str | None = None

    def local_text(self) -> str:
        if self.kind == "unix":
            return f"unix:{self.path}"
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{'udp:' if self.kind == 'udp' else ''}{host}:{self.port}"


def _split_name(text: str, what: str) -> tuple[str | None, str]:
    name, sep, rest = text.partition("=")
    if sep and valid_service_name(name):
        return name, rest
    if sep and ":" not in name and "/" not in name:
        raise ServiceError(f"{what} {text!r}: {name!r} is not a service name "
                           "(1-64 of A-Z a-z 0-9 . _ -)")
    return None, text


def _split_kind(text: str) -> tuple[str, str]:
    for kind in KINDS:
        if text.startswith(kind + ":"):
            return kind, text[len(kind) + 1:]
    return "tcp", text


def _check_path(path: str, what: str, spec: str) -> str:
    if not path.startswith("/"):
        raise ServiceError(f"{what} {spec!r}: a unix socket needs an absolute path "
                           "(unix:/run/app.sock)")
    if len(path.encode()) > MAX_PATH or "\0" in path:
        raise ServiceError(f"{what} {spec!r}: the path is longer than a unix socket allows "
                           f"({MAX_PATH} bytes)")
    return path


def parse_forward(text: str) -> Service:
    """One ``--forward`` spec. Raises :class:`ServiceError` with a one-line reason."""
    name, rest = _split_name(text.strip(), "--forward")
    kind, addr = _split_kind(rest)
    name = name or DEFAULT
    if kind == "unix":
        return Service(name, "unix", path=_check_path(addr, "--forward", text))
    if ":" not in addr:
        raise ServiceError(f"--forward: {text!r} is not HOST:PORT (e.g. 127.0.0.1:22), "
                           "udp:HOST:PORT or unix:PATH")
    try:
        host, port = parse_hostport(addr)
    except ValueError as exc:
        raise ServiceError(f"--forward: {exc}") from None
    return Service(name, kind, host=host, port=port)


def parse_listen(text: str) -> ListenSpec:
    """One ``--listen`` spec (port 0: any free port). Raises :class:`ServiceError`."""
    name, rest = _split_name(text.strip(), "--listen")
    kind, addr = _split_kind(rest)
    if kind == "unix":
        return ListenSpec("unix", path=_check_path(addr, "--listen", text), service=name)
    try:
        host, port = parse_hostport(addr, allow_zero=True)
    except ValueError as exc:
        raise ServiceError(f"--listen: {exc}") from None
    return ListenSpec(kind, host=host, port=port, service=name)


class ServiceTable:
    """The services of one ``serve``, by name (names are unique across kinds)."""

    def __init__(self, services: Iterable[Service]) -> None:
        self.by_name: dict[str, Service] = {}
        for s in services:
            if s.name in self.by_name:
                which = ("two --forward without a name" if s.name == DEFAULT
                         else f"two services are called {s.name!r}")
                raise ServiceError(f"--forward: {which}; name them (NAME=HOST:PORT)")
            self.by_name[s.name] = s

    def __len__(self) -> int:
        return len(self.by_name)

    def __iter__(self):  # type: ignore[no-untyped-def]
        return iter(self.by_name.values())

    def resolve(self, name: str | None, stream: bool) -> Service:
        """The service a request asks for: by ``name``, or the default for a stream
        (``stream``) or datagram request. Raises :class:`ServiceError` saying why."""
        want = "a stream (tcp or unix)" if stream else "a udp"
        if name is not None:
            s = self.by_name.get(name)
            if s is None:
                raise ServiceError(f"no service {name!r} here ({self.names_text()})")
            if s.stream != stream:
                raise ServiceError(f"the service {name!r} is {s.kind}, not {want} service")
            return s
        s = self.by_name.get(DEFAULT)
        if s is not None and s.stream == stream:
            return s
        of_kind = [s for s in self.by_name.values() if s.stream == stream]
        if len(of_kind) == 1:
            return of_kind[0]
        if not of_kind:
            raise ServiceError(f"no {want} service here ({self.names_text()})")
        raise ServiceError(f"several services; name one with --service ({self.names_text()})")

    def names_text(self) -> str:
        if not self.by_name:
            return "it offers none"
        return "offered: " + ", ".join(f"{s.name} ({s.kind})" for s in self.by_name.values())


def services_from(forward: str | Mapping[str, str] | Iterable[str] | None) -> ServiceTable:
    """The table for :func:`quictun.serve`'s ``forward``: one spec text, a mapping of
    names to target texts, or several spec texts (the CLI's). Raises ServiceError."""
    if forward is None:
        return ServiceTable([])
    if isinstance(forward, str):
        return ServiceTable([parse_forward(forward)])
    if isinstance(forward, Mapping):
        out = []
        for name, target in forward.items():
            if not valid_service_name(name):
                raise ServiceError(f"{name!r} is not a service name (1-64 of A-Z a-z 0-9 . _ -)")
            out.append(parse_forward(f"{name}={target}"))
        return ServiceTable(out)
    return ServiceTable([parse_forward(t) for t in forward])
