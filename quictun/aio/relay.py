"""Client side of the signalling relay: one WebSocket, messages and relayed packets.

Thin asyncio shell around :mod:`quictun.proto.signalling`. Messages a caller waits for
(:meth:`SignalClient.request`) are matched by predicate; all others, and relayed QUIC
packets, go to callbacks. Relayed packets are sent through a bounded queue and dropped
when it is full: they are datagrams, QUIC recovers.
"""

from __future__ import annotations

import asyncio
import logging
import os
import ssl
from collections.abc import Callable

from ..errors import TunnelError, printable
from ..proto import signalling as sigproto
from ..proto.addr import parse_relay_url
from ..version import __version__

log = logging.getLogger("quictun.signal")

RELAY_QUEUE = 512
RELAY_BATCH_BYTES = 16 * 1024  # at most this much per WebSocket message (relay max 64 KiB)
HAPPY_EYEBALLS_DELAY = 0.25  # seconds before trying a relay hostname's next address


CA_ENV = "QUICTUN_SIGNAL_CA"
"""Environment variable: a PEM file of CA certificates to trust for a ``wss://`` relay
(e.g. the ``relay.crt`` of ``certs/make-certs.sh``) instead of the system's."""


def _unreachable(url: str, exc: BaseException) -> str:
    """One line for a relay that could not be reached, naming the likely cause."""
    from websockets.exceptions import InvalidHandshake, InvalidMessage

    reason = str(exc) or ("the connection was reset" if isinstance(exc, ConnectionResetError)
                          else type(exc).__name__)
    tls = url.startswith("wss:")
    if tls and isinstance(exc, (ssl.SSLError, ConnectionResetError, EOFError)):
        plain = "ws:" + url[4:]
        return (f"the TLS handshake with the relay at {url} failed ({reason}): if the relay "
                f"serves plain WebSocket (no --cert), use {plain}")
    if not tls and isinstance(exc, (InvalidMessage, InvalidHandshake)):
        secure = "wss:" + url[3:]
        return (f"the server at {url} did not answer with a WebSocket handshake ({reason}): "
                f"if the relay serves TLS (--cert), use {secure}; else check that this is "
                "a quictun-signal URL")
    if isinstance(exc, ConnectionRefusedError):
        return (f"cannot reach the relay at {url} (connection refused): is quictun-signal "
                "running there? check --signal / QUICTUN_SIGNAL")
    return (f"cannot reach the relay at {url} ({reason}); check --signal / QUICTUN_SIGNAL "
            "and that quictun-signal is running")


