"""What runs inside the QUIC connection, on each side: authentication and forwarding.

The protocol (control stream, proof, preamble, candidate updates) is
:mod:`quictun.proto.control`; these handlers are its asyncio shell. The
:class:`ClientHandler` pins the server's certificate, writes its proof and opens one
stream per local connection. The :class:`ServerHandler` runs the pure
:class:`~quictun.proto.control.ProofGate` (holding data, arming its deadline on the loop)
and, once the client has proved itself, connects each new stream to the target over TCP.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING

from ..config import TunnelConfig
from ..proto import control as ctl
from ..proto.control import (
    CANDIDATES_LIMIT,
    CONTROL_STREAM,
    ERR_AUTH,
    ERR_BINDING,
    ERR_FINGERPRINT,
    ERR_TARGET_UNREACHABLE,
    SERVER_PROOF_SIZE,
    Authenticated,
    OpenRequest,
    ProofGate,
    Refused,
    check_server_proof,
    decode_candidates_update,
    decode_datagram,
    encode_candidates,
    make_proof,
)
from ..proto.identity import Identity
from ..proto.pake import SessionKeys
from ..quic.binding import BindingUnavailable, channel_binding
from .bridge import StreamBridge
from .datagrams import DatagramFlow
from .driver import QuicDriver
from .opening import Opener
from .targets import Forwarding
from .timer import Timer

if TYPE_CHECKING:
    from aioquic.quic import events

log = logging.getLogger("quictun.tunnel")


class HandlerBase:
    """What both sides share: bridges by stream, candidate updates, teardown.

    The session sets :attr:`on_candidates` (fresh candidates from the peer) and calls
    :meth:`send_candidates` (ours, after re-gathering), the server's only once
    :attr:`ready_for_candidates` (:attr:`on_ready_for_candidates` says when).
    """

    def __init__(self, driver: QuicDriver, config: TunnelConfig) -> None:
        self.driver = driver
        self.config = config
        self.bridges: dict[int, StreamBridge] = {}
        self.closed: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        self.on_candidates: Callable[[list[str]], None] | None = None
        self.on_ready_for_candidates: Callable[[], None] | None = None
        self._uni: dict[int, bytearray] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def ready_for_candidates(self) -> bool:
        """Whether our candidates may be sent now (the client's at any time: the server
        holds them until our proof)."""
        return True

    def send_candidates(self, cands: list[str]) -> None:
        """Tell the peer our current candidates, inside the encrypted connection."""
        if self.driver.closed:
            return
        sid = self.driver.quic.get_next_available_stream_id(is_unidirectional=True)
        self.driver.send(sid, encode_candidates(cands), end=True)

    def _candidate_data(self, stream_id: int, data: bytes, end: bool) -> None:
        self.driver.consume(stream_id, len(data))
        buf = self._uni.setdefault(stream_id, bytearray())
        buf.extend(data)
        if len(buf) > CANDIDATES_LIMIT:
            self._uni.pop(stream_id, None)
            return
        if end:
            cands = decode_candidates_update(bytes(self._uni.pop(stream_id)))
            if cands and self.on_candidates is not None:
                self.on_candidates(cands)

    def _new_bridge(self, stream_id: int) -> StreamBridge:
        bridge = StreamBridge(self.driver, stream_id, config=self.config,
                              on_done=self._bridge_done)
        self.bridges[stream_id] = bridge
        return bridge

    def _spawn(self, coro: object) -> None:
        """Run ``coro`` as a task that is kept (and whose failure is logged)."""
        task = asyncio.get_running_loop().create_task(coro)  # type: ignore[arg-type]
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("stream task failed: %r", task.exception())

    def _bridge_done(self, bridge: StreamBridge) -> None:
        self.bridges.pop(bridge.stream_id, None)

    def on_stream_reset(self, stream_id: int, error_code: int) -> None:
        b = self.bridges.get(stream_id)
        if b is not None:
            b.quic_reset(error_code)

    def on_stop_sending(self, stream_id: int, error_code: int) -> None:
        b = self.bridges.get(stream_id)
        if b is not None:
            b.quic_stop_sending(error_code)

    def on_acked(self) -> None:
        for b in list(self.bridges.values()):
            b.acked()

    def on_terminated(self, error_code: int, reason: str) -> None:
        for b in list(self.bridges.values()):
            b.quic_reset(error_code)
        for task in list(self._tasks):
            task.cancel()
        if not self.closed.done():
            self.closed.set_result(reason or f"closed (code {error_code})")

    def on_datagram(self, data: bytes) -> None:
        pass

    def _consume_stray(self, stream_id: int, data: bytes) -> None:
        if data:
            self.driver.consume(stream_id, len(data))
        self.driver.quic.forget_stream(stream_id)  # no bookkeeping left for it

    def _binding(self) -> bytes | None:
        """This connection's TLS channel binding, or None after closing it (an engine
        whose TLS state we cannot read: fail closed, never drop the binding)."""
        try:
            return channel_binding(self.driver.quic)
        except BindingUnavailable as exc:
            log.error("%s: this QUIC engine version is not supported", exc)
            self.driver.close(ERR_BINDING, "no TLS channel binding")
            return None


class ClientHandler(HandlerBase):
    """The connecting side: pins the server's fingerprint, proves itself, opens streams."""

    def __init__(
        self, driver: QuicDriver, *, config: TunnelConfig, identity: Identity,
        keys: SessionKeys, server_fp: str,
    ) -> None:
        super().__init__(driver, config)
        self.identity = identity
        self.keys = keys
        self.server_fp = server_fp
        self.ready: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.server_proved = False
        self._cb: bytes | None = None
        self._server_proof = bytearray()
        self._proof_timer = Timer(asyncio.get_running_loop(), self._server_proof_overdue)
        self.flows: dict[int, DatagramFlow] = {}
        self._requests: dict[int, tuple[bytearray, asyncio.Future[bytes]]] = {}

    def on_handshake(self, event: events.HandshakeCompleted) -> None:
        fp = self.driver.quic.engine.peer_fingerprint(self.driver.quic)
        if fp != self.server_fp:
            msg = (
                "the server's certificate does not match the fingerprint authenticated "
                "by the secret: someone is in the middle; connection refused"
            )
            if not self.ready.done():
                self.ready.set_exception(ConnectionRefusedError(msg))
            self.driver.close(ERR_FINGERPRINT, "fingerprint mismatch")
            return
        cb = self._binding()
        if cb is None:
            if not self.ready.done():
                self.ready.set_exception(ConnectionRefusedError(
                    "this QUIC engine version gives no TLS channel binding; install a "
                    "supported aioquic or qh3"))
            return
        self._cb = cb
        sid = self.driver.open_stream()
        assert sid == CONTROL_STREAM
        self.driver.send(sid, make_proof(self.keys, cb, self.server_fp, self.identity), end=True)
        # streams may open now (their data is encrypted to the pinned key); the server's
        # own proof must follow within the deadline, or the connection closes
        loop = asyncio.get_running_loop()
        self._proof_timer.set(loop.time() + self.config.proof_deadline)
        if not self.ready.done():
            self.ready.set_result(None)

    def _server_proof_data(self, data: bytes) -> None:
        self.driver.consume(CONTROL_STREAM, len(data))
        if self.server_proved or self._cb is None:
            return
        self._server_proof.extend(data)
        if len(self._server_proof) < SERVER_PROOF_SIZE:
            return
        self._proof_timer.cancel()
        if len(self._server_proof) == SERVER_PROOF_SIZE and check_server_proof(
                self.keys, bytes(self._server_proof), self._cb, self.server_fp,
                self.identity.fingerprint):
            self.server_proved = True
            return
        log.warning("the server's proof of the secret did not verify; closing")
        self.driver.close(ERR_AUTH, "server proof did not verify")

    def _server_proof_overdue(self) -> None:
        if not self.server_proved and not self.driver.closed:
            log.warning("the server did not prove the secret in time; closing")
            self.driver.close(ERR_AUTH, "no server proof")

    def on_terminated(self, error_code: int, reason: str) -> None:
        self._proof_timer.cancel()
        if not self.ready.done():
            if error_code == ERR_AUTH:
                text = "the server refused our proof of the secret (wrong secret?)"
            else:
                text = f"the tunnel closed during the handshake ({reason or error_code})"
            self.ready.set_exception(ConnectionRefusedError(text))
        for flow in list(self.flows.values()):
            flow._end(f"the tunnel closed ({reason or error_code})")
        for _buf, done in self._requests.values():
            if not done.done():
                done.set_exception(ctl.ProtocolError("the tunnel closed"))
        self._requests.clear()
        super().on_terminated(error_code, reason)

    def open_bridge(self, request: OpenRequest | None = None) -> StreamBridge:
        """A new stream joined to a bridge; attach a transport to it as its protocol.

        ``request`` None opens the default stream service (the bare preamble, no
        reply); any other is sent as it is, and the bridge strips the server's reply
        (see :meth:`StreamBridge.expect_reply`; set its ``on_reply`` to hear it)."""
        request = request or OpenRequest(ctl.OP_STREAM, version=0)
        raw = request.encode()  # ValueError (a name too long) before any stream is taken
        bridge = self._new_bridge(self.driver.open_stream())
        if request.version:
            bridge.expect_reply()
        # announce the stream at once, so services that speak first (SMTP, MySQL...)
        # are connected before the local client sends anything
        self.driver.send(bridge.stream_id, raw)
        return bridge

    def open_flow(self, service: str | None = None) -> DatagramFlow:
        """A new UDP flow to ``service`` (None: the default udp service); it queues
        what it is given until the server accepted it (``flow.opened``)."""
        raw = OpenRequest(ctl.OP_DATAGRAM, service).encode()
        sid = self.driver.open_stream()
        flow = DatagramFlow(self.driver, sid, self.config,
                            on_forget=lambda f: self.flows.pop(f.flow_id, None))
        self.flows[flow.flow_id] = flow
        self.driver.send(sid, raw)
        return flow

    async def request(self, request: OpenRequest) -> tuple[ctl.OpenReply, bytes]:
        """Send a one-shot request (LIST); returns the reply and the body up to FIN."""
        sid = self.driver.open_stream()
        done: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        self._requests[sid] = (bytearray(), done)
        self.driver.send(sid, request.encode(), end=True)
        raw = await done
        got = ctl.parse_reply(raw)
        if got is None:
            raise ctl.ProtocolError("the server's reply is cut short")
        return got[0], raw[got[1]:]

    def on_stream_data(self, stream_id: int, data: bytes, end: bool) -> None:
        b = self.bridges.get(stream_id)
        if b is not None:
            b.quic_data(data, end)
        elif stream_id == CONTROL_STREAM:
            self._server_proof_data(data)
        elif (flow := self.flows.get(stream_id // 4)) is not None and stream_id % 4 == 0:
            flow.stream_data(data, end)
        elif stream_id in self._requests:
            self._request_data(stream_id, data, end)
        elif stream_id % 4 == 3 and self.ready.done():
            self._candidate_data(stream_id, data, end)
        else:
            self._consume_stray(stream_id, data)

    def _request_data(self, stream_id: int, data: bytes, end: bool) -> None:
        self.driver.consume(stream_id, len(data))
        buf, done = self._requests[stream_id]
        buf.extend(data)
        if len(buf) > ctl.LISTING_LIMIT + 257:
            del self._requests[stream_id]
            self.driver.reset(stream_id, ERR_TARGET_UNREACHABLE)
            done.set_exception(ctl.ProtocolError("the server's reply is too long"))
        elif end:
            del self._requests[stream_id]
            done.set_result(bytes(buf))

    def on_stream_reset(self, stream_id: int, error_code: int) -> None:
        flow = self.flows.get(stream_id // 4) if stream_id % 4 == 0 else None
        if flow is not None:
            flow.stream_reset(error_code)
        entry = self._requests.pop(stream_id, None)
        if entry is not None and not entry[1].done():
            entry[1].set_exception(ctl.ProtocolError(f"the server reset the request "
                                                     f"(code {error_code:#x})"))
        super().on_stream_reset(stream_id, error_code)

    def on_datagram(self, data: bytes) -> None:
        got = decode_datagram(data)
        flow = self.flows.get(got[0]) if got is not None else None
        if flow is not None and got is not None:
            flow.datagram(got[1])


class ServerHandler(HandlerBase):
    """The serving side: checks the client's proof, then opens what each stream asks
    for (see :class:`~quictun.aio.opening.Opener`): a service, a proxy target, a UDP
    flow, the listing."""

    def __init__(
        self,
        driver: QuicDriver,
        *,
        config: TunnelConfig,
        identity: Identity,
        keys: SessionKeys,
        client_pub: bytes,
        target: Forwarding,
        on_authenticated: Callable[[str], None] | None = None,
    ) -> None:
        super().__init__(driver, config)
        loop = asyncio.get_running_loop()
        self.target = target
        self._gate = ProofGate(keys, identity.fingerprint, client_pub, now=loop.time(),
                               deadline=config.proof_deadline,
                               hold_limit=config.pre_auth_limit)
        self.client_fp = self._gate.client_fp
        self._on_authenticated = on_authenticated
        self.opener = Opener(driver, target, config, self._new_bridge, self._spawn,
                             lambda: self.client_fp[:16])
        self._finished: set[int] = set()
        # a connection that never proves itself must not hold a session (and its sockets)
        self._timer = Timer(loop, self._proof_overdue)
        self._timer.set(self._gate.get_timer())

    @property
    def authenticated(self) -> bool:
        return self._gate.authenticated

    @property
    def connections(self) -> int:
        """Stream connections opened for this client (all services)."""
        return sum(s.connections for s in self.opener.stats.values() if s.udp is None)

    def _proof_overdue(self) -> None:
        verdict = self._gate.handle_timer(asyncio.get_running_loop().time())
        if verdict is not None:
            self._refuse(verdict.reason)

    def on_terminated(self, error_code: int, reason: str) -> None:
        self._timer.cancel()
        self.opener.close()
        super().on_terminated(error_code, reason)

    def on_handshake(self, event: events.HandshakeCompleted) -> None:
        cb = self._binding()
        if cb is not None:
            self._verdict(self._gate.set_binding(cb))

    def _verdict(self, verdict: Authenticated | Refused | None) -> None:
        if isinstance(verdict, Authenticated):
            self._authenticated(verdict)
        elif verdict is not None:
            self._refuse(verdict.reason)

    def _bridge_done(self, bridge: StreamBridge) -> None:
        super()._bridge_done(bridge)
        self.opener.bridge_done(bridge)
        self._finished.add(bridge.stream_id)
        if len(self._finished) > 4096:  # forget streams QUIC itself has discarded
            alive = self.driver.quic.stream_alive
            self._finished = {s for s in self._finished if alive(s)}

    def on_stream_data(self, stream_id: int, data: bytes, end: bool) -> None:
        if stream_id == CONTROL_STREAM:
            self.driver.consume(CONTROL_STREAM, len(data))
            self._verdict(self._gate.control_data(data))
            return
        if not self._gate.authenticated:
            refused = self._gate.hold(stream_id, data, end)
            if refused is not None:
                self._refuse(refused.reason)
            return
        if stream_id % 4 == 2:  # client-initiated unidirectional: candidate updates
            self._candidate_data(stream_id, data, end)
            return
        self._deliver(stream_id, data, end)

    @property
    def ready_for_candidates(self) -> bool:
        """Only a client that proved the secret hears of our late candidates."""
        return self._gate.authenticated

    def on_stream_reset(self, stream_id: int, error_code: int) -> None:
        self.opener.flow_reset(stream_id)
        super().on_stream_reset(stream_id, error_code)

    def on_datagram(self, data: bytes) -> None:
        if self._gate.authenticated:
            self.opener.datagram(data)

    def _authenticated(self, verdict: Authenticated) -> None:
        self._timer.cancel()
        self.driver.send(CONTROL_STREAM, verdict.reply, end=True)
        if self._on_authenticated is not None:
            self._on_authenticated(verdict.client_fp)
        for sid, d, e in verdict.held:
            self.on_stream_data(sid, d, e)  # candidate updates as well as connections
        if self.on_ready_for_candidates is not None:
            self.on_ready_for_candidates()

    def _refuse(self, why: str) -> None:
        log.warning("refusing a client: %s", why)
        self.driver.close(ERR_AUTH, "authentication failed")

    def _deliver(self, stream_id: int, data: bytes, end: bool) -> None:
        b = self.bridges.get(stream_id)
        if b is not None:
            b.quic_data(data, end)
            return
        if stream_id % 4 != 0:  # only client-initiated bidirectional streams
            self._consume_stray(stream_id, data)
            return
        if stream_id in self._finished or not self.driver.quic.stream_alive(stream_id):
            self._consume_stray(stream_id, data)
            return  # a late frame of a stream already finished
        self.opener.stream_data(stream_id, data, end)
