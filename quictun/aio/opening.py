"""The serving side's answer to each new client stream, after the client's proof.

An :class:`Opener` reads the stream's open request (:func:`~quictun.proto.control.parse_open`,
held until complete), then: a stream service or a proxy target gets a bridge and a
connection (:mod:`.targets`), a UDP service a :class:`~.datagrams.ServerFlow`, a LIST
the listing. Version-1 requests get an :class:`~quictun.proto.control.OpenReply` first
(a refusal is the reply, then FIN); a bare version-0 preamble keeps its old behaviour
(no reply, RESET_STREAM on failure). It also keeps the per-service counters that
``serve`` logs per client.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Coroutine
from typing import Any

from ..config import TunnelConfig
from ..proto import control as ctl
from ..proto.flows import FlowStats
from ..proto.limits import Quieter
from ..proto.services import Service, ServiceError
from .bridge import StreamBridge
from .datagrams import ServerFlow
from .driver import QuicDriver
from .targets import SOCKS_STATS, Forwarding, ServiceStats, connect_proxy_target, connect_service

log = logging.getLogger("quictun")

#: one line per service every 10 s about its refused connections (per process)
REFUSALS = Quieter(10.0)


class Opener:
    """Opens what each client stream asks for; see the module docstring.

    ``new_bridge(stream_id)`` makes (and registers) the stream's bridge, ``spawn`` runs a
    coroutine as a kept task, ``who`` names the client in log lines.
    """

    def __init__(self, driver: QuicDriver, forwarding: Forwarding, config: TunnelConfig,
                 new_bridge: Callable[[int], StreamBridge],
                 spawn: Callable[[Coroutine[Any, Any, None]], None],
                 who: Callable[[], str]) -> None:
        self.driver = driver
        self.forwarding = forwarding
        self.config = config
        self._new_bridge = new_bridge
        self._spawn = spawn
        self._who = who
        self._opening: dict[int, bytearray] = {}
        self.flows: dict[int, ServerFlow] = {}  # by flow id (stream id / 4)
        self.stats: dict[str, ServiceStats] = {}
        self._service_of: dict[int, str] = {}  # live bridges' stream -> stats key
        self._live: dict[int, StreamBridge] = {}
        self._refused: set[int] = set()

    # -- streams -----------------------------------------------------------------------
    def stream_data(self, stream_id: int, data: bytes, end: bool) -> None:
        """Data of a client stream that has no bridge yet (or is a flow's stream)."""
        flow = self.flows.get(stream_id // 4)
        if flow is not None and flow.stream_id == stream_id:
            self.driver.consume(stream_id, len(data))
            if end:
                self._end_flow(stream_id // 4)
            return
        if stream_id in self._refused:  # what a refused client sent before it heard
            self.driver.consume(stream_id, len(data))
            return
        buf = self._opening.setdefault(stream_id, bytearray())
        buf.extend(data)
        try:
            got = ctl.parse_open(bytes(buf[:ctl.REQUEST_LIMIT]))
        except ctl.ProtocolError as exc:
            self._drop(stream_id, f"bad open request ({exc})")
            return
        if got is None:
            if len(buf) >= ctl.REQUEST_LIMIT or end:
                self._drop(stream_id, "open request cut short")
            return
        request, used = got
        del self._opening[stream_id]
        self.driver.consume(stream_id, used)
        rest = bytes(buf[used:])
        if request.op in (ctl.OP_STREAM, ctl.OP_TARGET):
            self._open_stream(stream_id, request, rest, end)
        else:
            self.driver.consume(stream_id, len(rest))
            if request.op == ctl.OP_LIST:
                body = ctl.encode_listing(self.forwarding.listing())
                self.driver.send(stream_id, ctl.OpenReply(ctl.ST_OK).encode() + body, end=True)
            else:
                self._open_flow(stream_id, request)

    def _drop(self, stream_id: int, why: str) -> None:
        buf = self._opening.pop(stream_id, bytearray())
        self.driver.consume(stream_id, len(buf))
        self.driver.reset(stream_id, ctl.ERR_TARGET_UNREACHABLE)
        log.info("client %s: stream %d: %s", self._who(), stream_id, why)

    def _refuse(self, stream_id: int, request: ctl.OpenRequest, status: int, text: str,
                key: str) -> None:
        self._stat(key).refused += 1
        log.info("client %s: refused %s", self._who(), text)
        if request.version == 0:
            self.driver.reset(stream_id, ctl.ERR_NO_DEFAULT)
            self._refused.add(stream_id)  # what the client still sends: dropped quietly
            return
        self._answer_refusal(stream_id, ctl.OpenReply(status, text))

    def _answer_refusal(self, stream_id: int, reply: ctl.OpenReply) -> None:
        """The reply, then FIN; no STOP_SENDING (it could overtake the reply): the
        client resets its side once it has read the reply, and until then what it
        sends is consumed and dropped."""
        self.driver.send(stream_id, reply.encode(), end=True)
        self._refused.add(stream_id)
        if len(self._refused) > 1024:
            alive = self.driver.quic.stream_alive
            self._refused = {s for s in self._refused if alive(s)}

    def _stat(self, key: str) -> ServiceStats:
        return self.stats.setdefault(key, ServiceStats())

    def _open_stream(self, stream_id: int, request: ctl.OpenRequest, rest: bytes,
                     end: bool) -> None:
        service: Service | None = None
        if request.op == ctl.OP_STREAM:
            try:
                service = self.forwarding.services.resolve(request.service, stream=True)
            except ServiceError as exc:
                self.driver.consume(stream_id, len(rest))
                self._refuse(stream_id, request, ctl.ST_UNKNOWN_SERVICE, str(exc),
                             request.service or "default")
                return
        key = service.name if service is not None else SOCKS_STATS
        bridge = self._new_bridge(stream_id)
        if request.version:
            bridge.send_first = ctl.OpenReply(ctl.ST_OK).encode()
        self._stat(key).connections += 1
        self._service_of[stream_id] = key
        self._live[stream_id] = bridge
        bridge.quic_data(rest, end)
        self._spawn(self._connect(bridge, request, service, key))

    async def _connect(self, bridge: StreamBridge, request: ctl.OpenRequest,
                       service: Service | None, key: str) -> None:
        timeout = self.config.target_timeout
        if service is not None:
            reply = await connect_service(service, lambda: bridge, timeout)
        else:
            reply = await connect_proxy_target(self.forwarding.allow, request.host,
                                               request.port, lambda: bridge, timeout,
                                               self._who())
        if reply.ok:
            return
        sid = bridge.stream_id
        stats = self._stat(key)
        stats.connections -= 1
        stats.refused += 1
        if reply.status != ctl.ST_NOT_ALLOWED:  # not allowed: logged by the check
            self._log_refusal(key, reply)
        if request.version == 0 or self.driver.closed:
            self.driver.reset(sid, ctl.reset_for_status(reply.status))
        else:
            self.driver.send(sid, reply.encode(), end=True)
        self._service_of.pop(sid, None)
        self._live.pop(sid, None)
        bridge.quic_reset(ctl.ERR_TARGET_UNREACHABLE)

    def _log_refusal(self, key: str, reply: ctl.OpenReply) -> None:
        """A target that failed, at the default level: one line per service every 10 s,
        with how many more failed meanwhile."""
        left_out = REFUSALS.allow(key, time.monotonic())
        if left_out is None:
            return
        more = f" ({left_out} more since the last line)" if left_out else ""
        what = f"the service {key!r}" if key not in ("default", SOCKS_STATS) else (
            "a proxy target" if key == SOCKS_STATS else "the service")
        log.warning("%s could not be connected for client %s: %s%s", what, self._who(),
                    reply.text, more)

    def bridge_done(self, bridge: StreamBridge) -> None:
        """A bridge finished: its bytes go to its service's counters."""
        key = self._service_of.pop(bridge.stream_id, None)
        self._live.pop(bridge.stream_id, None)
        if key is not None:
            stats = self._stat(key)
            stats.bytes_in += bridge.bytes_down
            stats.bytes_out += bridge.bytes_up

    def totals(self) -> dict[str, ServiceStats]:
        """Per-service counters, live connections included."""
        out = {k: ServiceStats(v.connections, v.refused, v.bytes_in, v.bytes_out, v.udp)
               for k, v in self.stats.items()}
        for sid, bridge in self._live.items():
            s = out.setdefault(self._service_of.get(sid, SOCKS_STATS), ServiceStats())
            s.bytes_in += bridge.bytes_down
            s.bytes_out += bridge.bytes_up
        return out

    # -- UDP flows ---------------------------------------------------------------------
    def _open_flow(self, stream_id: int, request: ctl.OpenRequest) -> None:
        try:
            service = self.forwarding.services.resolve(request.service, stream=False)
        except ServiceError as exc:
            self._refuse(stream_id, request, ctl.ST_UNKNOWN_SERVICE, str(exc),
                         request.service or "default")
            return
        if len(self.flows) >= self.config.udp_max_flows or not self.driver.datagram_limit():
            why = ("too many udp flows" if self.driver.datagram_limit()
                   else "the client does not accept QUIC datagrams")
            self._refuse(stream_id, request, ctl.ST_FAILURE, why, service.name)
            return
        self._spawn(self._connect_flow(stream_id, request, service))

    async def _connect_flow(self, stream_id: int, request: ctl.OpenRequest,
                            service: Service) -> None:
        stats = self._stat(service.name)
        if stats.udp is None:
            stats.udp = FlowStats()
        flow = ServerFlow(self.driver, stream_id, stats.udp)
        try:
            await asyncio.get_running_loop().create_datagram_endpoint(
                lambda: flow, remote_addr=(service.host, service.port))
        except OSError as exc:
            self._refuse(stream_id, request, ctl.ST_FAILURE,
                         f"{service.name}: {exc.strerror or exc}", service.name)
            return
        if self.driver.closed:
            flow.close()
            return
        stats.connections += 1
        self.flows[flow.flow_id] = flow
        self.driver.send(stream_id, ctl.OpenReply(ctl.ST_OK).encode())

    def datagram(self, data: bytes) -> None:
        got = ctl.decode_datagram(data)
        flow = self.flows.get(got[0]) if got is not None else None
        if flow is not None and got is not None:
            flow.from_peer(got[1])

    def _end_flow(self, flow_id: int) -> None:
        flow = self.flows.pop(flow_id, None)
        if flow is not None:
            flow.close()
            self.driver.send(flow.stream_id, b"", end=True)

    def flow_reset(self, stream_id: int) -> None:
        """The client reset a stream: forget a half-read request, end a flow."""
        self._opening.pop(stream_id, None)
        flow = self.flows.get(stream_id // 4)
        if flow is not None and flow.stream_id == stream_id:
            self.flows.pop(stream_id // 4)
            flow.close()

    def close(self) -> None:
        for flow in self.flows.values():
            flow.close()
        self.flows.clear()
