"""What runs inside the QUIC connection: client authentication and TCP forwarding.

Stream 0 (the client's first bidirectional stream) is the control stream. The client
writes its proof there right after the handshake: a MAC keyed by the session's proof
key over both identities, its raw Ed25519 public key, and its signature over that MAC.
The server accepts no other stream before the proof checks out — data that arrives
earlier is held (bounded) and nothing is connected to the forwarded port — so a peer
that does not know the secret never reaches the target. Every other client stream is
one forwarded connection (:class:`~quictun.aio.bridge.StreamBridge`); it starts with one
preamble byte (0x00) so that the server learns of it, and connects the target, before
the local client has said anything.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING

from ..proto import auth
from ..proto.identity import Identity, fingerprint_of_raw, verify_signature
from ..quic.flow import QuicEngine
from .bridge import ERR_TARGET_UNREACHABLE, StreamBridge

if TYPE_CHECKING:
    from aioquic.quic import events

log = logging.getLogger("quictun.tunnel")

CONTROL_STREAM = 0
STREAM_PREAMBLE = b"\x00"  # first byte of every forwarded stream: format version 0
PROOF_SIZE = 32 + 32 + 64
ERR_AUTH = 0x101
PRE_AUTH_LIMIT = 256 * 1024
PROOF_DEADLINE = 10.0  # s from the first QUIC packet to a verified client proof
ERR_FINGERPRINT = 0x102


CANDIDATES_LIMIT = 4096


class _Base:
    def __init__(self, engine: QuicEngine) -> None:
        self.engine = engine
        self.bridges: dict[int, StreamBridge] = {}
        self.closed: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        # fresh candidates from the peer (after a NAT rebinding); set by the session
        self.on_candidates: Callable[[list[str]], None] | None = None
        self._uni: dict[int, bytearray] = {}

    def send_candidates(self, cands: list[str]) -> None:
        """Tell the peer our current candidates, inside the encrypted connection."""
        if self.engine.closed:
            return
        sid = self.engine.quic.get_next_available_stream_id(is_unidirectional=True)
        self.engine.send(sid, json.dumps(cands).encode(), end=True)

    def _candidate_data(self, stream_id: int, data: bytes, end: bool) -> None:
        self.engine.consume(stream_id, len(data))
        buf = self._uni.setdefault(stream_id, bytearray())
        buf.extend(data)
        if len(buf) > CANDIDATES_LIMIT:
            self._uni.pop(stream_id, None)
            return
        if end:
            raw = bytes(self._uni.pop(stream_id))
            try:
                cands = json.loads(raw)
            except ValueError:
                return
            if isinstance(cands, list) and self.on_candidates is not None:
                self.on_candidates([c for c in cands if isinstance(c, str)][:32])

    def _route(self, stream_id: int) -> StreamBridge | None:
        return self.bridges.get(stream_id)

    def _bridge_done(self, bridge: StreamBridge) -> None:
        self.bridges.pop(bridge.stream_id, None)

    def on_stream_reset(self, stream_id: int, error_code: int) -> None:
        b = self._route(stream_id)
        if b is not None:
            b.quic_reset(error_code)

    def on_stop_sending(self, stream_id: int, error_code: int) -> None:
        b = self._route(stream_id)
        if b is not None:
            b.quic_stop_sending(error_code)

    def on_acked(self) -> None:
        for b in list(self.bridges.values()):
            b.acked()

    def on_terminated(self, error_code: int, reason: str) -> None:
        for b in list(self.bridges.values()):
            b.quic_reset(error_code)
        if not self.closed.done():
            self.closed.set_result(reason or f"closed (code {error_code})")

    def _consume_stray(self, stream_id: int, data: bytes) -> None:
        if data:
            self.engine.consume(stream_id, len(data))
        self.engine.quic.forget_stream(stream_id)  # no bookkeeping left for it


class ClientHandler(_Base):
    """The connecting side: pins the server's fingerprint, proves itself, opens streams."""

    def __init__(
        self, engine: QuicEngine, *, identity: Identity, keys: auth.SessionKeys,
        server_fp: str,
    ) -> None:
        super().__init__(engine)
        self.identity = identity
        self.keys = keys
        self.server_fp = server_fp
        self.ready: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def on_handshake(self, event: events.HandshakeCompleted) -> None:
        fp = self.engine.quic.engine.peer_fingerprint(self.engine.quic)
        if fp != self.server_fp:
            msg = (
                "the server's certificate does not match the fingerprint authenticated "
                "by the secret: someone is in the middle; connection refused"
            )
            if not self.ready.done():
                self.ready.set_exception(ConnectionRefusedError(msg))
            self.engine.close(ERR_FINGERPRINT, "fingerprint mismatch")
            return
        mac = auth.client_proof_message(self.keys, self.server_fp, self.identity.fingerprint)
        proof = mac + self.identity.public_bytes + self.identity.sign(mac)
        sid = self.engine.open_stream()
        assert sid == CONTROL_STREAM
        self.engine.send(sid, proof, end=True)
        if not self.ready.done():
            self.ready.set_result(None)

    def on_terminated(self, error_code: int, reason: str) -> None:
        if not self.ready.done():
            if error_code == ERR_AUTH:
                text = "the server refused our proof of the secret (wrong secret?)"
            else:
                text = f"the tunnel closed during the handshake ({reason or error_code})"
            self.ready.set_exception(ConnectionRefusedError(text))
        super().on_terminated(error_code, reason)

    def open_bridge(self) -> StreamBridge:
        """A new stream joined to a bridge; attach a transport to it as its protocol."""
        sid = self.engine.open_stream()
        bridge = StreamBridge(self.engine, sid, on_done=self._bridge_done)
        self.bridges[sid] = bridge
        # announce the stream at once, so services that speak first (SMTP, MySQL...)
        # are connected before the local client sends anything
        self.engine.send(sid, STREAM_PREAMBLE)
        return bridge

    def on_stream_data(self, stream_id: int, data: bytes, end: bool) -> None:
        b = self._route(stream_id)
        if b is not None:
            b.quic_data(data, end)
        elif stream_id % 4 == 3 and self.ready.done():
            self._candidate_data(stream_id, data, end)
        else:
            self._consume_stray(stream_id, data)


