"""One tunnel session: a punched UDP socket, a path manager, QUIC and the relay.

:class:`PeerSession` is the asyncio shell around two state machines, the
:class:`~quictun.punch.manager.PathManager` (probes, path choice, when to re-gather) and
the QUIC connection (through :class:`~quictun.aio.driver.QuicDriver`). It moves bytes:
probes and QUIC datagrams in from the socket and the relay, and each QUIC datagram out
where the path manager's current path says (straight to a peer address over the punched
socket, or through the relay as a binary WebSocket frame). QUIC itself always sees the
same virtual peer, so a path switch never disturbs the connection. The size of QUIC's
datagrams follows the path manager's DatagramSizeChanged (path MTU discovery); a flush's
datagrams leave in as few system calls as the kernel allows (GSO, :mod:`.udpio`). The one
decision left here is I/O bookkeeping: how many extra sockets the process may open
(:data:`AUX_SOCKETS`).

The session also owns its socket's port mapping (:class:`~quictun.aio.portmap.PortMapper`,
if any): a mapping granted after the offer or answer went out is sent to the peer
in-band, like re-gathered candidates, and closing the session deletes it
(:meth:`PeerSession.released` waits for that).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any

from ..config import TunnelConfig
from ..errors import TunnelError
from ..proto.addr import Addr, Candidate, decode_candidates, format_addr
from ..proto.identity import Identity
from ..punch.manager import PathManager
from ..punch.pathmtu import PathMtu
from ..punch.types import (
    DatagramSizeChanged,
    GatherWanted,
    NetPath,
    PathChanged,
    PunchFailed,
    SuspectChanged,
    describe,
)
from ..quic import engines
from ..quic.credit import ALPNS
from ..quic.flow import connection_class
from .candidates import portmap_candidates
from .driver import VIRTUAL_PEER, QuicDriver
from .handlers import HandlerBase
from .portmap import Mapping, PortMapper
from .relay import SignalClient
from .timer import Timer
from .udp import AUX_SOCKETS, UdpEndpoint
from .udpio import Offload, route_mtu

log = logging.getLogger("quictun.session")
portmap_log = logging.getLogger("quictun.portmap")

# the in-connection protocol: quictun/1+credit (per-stream credit, quic/credit.py)
# preferred, plain quictun/1 still spoken (not the signalling protocol's version)
ALPN = ALPNS


def load_engine() -> engines.Engine:
    """The process's QUIC engine, imported on first use (a connect imports it while the
    relay answers its hello, a serve before it registers: see docs/architecture.md).

    Raises:
        TunnelError: one line if ``$QUICTUN_ENGINE`` names an unknown or missing engine.
    """
    try:
        return engines.current()
    except (engines.EngineUnavailable, ValueError) as exc:
        raise TunnelError(f"{exc} (QUICTUN_ENGINE)") from None


def quic_configuration(is_client: bool, identity: Identity, config: TunnelConfig) -> Any:
    """The engine's QUIC configuration for one end of a tunnel. A client does not verify
    the certificate: it pins the fingerprint after the handshake (see handlers)."""
    cfg = engines.current().configuration(
        is_client, identity, alpn=ALPN, max_datagram_size=config.max_datagram,
        max_stream_data=config.stream_window, max_data=config.connection_window,
        idle_timeout=config.idle_timeout,
        max_datagram_frame_size=config.max_datagram_frame or None,
    )
    if config.congestion_control is not None:
        cfg.congestion_control_algorithm = config.congestion_control
    return cfg


class PeerSession:
    """One session's shell. Create, then :meth:`start` when the relay says go.

    Args:
        endpoint: the session's punched socket (closed with the session).
        signal: the relay connection, for relayed packets (None: never relay).
        session_id: the relay's session number.
        paths: the session's path manager (see :func:`new_path_manager`).
        identity: ours, for the QUIC certificate.
        config: the tunnel's tunables.
        is_client: the connecting side creates the QUIC connection at once; the serving
            side on the first full-size Initial.
        handler_factory: makes the handler of the QUIC connection once it exists.
        on_path: called with every new path (None: nowhere to send).
        on_failed: called with a reason when no path can be found (PunchFailed).
        regather: re-learns our candidates on this socket, when the path manager asks.
        portmap: the socket's port mapper (closed with the session).
        signalled: our candidates already in the offer or answer (not sent again).
    """

    def __init__(
        self,
        *,
        endpoint: UdpEndpoint,
        signal: SignalClient | None,
        session_id: int,
        paths: PathManager,
        identity: Identity,
        config: TunnelConfig,
        is_client: bool,
        handler_factory: Callable[[QuicDriver], HandlerBase],
        on_path: Callable[[NetPath | None], None] | None = None,
        on_failed: Callable[[str], None] | None = None,
        regather: Callable[[], Awaitable[list[Candidate]]] | None = None,
        portmap: PortMapper | None = None,
        signalled: list[Candidate] | None = None,
    ) -> None:
        self.loop = asyncio.get_running_loop()
        self.endpoint = endpoint
        self.signal = signal
        self.session_id = session_id
        self.paths = paths
        self.config = config
        self.quic_config = quic_configuration(is_client, identity, config)
        self.is_client = is_client
        self._handler_factory = handler_factory
        self._on_path = on_path or (lambda p: None)
        self._on_failed = on_failed or (lambda r: None)
        self.driver: QuicDriver | None = None
        self.handler: HandlerBase | None = None
        self._queue: deque[bytes] = deque(maxlen=config.queue_before_path)
        self._timer = Timer(self.loop, self._on_timer)
        self.closed = False
        self._regather = regather
        self._tasks: set[asyncio.Task[None]] = set()
        self._path: NetPath | None = None
        self._dup = False  # also send QUIC over the relay (direct path is suspect)
        self._size = paths.mtu.datagram_size  # the current path's (DatagramSizeChanged)
        self._offload = Offload.named(config.udp_offload)
        self._aux: dict[int, UdpEndpoint] = {}  # birthday sockets by path-manager slot
        self._birthday_logged = False
        self.portmap = portmap
        self._told: set[Addr] = {c.addr for c in signalled or [] if c.kind == "portmap"}
        self._release: asyncio.Task[None] | None = None
        endpoint.on_stun = self._stun_received
        endpoint.on_quic = self._quic_received
        endpoint.on_too_big = self._too_big
        endpoint.set_offload(self._offload)
        if portmap is not None:
            portmap.on_change = self._mappings_changed
        if is_client:
            self._create_connection(None)

    # -- lifecycle -----------------------------------------------------------------
    def start(self) -> None:
        """Begin punching (the relay's go / answer)."""
        if self.closed:
            return
        self.paths.start(self.loop.time())
        self._service()

    def close(self, reason: str = "") -> None:
        """Send CONNECTION_CLOSE (if QUIC is up) and end the session."""
        if self.closed:
            return
        if self.driver is not None and not self.driver.closed:
            self.driver.close(0, reason)
        self._shutdown()

    async def released(self) -> None:
        """After :meth:`close`: wait until the port mapping (if any) is deleted (at most
        its ``close_timeout``). Never raises."""
        if self._release is not None:
            with contextlib.suppress(BaseException):
                await asyncio.shield(self._release)

    def _shutdown(self) -> None:
        if self.closed:
            return
        self.closed = True
        self._timer.cancel()
        if self.portmap is not None:
            self._release = self.loop.create_task(self.portmap.close())
        # give a final CONNECTION_CLOSE a moment to leave before the socket goes
        self.loop.call_later(0.2, self.endpoint.close)
        for slot in list(self._aux):
            self.loop.call_later(0.2, self._close_aux, slot)
        for task in list(self._tasks):
            task.cancel()

    # -- input -------------------------------------------------------------------------
    def _stun_received(self, data: bytes, addr: Addr, slot: int = 0) -> None:
        if self.closed:
            return
        self.paths.receive_stun(data, addr, self.loop.time(), slot)
        self._service()

    def _quic_received(self, data: bytes, addr: Addr) -> None:
        if self.closed:
            return
        if self.driver is None and not self._create_connection(data):
            return
        assert self.driver is not None
        quic = self.driver.quic
        before = quic.authenticated_packets  # grows only for a packet that decrypted
        self.driver.datagram_received(data)
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
        if self.driver is None and not self._create_connection(payload):
            return
        assert self.driver is not None
        self.driver.datagram_received(payload)
        self.paths.note_relay_traffic(self.loop.time())  # statistics only: no _service()

    def relay_lost(self) -> None:
        """The relay connection is gone: the path manager stops counting on it."""
        if self.closed:
            return
        self.paths.set_relay_available(False, self.loop.time())
        self._service()

    def relay_restored(self, signal: SignalClient) -> None:
        """The session lives on a new relay connection (it resumed there, see
        :mod:`quictun.aio.relink`): relay through it again, re-learn our candidates and
        send them to the peer (our NAT may have moved us), and PING so that QUIC
        retransmits what the old link lost at once."""
        if self.closed:
            return
        self.signal = signal
        self.paths.set_relay_available(bool(signal.welcome and signal.welcome.relay),
                                       self.loop.time())
        self._gather()
        if self.driver is not None:
            self.driver.ping()
        self._service()

    # -- QUIC ----------------------------------------------------------------------------
    def _create_connection(self, first: bytes | None) -> bool:
        if self.is_client:
            quic = connection_class()(configuration=self.quic_config)
            quic.connect(VIRTUAL_PEER, now=self.loop.time())
        else:
            dcid = engines.current().server_initial(first or b"")
            if dcid is None:
                return False  # only a full-size Initial may create the server connection
            quic = connection_class()(configuration=self.quic_config,
                                      original_destination_connection_id=dcid)
        quic.peer_max_ack_delay = self.config.peer_max_ack_delay
        self.driver = QuicDriver(quic, self._send_quic, keepalive=self.config.keepalive,
                                 send_datagrams=self._send_quic_many)
        self.driver.on_stall = self._quic_stalled
        self._apply_size()
        self.driver.datagram_backlog_limit = self.config.udp_backlog
        self.handler = self._handler_factory(self.driver)
        self.driver.set_handler(self.handler)
        self.driver.on_closed = self._shutdown
        self.handler.on_candidates = self._remote_candidates
        self.handler.on_ready_for_candidates = self._tell_mappings
        self._tell_mappings()
        if self.is_client:
            self.driver.schedule_flush()
        return True

    def _send_quic(self, data: bytes) -> None:
        path = self._path  # PathManager.current, cached: it changes only with PathChanged
        if path is None:
            self._queue.append(data)
        elif path.kind == "direct":
            assert path.remote is not None
            ep = self._aux.get(path.slot, self.endpoint) if path.slot else self.endpoint
            ep.sendto(data, path.remote)
            if self._dup and self.signal is not None:
                self.signal.send_relay(self.session_id, data)
        elif self.signal is not None:
            self.signal.send_relay(self.session_id, data)

    # -- datagram size and batching (path MTU discovery, GSO) --------------------------
    def _send_quic_many(self, datagrams: list[bytes]) -> None:
        """One flush of QUIC datagrams: on a direct path in as few system calls as the
        kernel allows (GSO), else one by one as :meth:`_send_quic`."""
        path = self._path
        if path is None or path.kind != "direct" or path.remote is None:
            for data in datagrams:
                self._send_quic(data)
            return
        ep = self._aux.get(path.slot, self.endpoint) if path.slot else self.endpoint
        ep.send_many(datagrams, path.remote)
        if self._dup and self.signal is not None:
            for data in datagrams:
                self.signal.send_relay(self.session_id, data)

    def _apply_size(self) -> None:
        """Tell QUIC the datagram size of the current path; while the direct path is
        suspect every datagram also goes over the relay, so it must fit both."""
        if self.driver is None:
            return
        size = self._size
        if self._dup:
            size = min(size, self.paths.mtu.relay_size)
        self.driver.set_max_datagram_size(size)  # also before the handshake: it remembers

    def _size_changed(self, size: int) -> None:
        self._size = size
        log.info("datagram size %d bytes (%s)", size, describe(self._path))
        self._apply_size()

    def _quic_stalled(self) -> None:
        """QUIC's probe timeout fired: let the path manager check the path's size."""
        if not self.closed:
            self.paths.mtu.note_quic_stall()
            self._service()

    def _too_big(self, addr: Addr, size: int) -> None:
        """The stack refused a datagram of ``size`` bytes to ``addr`` (EMSGSIZE)."""
        if not self.closed:
            self.paths.mtu.note_send_too_big(addr, size, self.loop.time())
            self._service()

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
        if pm.birthday_role is not None and not self._birthday_logged:
            self._birthday_logged = True
            log.info("birthday probing: %s side", pm.birthday_role)
        while (ev := pm.next_event()) is not None:
            if isinstance(ev, PathChanged):
                self._path_changed(ev.path)
            elif isinstance(ev, SuspectChanged):
                self._suspect_changed(ev.suspect)
            elif isinstance(ev, GatherWanted):
                self._gather()
            elif isinstance(ev, DatagramSizeChanged):
                self._size_changed(ev.size)
            elif isinstance(ev, PunchFailed):
                self._on_failed(ev.reason)
        if not self.closed:
            self._timer.set(pm.get_timer())

    def _suspect_changed(self, suspect: bool) -> None:
        cur = self.paths.current
        if suspect:
            log.info("direct path quiet: also sending over the relay")
        elif cur is not None and cur.kind == "direct":
            log.info("direct path answers again: direct only")
        self._dup = suspect
        self._apply_size()
        if suspect and self.driver is not None:
            self.driver.ping()  # the direct path went quiet: probe QUIC over the relay
        if suspect and self.signal is not None:
            # a NAT that moved our UDP mappings may have broken the relay's TCP as well:
            # find out now, not after a ping period (a dead link is re-opened, and the
            # session resumes on the new one)
            self.signal.check_alive(self.config.relay_check_timeout)

    def _path_changed(self, path: NetPath | None) -> None:
        self._path = path
        self._on_path(path)
        if self.driver is not None and path is not None:
            self.driver.ping()  # fast loss recovery on the new path
        if path is not None and self._queue:
            queued = list(self._queue)
            self._queue.clear()
            for d in queued:
                self._send_quic(d)

    def _slot_endpoint(self, slot: int) -> UdpEndpoint | None:
        """The socket for a path-manager slot: 0 the main one, k > 0 an extra socket for
        birthday probing, opened on first use (any free port) and closed when the path
        manager no longer lists it in ``aux_slots()``."""
        if slot == 0:
            return self.endpoint
        ep = self._aux.get(slot)
        if ep is None and not self.closed:
            if not AUX_SOCKETS.take():
                return None  # process-wide budget spent: fewer birthday ports, no failure
            try:
                ep = UdpEndpoint.open()
            except OSError as exc:  # out of file descriptors or ports: fewer birthday ports
                AUX_SOCKETS.give()
                log.debug("extra socket %d: %s", slot, exc)
                return None
            ep.on_stun = lambda d, a: self._stun_received(d, a, slot)
            ep.on_quic = self._quic_received
            ep.on_too_big = self._too_big
            ep.set_offload(self._offload)
            self._aux[slot] = ep
        return ep

    def _close_aux(self, slot: int) -> None:
        ep = self._aux.pop(slot, None)
        if ep is not None:
            AUX_SOCKETS.give()
            ep.close()

    # -- re-gathering: the path manager asks, we do the I/O and tell the peer ----------
    def _gather(self) -> None:
        if self.closed:
            return
        task = self.loop.create_task(self._gather_and_send())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _gather_and_send(self) -> None:
        try:
            if self._regather is not None:
                cands = await self._regather() + portmap_candidates(self.portmap)
                if self.handler is not None and self.driver is not None and not self.closed:
                    self.handler.send_candidates([c.encode() for c in cands])
                    self.driver.schedule_flush()
        except Exception as exc:  # e.g. the relay is gone: the schedule tries again later
            log.debug("re-gathering candidates failed: %s", exc)
        finally:
            if not self.closed:
                self.paths.gathered(self.loop.time())
                self._service()

    # -- port mappings: granted after the offer/answer, they follow in-band ------------
    def _mappings_changed(self, mappings: list[Mapping]) -> None:
        self._tell_mappings()

    def _tell_mappings(self) -> None:
        """Send the peer the mapped addresses it has not heard of, once the connection
        can carry them (the server's, after the client's proof)."""
        if self.closed or self.handler is None or self.driver is None:
            return
        new = [c for c in portmap_candidates(self.portmap) if c.addr not in self._told]
        if not new or not self.handler.ready_for_candidates:
            return
        self._told.update(c.addr for c in new)
        portmap_log.debug("portmap: telling the peer %s (in-band)",
                          ", ".join(format_addr(*c.addr) for c in new))
        self.handler.send_candidates([c.encode() for c in new])
        self.driver.schedule_flush()

    def _remote_candidates(self, texts: list[str]) -> None:
        cands = decode_candidates(texts)
        if cands and not self.closed:
            self.paths.add_remote_candidates(cands, self.loop.time())
            self._service()

    def _on_timer(self) -> None:
        if self.closed:
            return
        self.paths.handle_timer(self.loop.time())
        self._service()


def new_path_manager(
    *, local_key: bytes, remote_key: bytes, mode: str, relay_available: bool,
    config: TunnelConfig,
) -> PathManager:
    """A PathManager wired to this host's networks, the OS random source and the route
    MTU (the path MTU search's ceiling), that asks for re-gathering."""
    from .candidates import local_networks

    return PathManager(
        local_key=local_key,
        remote_key=remote_key,
        local_networks=local_networks(),
        mode=mode,
        relay_available=relay_available,
        config=config.paths,
        random_bytes=os.urandom,
        multi_socket=True,
        regather=True,
        mtu=PathMtu(config.pmtu, relay_size=config.relay_datagram_size,
                    unprobed=config.max_datagram, route_mtu=route_mtu),
    )
