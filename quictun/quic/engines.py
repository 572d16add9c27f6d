"""The one place that picks the QUIC implementation: aioquic or qh3.

``QUICTUN_ENGINE`` chooses: ``aioquic`` (default dependency), ``qh3`` (optional extra
``quictun[fast]``: an aioquic fork whose connection core is native Rust) or ``auto``
(qh3 when a usable one is installed, else aioquic). Unset means :data:`DEFAULT`, which
is ``auto``: installing ``quictun[fast]`` is enough to get qh3. Each end picks its own
engine; mixed pairs interoperate.

Everything QUIC-specific the rest of quictun needs goes through an :class:`Engine`:
the connection base class, the configuration class, the events module, the long-header
parser, building a configuration from our :class:`~quictun.proto.identity.Identity` and the
peer's identity fingerprint after the handshake.

The two engines differ where it matters to us:

* aioquic keeps its whole connection in Python; quictun overrides its flow-control
  writers (``flow.py``). qh3 2.x keeps frames, streams and credit in its native
  core: receive credit is granted as events are *popped* from that core, in arrival
  order, so per-stream limits come from the ``quictun/1+credit`` in-band credit
  (``credit.py``) and the core holds events only while the connection is full. quictun
  reaches into qh3 2.1's private internals for that (``_core``, ``_drain_core``), so
  only qh3 2.1.x is accepted (:data:`QH3_SUPPORTED`).
* aioquic takes ``cryptography`` objects for the certificate and key; qh3 takes its own
  (built from DER / PEM bytes). Both accept Ed25519 server certificates, but a qh3
  *client* does not offer Ed25519 unless told to (done here), so identities stay
  Ed25519 and fingerprints stay SHA-256 of the SubjectPublicKeyInfo.
"""

from __future__ import annotations

import importlib
import os
import re
import ssl
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache
from types import ModuleType
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from ..proto.identity import Identity, certificate_fingerprint

ENV = "QUICTUN_ENGINE"
NAMES = ("aioquic", "qh3")
CHOICES = (*NAMES, "auto")
# What an unset QUICTUN_ENGINE means: qh3 when installed (quictun[fast]), else aioquic,
# the default dependency. The two reasons qh3 was held back are fixed and tested in
# tests/quic/test_engines.py: a stalled stream no longer stalls a qh3 connection (the
# quictun/1+credit stream, creditstream.py), and a qh3 server answers an aioquic
# client's first flight (flow.py feeds its zero-padded Initial to qh3 whole).
DEFAULT = "auto"
# qh3 versions whose private internals flow.py relies on (pyproject pins the same range)
QH3_SUPPORTED = ((2, 1), (2, 2))  # >= 2.1, < 2.2


class EngineUnavailable(ImportError):
    """The requested QUIC implementation is not installed (or not a supported version)."""


@dataclass(frozen=True)
class Engine:
    """One QUIC implementation, as quictun uses it."""

    name: str
    QuicConnection: type[Any]
    QuicConfiguration: type[Any]
    events: ModuleType
    Buffer: type[Any]
    native_core: bool  # True: qh3 2.x (frames and credit live in Rust)
    errors: tuple[type[BaseException], ...]  # what a stream call on a dead stream raises

    def pull_quic_header(self, data: bytes, host_cid_length: int = 8) -> Any:
        """Parse a packet's header; ``.packet_type`` (None for a short header) and
        ``.destination_cid`` are what sessions look at. Raises ValueError if malformed."""
        return self._pull(self.Buffer(data=data), host_cid_length=host_cid_length)

    def server_initial(self, data: bytes) -> bytes | None:
        """The destination connection id of ``data`` if it may create a server connection:
        a long-header packet of at least 1200 bytes (a client pads its Initials so, RFC
        9000 section 14.1); None for anything else (short headers, runts, garbage). A
        stranger who learned the port cannot make a connection with a small packet."""
        if len(data) < 1200:
            return None
        try:
            header = self.pull_quic_header(data, host_cid_length=8)
        except Exception:  # the parsers raise ValueError and their own buffer errors
            return None
        return None if header.packet_type is None else bytes(header.destination_cid)

    @property
    def _pull(self) -> Any:
        return importlib.import_module(f"{self.name}.quic.packet").pull_quic_header

    def configuration(
        self,
        is_client: bool,
        identity: Identity,
        *,
        alpn: str | Sequence[str],
        max_datagram_size: int,
        max_stream_data: int,
        max_data: int,
        idle_timeout: float,
        max_datagram_frame_size: int | None = None,
    ) -> Any:
        """A client or server configuration carrying ``identity`` (the server's
        certificate; a client does not verify it: it pins the fingerprint after the
        handshake, see :meth:`peer_fingerprint`). ``alpn``: one protocol or several,
        in order of preference (a server picks the first one the client offers)."""
        cfg = self.QuicConfiguration(
            is_client=is_client,
            alpn_protocols=[alpn] if isinstance(alpn, str) else list(alpn),
            max_datagram_size=max_datagram_size,
            max_stream_data=max_stream_data,
            max_data=max_data,
            idle_timeout=idle_timeout,
        )
        # RFC 9221: the DATAGRAM frames we accept (None: none, the peer must not send any)
        cfg.max_datagram_frame_size = max_datagram_frame_size
        if self.name == "qh3":
            # qh3's own PMTU search (client only) runs on the virtual peer, blind to path
            # switches and with no black-hole fallback, and its core offers no way to
            # change the size later: keep qh3 at the given size (quictun.punch.pathmtu)
            cfg.probe_datagram_size = False
        if is_client:
            cfg.verify_mode = ssl.CERT_NONE  # we pin the fingerprint after the handshake
            cfg.server_name = "quictun"
            if self.name == "qh3":
                from qh3.tls import SignatureAlgorithm

                # qh3 clients probe the path MTU by default (1280..1472 bytes). QUIC
                # here talks to one virtual peer whatever the path (aio/driver.py), so a
                # size confirmed over the relay, or on IPv4, would then be used on a
                # direct path that may not carry it: a black hole. Path MTU is the
                # path layer's business; qh3 keeps max_datagram_size, like aioquic.
                cfg.probe_datagram_size = False
                # qh3 clients leave EdDSA out by default; our identities are Ed25519
                cfg.signature_algorithms = [
                    SignatureAlgorithm.ED25519,
                    SignatureAlgorithm.ECDSA_SECP256R1_SHA256,
                    SignatureAlgorithm.RSA_PSS_RSAE_SHA256,
                    SignatureAlgorithm.ECDSA_SECP384R1_SHA384,
                ]
        elif self.name == "qh3":
            from qh3._hazmat import Certificate
            from qh3.tls import load_pem_private_key

            cfg.certificate = Certificate(
                identity.certificate.public_bytes(serialization.Encoding.DER)
            )
            cfg.private_key = load_pem_private_key(
                identity.private_key.private_bytes(
                    serialization.Encoding.PEM,
                    serialization.PrivateFormat.PKCS8,
                    serialization.NoEncryption(),
                )
            )
        else:
            cfg.certificate = identity.certificate
            cfg.private_key = identity.private_key
        return cfg

    def peer_fingerprint(self, quic: Any) -> str:
        """The identity fingerprint of the peer's certificate ("" if it sent none)."""
        if self.name == "qh3":
            native = quic.get_peercert()
            if native is None:
                return ""
            cert = x509.load_der_x509_certificate(native.public_bytes())
        else:
            tls = quic.tls
            cert = tls._peer_certificate if tls is not None else None
            if cert is None:
                return ""
        return certificate_fingerprint(cert)