class ServerHandler(_Base):
    """The serving side: checks the client's proof, then connects streams to the target."""

    def __init__(
        self,
        engine: QuicEngine,
        *,
        identity: Identity,
        keys: auth.SessionKeys,
        client_pub: bytes,
        target: tuple[str, int],
        on_authenticated: Callable[[str], None] | None = None,
    ) -> None:
        super().__init__(engine)
        self.identity = identity
        self.keys = keys
        self.client_pub = client_pub
        self.target = target
        self.authenticated = False
        self.client_fp = fingerprint_of_raw(client_pub)
        self._on_authenticated = on_authenticated
        self._control = bytearray()
        self._held: list[tuple[int, bytes, bool]] = []
        self._held_bytes = 0
        self.connections = 0
        self._finished: set[int] = set()
        # a connection that never proves itself must not hold a session (and its sockets)
        self._deadline: asyncio.TimerHandle | None = asyncio.get_running_loop().call_later(
            PROOF_DEADLINE, self._proof_overdue)

    def _proof_overdue(self) -> None:
        self._deadline = None
        if not self.authenticated:
            self._refuse(f"no valid proof within {PROOF_DEADLINE:.0f} s")

    def on_terminated(self, error_code: int, reason: str) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
        super().on_terminated(error_code, reason)

    def on_handshake(self, event: events.HandshakeCompleted) -> None:
        pass

    def _bridge_done(self, bridge: StreamBridge) -> None:
        super()._bridge_done(bridge)
        self._finished.add(bridge.stream_id)
        if len(self._finished) > 4096:  # forget streams QUIC itself has discarded
            alive = self.engine.quic.stream_alive
            self._finished = {s for s in self._finished if alive(s)}

    def on_stream_data(self, stream_id: int, data: bytes, end: bool) -> None:
        if stream_id == CONTROL_STREAM:
            self._control_data(data)
            return
        if not self.authenticated:
            self._held.append((stream_id, data, end))
            self._held_bytes += len(data)
            if self._held_bytes > PRE_AUTH_LIMIT:
                self._refuse("too much data before authentication")
            return
        if stream_id % 4 == 2:  # client-initiated unidirectional: candidate updates
            self._candidate_data(stream_id, data, end)
            return
        self._deliver(stream_id, data, end)

    def _control_data(self, data: bytes) -> None:
        self.engine.consume(CONTROL_STREAM, len(data))
        if self.authenticated:
            return
        self._control.extend(data)
        if len(self._control) < PROOF_SIZE:
            return
        blob = bytes(self._control[:PROOF_SIZE])
        mac, pub, sig = blob[:32], blob[32:64], blob[64:]
        expected = auth.client_proof_message(
            self.keys, self.identity.fingerprint, self.client_fp
        )
        if not (
            auth.check(expected.hex(), mac.hex())
            and pub == self.client_pub
            and verify_signature(pub, sig, mac)
        ):
            self._refuse("client proof did not verify")
            return
        self.authenticated = True
        if self._on_authenticated is not None:
            self._on_authenticated(self.client_fp)
        if self._deadline is not None:
            self._deadline.cancel()
        held, self._held = self._held, []
        for sid, d, e in held:
            self.on_stream_data(sid, d, e)  # candidate updates as well as connections

    def _refuse(self, why: str) -> None:
        log.warning("refusing a client: %s", why)
        self.engine.close(ERR_AUTH, "authentication failed")

    def _deliver(self, stream_id: int, data: bytes, end: bool) -> None:
        b = self.bridges.get(stream_id)
        if b is None:
            if stream_id % 4 != 0:  # only client-initiated bidirectional streams
                self._consume_stray(stream_id, data)
                return
            if stream_id in self._finished or not self.engine.quic.stream_alive(stream_id):
                self._consume_stray(stream_id, data)
                return  # a late frame of a stream already finished
            if not data.startswith(STREAM_PREAMBLE):
                self._consume_stray(stream_id, data)
                self.engine.reset(stream_id, ERR_TARGET_UNREACHABLE)
                return
            self.engine.consume(stream_id, len(STREAM_PREAMBLE))
            data = data[len(STREAM_PREAMBLE):]
            b = StreamBridge(self.engine, stream_id, on_done=self._bridge_done)
            self.bridges[stream_id] = b
            self.connections += 1
            asyncio.ensure_future(self._connect(b))
        b.quic_data(data, end)

    async def _connect(self, bridge: StreamBridge) -> None:
        loop = asyncio.get_running_loop()
        host, port = self.target
        try:
            await loop.create_connection(lambda: bridge, host, port)
        except OSError as exc:
            log.info("target %s:%d refused stream %d: %s", host, port, bridge.stream_id, exc)
            self.engine.reset(bridge.stream_id, ERR_TARGET_UNREACHABLE)
            bridge.quic_reset(ERR_TARGET_UNREACHABLE)
