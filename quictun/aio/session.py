"""One tunnel session: a punched UDP socket, a path manager, QUIC and the relay.

:class:`PeerSession` is glue with no decisions of its own: it feeds the sans-I/O
:class:`~quictun.punch.manager.PathManager` (probes, timers) and the QUIC engine, and sends each
QUIC datagram where ``PathManager.current`` says: straight to a peer address over the
punched socket, or through the relay as a binary WebSocket frame. QUIC itself always
sees the same virtual peer, so a path switch never disturbs the connection.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any

from ..proto.addr import format_addr
from ..punch.manager import Candidate, Path, PathChanged, PathConfig, PathManager, PunchFailed
from ..quic import engines
from ..quic.flow import VIRTUAL_PEER, EngineHandler, FlowControlledConnection, QuicEngine
from .relay import SignalClient
from .udp import Addr, UdpEndpoint

log = logging.getLogger("quictun.session")

QUEUE_BEFORE_PATH = 64
MAX_AUX_SOCKETS = 1024  # birthday sockets open at once, all sessions of this process
_AUX_OPEN = [0]


def describe(path: Path | None) -> str:
    """The stable one-line description of a path used in logs.

    ``path=direct local=IP:PORT remote=IP:PORT rtt=1.2ms`` or ``path=relay rtt=-``.
    """
    if path is None:
        return "path=none"
    rtt = f"{path.rtt * 1000:.1f}ms" if path.rtt is not None else "-"
    if path.kind == "relay":
        return f"path=relay rtt={rtt}"
    local = format_addr(*path.local) if path.local else "-"
    remote = format_addr(*path.remote) if path.remote else "-"
    return f"path=direct local={local} remote={remote} rtt={rtt}"


class PeerSession:
    """Glue for one session. Create, then :meth:`start` when the relay says go."""

    def __init__(
        self,
        *,
        endpoint: UdpEndpoint,
        signal: SignalClient | None,
        session_id: int,
        paths: PathManager,
        quic_config: Any,  # the engine's QuicConfiguration (engines.py)
        is_client: bool,
        handler_factory: Callable[[QuicEngine], EngineHandler],
        on_path: Callable[[Path | None], None] | None = None,
        on_failed: Callable[[str], None] | None = None,
        regather: Callable[[], Awaitable[list[Candidate]]] | None = None,
    ) -> None:
        self.loop = asyncio.get_running_loop()
        self.endpoint = endpoint
        self.signal = signal
        self.session_id = session_id
        self.paths = paths
        self.quic_config = quic_config
        self.is_client = is_client
        self._handler_factory = handler_factory
        self._on_path = on_path or (lambda p: None)
        self._on_failed = on_failed or (lambda r: None)
        self.engine: QuicEngine | None = None
        self.handler: EngineHandler | None = None
        self._queue: deque[bytes] = deque(maxlen=QUEUE_BEFORE_PATH)
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at: float | None = None
        self.closed = False
        self._regather = regather
        self._refreshing = False
        self._was_direct = False
        self._started_refresh = False
        self._refresh_task: asyncio.Future[None] | None = None
        self._path: Path | None = None
        self._dup = False  # also send QUIC over the relay (direct path is suspect)
        self._aux: dict[int, UdpEndpoint] = {}  # birthday sockets by path-manager slot
        endpoint.on_stun = self._stun_received
        endpoint.on_quic = self._quic_received
        if is_client:
            self._create_engine(None)

    # -- lifecycle -----------------------------------------------------------------
    def start(self) -> None:
        """Begin punching (the relay's go / answer)."""
        if self.closed:
            return
        self.paths.start(self.loop.time())
        self._service()

    def close(self, reason: str = "") -> None:
        if self.closed:
            return
        if self.engine is not None and not self.engine.closed:
            self.engine.close(0, reason)
        self._shutdown()

    def _shutdown(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self._timer is not None:
            self._timer.cancel()
        # give a final CONNECTION_CLOSE a moment to leave before the socket goes
        self.loop.call_later(0.2, self.endpoint.close)
        for slot in list(self._aux):
            self.loop.call_later(0.2, self._close_aux, slot)
        if self._refresh_task is not None:
            self._refresh_task.cancel()

    # -- input -------------------------------------------------------------------------
    def _stun_received(self, data: bytes, addr: Addr, slot: int = 0) -> None:
        if self.closed:
            return
        self.paths.receive_stun(data, addr, self.loop.time(), slot)
        self._service()

    def _quic_received(self, data: bytes, addr: Addr) -> None:
        if self.closed:
            return
        if self.engine is None and not self._create_engine(data):
            return
        quic = self.engine.quic
        before = quic.authenticated_packets  # grows only for a packet that decrypted
        self.engine.datagram_received(data)
        if quic.authenticated_packets != before:
            # only authenticated packets count as evidence that this path is alive
            self.paths.note_direct_traffic(addr, self.loop.time())
        # no _service() here: noting traffic only refreshes liveness (it queues nothing
        # and emits nothing), and a timer that fires early just re-arms. Skipping it per
        # datagram saves about a third of the receive side's own CPU.

    def relay_received(self, payload: bytes) -> None:
        """A QUIC packet that came through the relay for this session."""
        if self.closed or not payload or payload[0] < 64:
            return
        if self.engine is None and not self._create_engine(payload):
            return
        self.engine.datagram_received(payload)
        self.paths.note_relay_traffic(self.loop.time())  # statistics only: no _service()

    def relay_lost(self) -> None:
        if self.closed:
            return
        self.paths.set_relay_available(False, self.loop.time())
        self._service()

    # -- QUIC ----------------------------------------------------------------------------
    def _create_engine(self, first: bytes | None) -> bool:
        if self.is_client:
            quic = FlowControlledConnection(configuration=self.quic_config)
            quic.connect(VIRTUAL_PEER, now=self.loop.time())
        else:
            try:
                header = engines.current().pull_quic_header(first or b"", host_cid_length=8)
            except Exception:
                return False
            if header.packet_type is None or len(first or b"") < 1200:
                return False  # only a full-size Initial may create the server connection
            quic = FlowControlledConnection(
                configuration=self.quic_config,
                original_destination_connection_id=header.destination_cid,
            )
        self.engine = QuicEngine(quic, self._send_quic)
        self.handler = self._handler_factory(self.engine)
        self.engine.set_handler(self.handler)
        self.engine.on_closed = self._shutdown
        self.handler.on_candidates = self._remote_candidates  # type: ignore[attr-defined]
        if self.is_client:
            self.engine.schedule_flush()
        return True

    def _send_quic(self, data: bytes) -> None:
        path = self._path  # PathManager.current, cached: it changes only with PathChanged
        if path is None:
            self._queue.append(data)
        elif path.kind == "direct":
            ep = self._aux.get(path.slot, self.endpoint) if path.slot else self.endpoint
            ep.sendto(data, path.remote)  # type: ignore[arg-type]
            if self._dup and self.signal is not None:
                self.signal.send_relay(self.session_id, data)
        elif self.signal is not None:
            self.signal.send_relay(self.session_id, data)

    # -- path manager ----------------------------------------------------------------
    def _service(self) -> None:
        """Send what the path manager wants sent, handle its events, re-arm its timer."""
        now = self.loop.time()
        pm = self.paths
        for data, addr, ttl, slot in pm.datagrams_to_send_slots(now):
            ep = self._slot_endpoint(slot)
            if ep is not None:
                ep.sendto(data, addr, ttl)
        if self._aux:
            for slot in set(self._aux) - pm.aux_slots():
                self._close_aux(slot)
        while (ev := pm.next_event()) is not None:
            if isinstance(ev, PathChanged):
                self._path = ev.path
                self._on_path(ev.path)
                direct = ev.path is not None and ev.path.kind == "direct"
                if self._was_direct and not direct:
                    self._refresh_soon()  # lost the direct path: our NAT may have moved us
                elif not direct and not self._started_refresh:
                    # starting on the relay: if still not direct in a second, re-learn our
                    # public address (a slow reflector may have missed the offer) and tell
                    # the peer in-band
                    self._refresh_soon(first_delay=1.0)
                self._started_refresh = True
                self._was_direct = direct
                if self.engine is not None and ev.path is not None:
                    self.engine.ping()  # fast loss recovery on the new path
                if ev.path is not None and self._queue:
                    queued, self._queue = list(self._queue), deque(maxlen=QUEUE_BEFORE_PATH)
                    for d in queued:
                        self._send_quic(d)
            elif isinstance(ev, PunchFailed):
                self._on_failed(ev.reason)
        dup = pm.uncertain(now)
        rising = dup and not self._dup
        if dup != self._dup:
            log.info("direct path %s", "quiet: also sending over the relay" if dup
                     else "answers again: direct only")
        self._dup = dup
        if rising:
            if self.engine is not None:
                self.engine.ping()  # the direct path went quiet: probe QUIC over the relay
            self._refresh_soon()  # our NAT may have moved us: tell the peer where we are
        at = pm.get_timer()
        if at != self._timer_at and not self.closed:
            if self._timer is not None:
                self._timer.cancel()
            self._timer_at = at
            self._timer = self.loop.call_at(at, self._on_timer) if at is not None else None

    def _slot_endpoint(self, slot: int) -> UdpEndpoint | None:
        """The socket for a path-manager slot: 0 the main one, k > 0 an extra socket for
        birthday probing, opened on first use (any free port) and closed when the path
        manager no longer lists it in ``aux_slots()``."""
        if slot == 0:
            return self.endpoint
        ep = self._aux.get(slot)
        if ep is None and not self.closed:
            if _AUX_OPEN[0] >= MAX_AUX_SOCKETS:
                return None  # process-wide budget spent: fewer birthday ports, no failure
            try:
                ep = UdpEndpoint.open()
            except OSError as exc:  # out of file descriptors or ports: fewer birthday ports
                log.debug("extra socket %d: %s", slot, exc)
                return None
            _AUX_OPEN[0] += 1
            ep.on_stun = lambda d, a: self._stun_received(d, a, slot)
            ep.on_quic = self._quic_received
            self._aux[slot] = ep
        return ep

    def _close_aux(self, slot: int) -> None:
        ep = self._aux.pop(slot, None)
        if ep is not None:
            _AUX_OPEN[0] -= 1
            ep.close()

    # -- NAT rebinding: re-learn our public address and tell the peer in-band ----------
    def _refresh_soon(self, first_delay: float = 0.0) -> None:
        if self._regather is not None and not self._refreshing and not self.closed:
            self._refreshing = True
            self._refresh_task = asyncio.ensure_future(self._refresh(first_delay))

    async def _refresh(self, first_delay: float) -> None:
        """While not direct, re-gather candidates and send them inside QUIC, a few times."""
        try:
            for delay in (first_delay, 2.0, 5.0, 10.0, 20.0, 30.0):
                await asyncio.sleep(delay)
                cur = self._path
                if self.closed or (cur is not None and cur.kind == "direct" and not self._dup):
                    return
                try:
                    cands = await self._regather()  # type: ignore[misc]
                except Exception as exc:  # e.g. the relay is gone: try again later
                    log.debug("re-gathering candidates failed: %s", exc)
                    continue
                if self.handler is not None and self.engine is not None:
                    self.handler.send_candidates([c.encode() for c in cands])  # type: ignore[attr-defined]
                    self.engine.schedule_flush()
        finally:
            self._refreshing = False

    def _remote_candidates(self, texts: list[str]) -> None:
        cands = []
        for t in texts:
            try:
                cands.append(Candidate.decode(t))
            except ValueError:
                continue
        if cands and not self.closed:
            self.paths.add_remote_candidates(cands, self.loop.time())
            self._service()

    def _on_timer(self) -> None:
        self._timer = None
        self._timer_at = None
        if self.closed:
            return
        self.paths.handle_timer(self.loop.time())
        self._service()


def new_path_manager(
    *, local_key: bytes, remote_key: bytes, mode: str, relay_available: bool,
    config: PathConfig | None = None,
) -> PathManager:
    """A PathManager wired to this host's networks and the OS random source."""
    from .udp import local_networks

    if os.environ.get("QUICTUN_BIRTHDAY_ANY_ADDRESS") == "1":
        # the network lab's addresses are not global; never set outside a lab
        base = config or PathConfig()
        if hasattr(base, "birthday_any_address"):
            config = dataclasses.replace(base, birthday_any_address=True)
    return PathManager(
        local_key=local_key,
        remote_key=remote_key,
        local_networks=local_networks(),
        mode=mode,
        relay_available=relay_available,
        config=config,
        random_bytes=os.urandom,
        multi_socket=True,
    )