def _load_aioquic() -> Engine:
    from aioquic.buffer import Buffer
    from aioquic.quic import events
    from aioquic.quic.configuration import QuicConfiguration
    from aioquic.quic.connection import QuicConnection

    return Engine("aioquic", QuicConnection, QuicConfiguration, events, Buffer,
                  native_core=False, errors=(AssertionError, ValueError))


def _load_qh3() -> Engine:
    try:
        from qh3._hazmat import Buffer
        from qh3.quic import events
        from qh3.quic.configuration import QuicConfiguration
        from qh3.quic.connection import QuicConnection, QuicConnectionError
    except ImportError as exc:
        raise EngineUnavailable(
            f"qh3 is not installed (pip install 'quictun[fast]'): {exc}") from None
    import qh3

    version = _version_tuple(getattr(qh3, "__version__", "0"))
    low, high = QH3_SUPPORTED
    if not hasattr(QuicConnection, "_drain_core") or not low <= version < high:
        # qh3 1.x: a Python connection like aioquic's, with the flow-control writers
        # inlined; a later 2.x may move the internals flow.py reaches into
        raise EngineUnavailable(
            f"qh3 {getattr(qh3, '__version__', '?')} is not supported: quictun needs "
            "qh3 >= 2.1, < 2.2 (pip install 'quictun[fast]')")
    return Engine("qh3", QuicConnection, QuicConfiguration, events, Buffer,
                  native_core=True, errors=(AssertionError, ValueError, QuicConnectionError))


def _version_tuple(text: str) -> tuple[int, ...]:
    """(2, 1, 0) for "2.1.0"; non-numeric parts end it ("2.2.0rc1" -> (2, 2, 0))."""
    out = []
    for part in text.split("."):
        digits = re.match(r"\d*", part).group()  # type: ignore[union-attr]
        if not digits:
            break
        out.append(int(digits))
        if digits != part:
            break
    return tuple(out)


_LOADERS = {"aioquic": _load_aioquic, "qh3": _load_qh3}


@cache
def get(name: str) -> Engine:
    """The engine ``name`` (``aioquic`` or ``qh3``). Raises EngineUnavailable."""
    if name not in _LOADERS:
        raise ValueError(f"unknown QUIC engine {name!r}; choose one of {', '.join(CHOICES)}")
    return _LOADERS[name]()


def available() -> list[str]:
    """Names of the engines that can be loaded here."""
    out = []
    for name in NAMES:
        try:
            get(name)
        except EngineUnavailable:
            continue
        out.append(name)
    return out


def select(choice: str | None = None) -> Engine:
    """The engine for ``choice`` (default: ``$QUICTUN_ENGINE``, else :data:`DEFAULT`).

    ``auto`` is qh3 when a usable qh3 is installed, else aioquic. An explicit name that
    is not installed raises :class:`EngineUnavailable`; an unknown name ValueError.
    """
    value = (choice if choice is not None else os.environ.get(ENV, "")).strip().lower()
    value = value or DEFAULT
    if value == "auto":
        try:
            return get("qh3")
        except EngineUnavailable:
            return get("aioquic")
    return get(value)


@cache
def current() -> Engine:
    """The engine this process uses (chosen once, from the environment)."""
    return select()