class SignalClient:
    """A connection to ``quictun-signal``. Use :meth:`open`, then :meth:`close`.

    ``url`` is checked at once (:class:`TunnelError` if malformed). For ``wss://`` the
    relay's certificate is verified against ``cafile``, else the file named by
    ``$QUICTUN_SIGNAL_CA``, else the system's CA store."""

    def __init__(self, url: str, *, token: str | None = None,
                 cafile: str | None = None, ping_interval: float = 20.0,
                 ping_timeout: float = 20.0) -> None:
        self.url = url
        self.ping_interval = ping_interval
        self.ping_timeout = ping_timeout
        _scheme, self.host, self.port = parse_relay_url(url)
        self.token = token
        self.cafile = cafile
        self.welcome: sigproto.Welcome | None = None
        self.on_message: Callable[[sigproto.Message], None] = lambda m: None
        self.on_relay: Callable[[int, bytes], None] = lambda s, p: None
        self.on_lost: Callable[[BaseException | None], None] = lambda e: None
        self._ws = None
        self._waiters: list[tuple[Callable[[sigproto.Message], bool], asyncio.Future]] = []
        self._reader: asyncio.Task | None = None
        self._writer: asyncio.Task | None = None
        self._out: asyncio.Queue[tuple[int, bytes]] = asyncio.Queue(RELAY_QUEUE)
        self.relayed_out = 0
        self.relayed_in = 0
        self.connected = False
        self._check: asyncio.Task[None] | None = None

    async def open(self, timeout: float = 10.0,
                   while_waiting: Callable[[], object] | None = None) -> sigproto.Welcome:
        """Connect and say hello. Raises :class:`TunnelError` with a one-line reason.
        ``while_waiting``: work to do while the hello travels (see :meth:`request`)."""
        from websockets.asyncio.client import connect
        from websockets.exceptions import InvalidStatus, WebSocketException

        ctx = None
        if self.url.startswith("wss:"):
            cafile = self.cafile or os.environ.get(CA_ENV) or None
            try:
                ctx = ssl.create_default_context(cafile=cafile)
            except (OSError, ssl.SSLError) as exc:
                raise TunnelError(
                    f"cannot load the relay CA file {cafile!r} ({exc}); check {CA_ENV}"
                ) from None
        try:
            self._ws = await asyncio.wait_for(
                connect(
                    self.url,
                    proxy=None,
                    compression=None,
                    max_size=2**20,
                    ssl=ctx,
                    open_timeout=timeout,
                    ping_interval=self.ping_interval or None,
                    ping_timeout=self.ping_timeout or None,
                    # a relay hostname may resolve to several instances (DNS round
                    # robin): start the next address after 0.25 s instead of waiting out
                    # a silent one (RFC 8305), alternating address families
                    happy_eyeballs_delay=HAPPY_EYEBALLS_DELAY,
                    interleave=1,
                ),
                timeout,
            )
        except InvalidStatus as exc:
            raise TunnelError(
                f"the relay at {self.url} refused the connection "
                f"(HTTP {exc.response.status_code}); is this a quictun-signal URL?"
            ) from None
        except ssl.SSLCertVerificationError as exc:
            raise TunnelError(
                f"the relay at {self.url} has a certificate this machine does not trust "
                f"({exc.verify_message}); for a relay with its own CA or a self-signed "
                f"certificate, set {CA_ENV}=/path/to/its.crt"
            ) from None
        except (OSError, TimeoutError, WebSocketException) as exc:
            raise TunnelError(_unreachable(self.url, exc)) from None
        self.connected = True
        self._reader = asyncio.create_task(self._read_loop())
        self._writer = asyncio.create_task(self._write_loop())
        hello = sigproto.Hello(v=sigproto.PROTOCOL_VERSION, token=self.token,
                               agent=f"quictun/{__version__}")
        try:
            reply = await self.request(
                hello, lambda m: isinstance(m, sigproto.Welcome), timeout=timeout,
                while_waiting=while_waiting,
            )
        except RelayError as exc:
            await self.close()  # no half-open WebSocket and reader tasks left behind
            if exc.code == sigproto.E_UNSUPPORTED_VERSION:
                raise _VersionMismatch(
                    f"the relay at {self.url} speaks another protocol version "
                    f"({printable(exc.message)}): run the same quictun release on both "
                    "(`pip install -U quictun` where quictun-signal runs, or here)"
                ) from None
            raise
        except BaseException:
            await self.close()
            raise
        assert isinstance(reply, sigproto.Welcome)
        self.welcome = reply
        return reply

    async def send(self, msg: sigproto.Message) -> None:
        if self._ws is None or not self.connected:
            raise TunnelError("the connection to the relay was lost")
        try:
            await self._ws.send(sigproto.encode(msg))
        except Exception as exc:  # websockets' ConnectionClosed and OSError
            raise TunnelError(f"the connection to the relay was lost ({exc})") from None

    async def request(
        self,
        msg: sigproto.Message,
        match: Callable[[sigproto.Message], bool],
        *,
        timeout: float,
        while_waiting: Callable[[], object] | None = None,
    ) -> sigproto.Message:
        """Send ``msg`` and return the first message for which ``match`` is true.

        The relay answers requests in the order it receives them, so an ``error`` message
        that carries no session and that no waiting ``match`` accepts is the answer to the
        *oldest* request still waiting: that one fails with :class:`RelayError`. Errors
        about a session are for ``match`` to accept (``connect`` does), else they go to
        :attr:`on_message`. ``while_waiting`` is called once the message is on its way
        (synchronous work, e.g. imports, that then overlaps the round trip; what it
        raises propagates).
        """
        fut: asyncio.Future[sigproto.Message] = asyncio.get_running_loop().create_future()
        entry = (match, fut)
        self._waiters.append(entry)
        try:
            await self.send(msg)
            if while_waiting is not None:
                while_waiting()
            return await asyncio.wait_for(fut, timeout)
        except TimeoutError:
            raise TunnelError(f"the relay did not answer within {timeout:.0f} s") from None
        finally:
            if entry in self._waiters:
                self._waiters.remove(entry)

    def send_relay(self, session: int, payload: bytes) -> None:
        """Queue a QUIC packet for the relay; dropped if the queue is full."""
        if not self.connected:
            return
        try:
            self._out.put_nowait((session, payload))
        except asyncio.QueueFull:
            pass

    def check_alive(self, timeout: float) -> None:
        """Ping the relay now; without a pong within ``timeout`` seconds the link counts
        as dead: it is aborted, so :attr:`on_lost` runs (a NAT that forgot its mappings
        breaks TCP silently, and a ping period is long to wait). One check at a time."""
        if not self.connected or self._ws is None or (
                self._check is not None and not self._check.done()):
            return
        self._check = asyncio.get_running_loop().create_task(self._ping_or_abort(timeout))

    async def _ping_or_abort(self, timeout: float) -> None:
        ws = self._ws
        try:
            pong = await ws.ping()
            await asyncio.wait_for(pong, timeout)
        except asyncio.CancelledError:
            raise
        except TimeoutError:
            if self.connected and ws is self._ws:
                log.info("the relay did not answer a ping within %.0f s: reconnecting",
                         timeout)
                ws.transport.abort()  # the read loop ends and reports the loss
        except Exception:  # already closed: the read loop reports it
            pass

    async def close(self) -> None:
        self.connected = False
        if self._check is not None:
            self._check.cancel()
        for task in (self._writer, self._reader):
            if task is not None:
                task.cancel()
        if self._ws is not None:
            try:
                await asyncio.wait_for(self._ws.close(), 2)
            except Exception:
                pass

    # -- loops -------------------------------------------------------------------------
    async def _write_loop(self) -> None:
        ws = self._ws
        try:
            while True:
                # everything queued during one loop turn goes out as one WebSocket message
                # per session (kind 0x02): far fewer messages than packets
                first = await self._out.get()
                batch = [first]
                size = len(first[1])
                while not self._out.empty() and size < RELAY_BATCH_BYTES:
                    item = self._out.get_nowait()
                    batch.append(item)
                    size += len(item[1])
                by_session: dict[int, list[bytes]] = {}
                for sid, packet in batch:
                    by_session.setdefault(sid, []).append(packet)
                    self.relayed_out += len(packet)
                for sid, packets in by_session.items():
                    if len(packets) == 1:
                        await ws.send(sigproto.encode_relay(sid, packets[0]))
                    else:
                        await ws.send(sigproto.encode_relay_batch(sid, packets))
        except asyncio.CancelledError:
            raise
        except Exception:
            pass  # the read loop reports the loss

    async def _read_loop(self) -> None:
        err: BaseException | None = None
        try:
            async for raw in self._ws:
                if isinstance(raw, bytes):
                    try:
                        session, packets = sigproto.relay_packets(raw)
                    except sigproto.ProtocolError:
                        continue
                    for payload in packets:
                        self.relayed_in += len(payload)
                        try:
                            self.on_relay(session, payload)
                        except Exception:  # a bug above us must not cut the relay link
                            log.exception("error handling a relayed packet")
                    continue
                try:
                    msg = sigproto.decode(raw)
                except sigproto.ProtocolError as exc:
                    log.warning("ignoring a malformed message from the relay: %s", exc)
                    continue
                try:
                    self._dispatch(msg)
                except Exception:
                    log.exception("error handling a %s message from the relay", msg.T)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            err = exc
        finally:
            if self.connected:
                self.connected = False
                lost = TunnelError("the connection to the relay was lost")
                for _m, fut in self._waiters:
                    if not fut.done():
                        fut.set_exception(lost)
                self._waiters.clear()
                self.on_lost(err)

    def _dispatch(self, msg: sigproto.Message) -> None:
        for entry in list(self._waiters):
            match, fut = entry
            if fut.done():
                continue
            if match(msg):
                self._waiters.remove(entry)
                fut.set_result(msg)
                return
        if isinstance(msg, sigproto.Error) and msg.session is None and self._waiters:
            # the answer to the oldest request in flight (bad token, name taken...)
            match, fut = self._waiters.pop(0)
            fut.set_exception(RelayError(msg.code, msg.message))
            return
        self.on_message(msg)


class RelayError(TunnelError):
    """The relay answered with an ``error`` message."""

    def __init__(self, code: str, message: str) -> None:
        text = printable(message)
        super().__init__(f"relay: {text}" if text else f"relay error: {printable(code)}")
        self.code = code
        self.message = message


class _VersionMismatch(TunnelError):
    """The relay refused our hello's protocol version: retrying cannot help."""

    permanent = True
