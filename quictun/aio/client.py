"""The connecting side: :func:`connect` / :func:`open_tunnel` and the :class:`Tunnel`.

Example::

    import asyncio, quictun

    async def main():
        async with quictun.connect("home", signal="ws://relay:8765/", secret=s) as tunnel:
            reader, writer = await tunnel.open_connection()
            writer.write(b"hello")
            print(await reader.read(100))

    asyncio.run(main())

Steps (see docs/protocol.md, "Peer protocol"): open a socket and gather candidates; run
the SPAKE2 exchange through the relay (:class:`~quictun.proto.exchange.ClientExchange`:
our offer, the server's answer whose sealed box proves it knows the secret and names
its fingerprint, which we pin; then our own sealed hello with our identity key and
candidates); start the session (QUIC at once over whatever path exists, the relay first
if allowed, moving when a better path appears); wait until the handshake is done and our
proof, bound to the TLS channel, is sent.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from ..config import DEFAULT_SIGNAL, TunnelConfig
from ..errors import AuthError, TunnelError, printable
from ..proto import control as ctl
from ..proto import pake
from ..proto import signalling as sigproto
from ..proto.addr import Candidate, decode_candidates
from ..proto.control import OpenReply, OpenRequest
from ..proto.exchange import ClientExchange, MismatchedPin
from ..proto.identity import Identity
from ..proto.offer import E_VERSION, OfferError, ServerHello
from ..proto.resume import ResumeKey
from ..punch.types import Mode, NetPath, PathConfig, describe
from ..store import load_or_create
from .bridge import StreamBridge
from .candidates import open_and_gather, portmap_candidates, regather
from .datagrams import DatagramFlow
from .handlers import ClientHandler
from .portmap import PortMapper
from .relay import RelayError, SignalClient
from .relink import ClientRelink, announce, new_signal_client
from .session import PeerSession, load_engine, new_path_manager
from .udp import UdpEndpoint

__all__ = ["DatagramFlow", "StatusCallback", "Tunnel", "connect", "open_tunnel"]

log = logging.getLogger("quictun")

StatusCallback = Callable[[str], None]


def check_mode(mode: str) -> Mode:
    """``mode`` as a :class:`Mode`; ValueError (a programming error) for anything else."""
    try:
        return Mode(mode)
    except ValueError:
        raise ValueError(f"mode must be one of {[m.value for m in Mode]}") from None


@dataclass
class Tunnel:
    """An established tunnel to a served port. Many connections may share it."""

    name: str
    session: PeerSession
    handler: ClientHandler
    signal: SignalClient
    path: NetPath | None = None
    relink: ClientRelink | None = None
    """Re-opens a lost relay link and resumes the session on it (a relay that resumes)."""

    async def open_connection(
        self, service: str | None = None, *, host: str | None = None, port: int = 0,
    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """Open one forwarded connection; returns asyncio streams (like
        ``asyncio.open_connection``).

        ``service``: the served stream service by name (None: the default one). Or
        ``host`` and ``port``: a proxy target, which the serving side checks against
        its ``--allow`` rules. With a name or a target, returns once the server has
        connected it.

        Raises:
            TunnelError: the tunnel is closed, or the server refused (unknown service,
                target not allowed or unreachable), with its reason.
        """
        if self.closed:
            raise TunnelError("the tunnel is closed")
        loop = asyncio.get_running_loop()
        bridge = self.bridge(service, host=host, port=port)
        answered: asyncio.Future[OpenReply] = loop.create_future()
        if service is None and host is None:
            answered.set_result(OpenReply(ctl.ST_OK))  # the bare preamble: no reply
        else:
            bridge.on_reply = lambda r: answered.done() or answered.set_result(r)
        ours, theirs = socket.socketpair()
        await loop.connect_accepted_socket(lambda: bridge, sock=ours)
        # handler.closed is the tunnel's own future: waited on, never cancelled
        await asyncio.wait({answered, self.handler.closed},
                           return_when=asyncio.FIRST_COMPLETED)
        if not answered.done() or not answered.result().ok:
            theirs.close()
            why = answered.result().text if answered.done() else "the tunnel closed"
            raise TunnelError(f"{self.name!r} refused the connection: {printable(why)}")
        return await asyncio.open_connection(sock=theirs)

    def bridge(self, service: str | None = None, *, host: str | None = None,
               port: int = 0) -> StreamBridge:
        """A protocol for one local transport (``--listen``, ``--stdio``, SOCKS): to
        ``service`` (None: the default), or to the proxy target ``host:port``."""
        if host is not None:
            req = OpenRequest(ctl.OP_TARGET, host=host, port=port)
        elif service is not None:
            req = OpenRequest(ctl.OP_STREAM, service)
        else:
            req = None
        return self.handler.open_bridge(req)

    async def open_datagram(self, service: str | None = None) -> DatagramFlow:
        """Open one UDP flow to ``service`` (None: the default udp service): ``send``
        payloads, ``await recv()`` them, ``close()``. Returns once the server opened it.

        Raises:
            TunnelError: the tunnel is closed, or the server refused the flow.
        """
        if self.closed:
            raise TunnelError("the tunnel is closed")
        flow = self.handler.open_flow(service)
        reply = await flow.opened
        if not reply.ok:
            raise TunnelError(f"{self.name!r} refused the udp flow: {printable(reply.text)}")
        return flow

    async def services(self) -> ctl.Listing:
        """What the server offers (told only to an authenticated client)."""
        if self.closed:
            raise TunnelError("the tunnel is closed")
        try:
            reply, body = await self.handler.request(OpenRequest(ctl.OP_LIST))
            if not reply.ok:
                raise ctl.ProtocolError(reply.text)
            return ctl.decode_listing(body)
        except ctl.ProtocolError as exc:
            raise TunnelError(f"{self.name!r} did not list its services: {exc} (an "
                              "older quictun?)") from None

    @property
    def closed(self) -> bool:
        return self.session.closed or self.handler.closed.done()

    async def wait_closed(self) -> str:
        """Wait until the tunnel ends; returns why. Cancelling the wait leaves the
        tunnel as it is."""
        return await asyncio.shield(self.handler.closed)

    @property
    def bytes_sent(self) -> int:
        return self.session.driver.bytes_out if self.session.driver else 0

    @property
    def bytes_received(self) -> int:
        return self.session.driver.bytes_in if self.session.driver else 0

    async def close(self) -> None:
        """Close the tunnel: CONNECTION_CLOSE to the peer, ``close`` to the relay, and
        the port mapping deleted (waits for that, at most about a second)."""
        if self.relink is not None:
            self.relink.close()
        self.session.close("client closed")
        await asyncio.sleep(0)  # the CONNECTION_CLOSE leaves before the relay forgets us
        with contextlib.suppress(TunnelError):
            await self.signal.send(sigproto.Close(session=self.session.session_id,
                                                  reason="client closed"))
        await asyncio.sleep(0)
        await self.signal.close()
        await self.session.released()


async def open_tunnel(
    name: str,
    *,
    signal: str,
    secret: str | bytes,
    mode: str = "auto",
    token: str | None = None,
    identity: Identity | None = None,
    on_status: StatusCallback | None = None,
    path_config: PathConfig | None = None,
    timeout: float | None = None,
    pin: str | None = None,
    box_key: bytes | None = None,
    config: TunnelConfig | None = None,
) -> Tunnel:
    """Connect to the peer serving ``name``; returns when the tunnel is authenticated.

    ``config`` carries every tunable (``path_config`` and ``timeout``, if given, replace
    its ``paths`` and ``connect_timeout``). ``pin``: the server fingerprint a ticket names;
    any other is refused. ``box_key``: the server's box key from a ticket, which lets the
    server tell us from strangers before the exchange completes (its guess throttle).

    Raises:
        TunnelError: with a one-line reason (relay unreachable, no such name, wrong
            secret, punching failed, ...); :class:`~quictun.errors.AuthError` when
            trying again cannot help.
    """
    mode = check_mode(mode)
    if not sigproto.valid_name(name):
        raise TunnelError(f"{name!r} is not a valid name (1-64 of A-Z a-z 0-9 . _ -)")
    config = config or TunnelConfig()
    if path_config is not None:
        config = config.replace(paths=path_config)
    if timeout is not None:
        config = config.replace(connect_timeout=timeout)
    status = on_status or (lambda s: log.info("%s", s))
    identity = identity or load_or_create()
    sc = new_signal_client(signal, token, config)
    status(f"contacting the relay {signal}")
    # the QUIC engine is imported while the relay answers our hello (not later: the
    # answer to the offer must find us ready to punch at once, like the peer)
    welcome = await sc.open(while_waiting=load_engine)
    try:
        if mode == Mode.RELAY and not welcome.relay:
            raise TunnelError("--relay-only was asked for, but this relay does not relay")
        ep, cands, mapper = await open_and_gather(sc, mode, config.stun_wait, config.portmap)
        try:
            return await _handshake(_Attempt(name, sc, ep, cands, secret, mode, identity,
                                             status, config, pin, box_key, mapper))
        except BaseException:
            ep.close()
            if mapper is not None:
                await mapper.close()
            raise
    except BaseException:
        await sc.close()
        raise


@dataclass
class _Attempt:
    """Everything one connect attempt carries from step to step."""

    name: str
    sc: SignalClient
    ep: UdpEndpoint
    cands: list[Candidate]
    secret: str | bytes
    mode: Mode
    identity: Identity
    status: StatusCallback
    config: TunnelConfig
    pin: str | None
    box_key: bytes | None
    mapper: PortMapper | None = None


def now_ms() -> int:
    """The wall clock in ms since the epoch (the protocol's timestamps)."""
    return int(time.time() * 1000)


async def _exchange(at: _Attempt, ex: ClientExchange) -> tuple[int, ServerHello]:
    """Send the offer, wait for the answer; returns (session id, the verified hello)."""
    name = at.name
    at.status(f"asking the relay for {name!r}")
    try:
        reply = await at.sc.request(
            sigproto.Connect(name=name, offer=ex.offer()),
            lambda m: isinstance(m, (sigproto.Answer, sigproto.Rejected))
            or (isinstance(m, sigproto.Error) and m.session is not None),
            timeout=at.config.connect_timeout,
        )
    except RelayError as exc:
        if exc.code == sigproto.E_NO_SUCH_NAME:
            raise TunnelError(
                f"no peer is serving {name!r} on this relay; start `quictun serve {name}` "
                "on the other machine (same relay URL)"
            ) from None
        raise
    if isinstance(reply, sigproto.Rejected):
        raise _rejected(name, reply)
    if isinstance(reply, sigproto.Error):
        if reply.code == sigproto.E_TIMEOUT:
            raise TunnelError(f"the peer serving {name!r} did not answer (it may be gone)")
        raise TunnelError(f"relay: {printable(reply.message)}")
    assert isinstance(reply, sigproto.Answer)
    try:
        return reply.session, ex.answer(reply.answer, now_ms())
    except MismatchedPin:
        await _abandon(at.sc, reply.session)
        raise AuthError(f"the peer answering for {name!r} is not the one in the ticket "
                        "(fingerprint differs); refusing") from None
    except pake.PakeError:
        await _abandon(at.sc, reply.session)
        raise AuthError(
            f"the answer from {name!r} does not open with our secret: a wrong secret "
            "(check QUICTUN_SECRET / --secret-file, or use the ticket), or someone else "
            "is answering for the name; refusing") from None
    except OfferError as exc:
        await _abandon(at.sc, reply.session)
        if exc.code == E_VERSION:
            raise AuthError(f"{name!r}: {exc.message}") from None  # permanent
        raise TunnelError(f"the answer from {name!r}: {exc.message}") from None


def _rejected(name: str, reply: sigproto.Rejected) -> TunnelError:
    """The error for a refused offer; only the machine-readable code makes it permanent
    (the reason is free text)."""
    reason = printable(reply.reason)
    if reply.code == sigproto.REJECT_AUTH:
        return AuthError(f"{name!r} refused the connection: wrong secret "
                         "(check QUICTUN_SECRET / --secret-file, or use the ticket)")
    if reply.code == sigproto.REJECT_VERSION:
        return AuthError(f"{name!r} refused the connection: {reason}")
    if reply.code == sigproto.REJECT_MALFORMED:
        return AuthError(f"{name!r} refused our offer: {reason} (if the two machines run "
                         "different quictun releases, upgrade the older one)")
    return TunnelError(f"{name!r} refused the connection: {reason}")


async def _abandon(sc: SignalClient, session: int) -> None:
    """Tell the relay (hence the server) that we give up on ``session``."""
    with contextlib.suppress(TunnelError):
        await sc.send(sigproto.Close(session=session, reason="authentication failed"))


async def _handshake(at: _Attempt) -> Tunnel:
    loop = asyncio.get_running_loop()
    prepared = pake.prepare(at.secret, at.name, pake.KIND_CONNECT, "client")
    ex = ClientExchange(prepared, at.identity, name=at.name, pin=at.pin, box_key=at.box_key,
                        rand=os.urandom(pake.RANDOM_SIZE + 32), now_ms=now_ms())
    sid, hello = await _exchange(at, ex)
    keys = ex.keys
    assert keys is not None
    sc, mode = at.sc, at.mode
    # our identity and candidates (with a port mapping granted meanwhile), sealed: the
    # server punches once this opens
    cands = at.cands + [c for c in portmap_candidates(at.mapper) if c not in at.cands]
    await sc.send(sigproto.Data(session=sid,
                                data=ex.client_hello([c.encode() for c in cands], now_ms())))
    resume_key = ResumeKey(keys.resume_seed("client"))
    resumable = await announce(sc, sid, resume_key)
    pm = new_path_manager(local_key=keys.punch_to_client, remote_key=keys.punch_to_server,
                          mode=mode, relay_available=bool(sc.welcome and sc.welcome.relay),
                          config=at.config)
    pm.set_local_candidates(cands)  # lets it tell whether our own NAT is symmetric
    pm.add_remote_candidates(decode_candidates(list(hello.candidates)), loop.time())
    failed: asyncio.Future[str] = loop.create_future()
    tunnel_box: list[Tunnel] = []
    peer_gone = False

    def on_path(path: NetPath | None) -> None:
        if tunnel_box:
            tunnel_box[0].path = path
        at.status(describe(path))
        if peer_gone and (path is None or path.kind == "relay"):
            session.close("the peer disconnected")

    def on_failed(reason: str) -> None:
        if not failed.done():
            failed.set_result(reason)

    session = PeerSession(
        endpoint=at.ep, signal=sc, session_id=sid, paths=pm, identity=at.identity,
        config=at.config, is_client=True,
        handler_factory=lambda drv: ClientHandler(drv, config=at.config, identity=at.identity,
                                                  keys=keys, server_fp=hello.fingerprint),
        on_path=on_path, on_failed=on_failed,
        regather=lambda: regather(session.signal or sc, at.ep, mode),
        portmap=at.mapper, signalled=cands,
    )
    handler = session.handler
    assert isinstance(handler, ClientHandler)
    tunnel = Tunnel(name=at.name, session=session, handler=handler, signal=sc)
    tunnel_box.append(tunnel)

    def on_message(m: sigproto.Message) -> None:
        nonlocal peer_gone
        if isinstance(m, sigproto.Closed) and m.session == sid:
            # the peer left the relay; if we still have it directly, carry on until that
            # path dies too
            peer_gone = True
            why = f"{at.name!r} ended the session: {printable(m.reason)}"
            if not session.paths.current or session.paths.current.kind == "relay":
                session.close(why)
            else:
                _close_unless_heard(session, at.config.relay_check_timeout, why)

    _wire_relay(at, tunnel, sid, on_message, resume_key if resumable else None)
    at.status("punching a path" if mode != Mode.RELAY else "using the relay")
    session.start()
    tunnel.path = pm.current
    await _until_ready(at, handler, failed, session)
    return tunnel


def _close_unless_heard(session: PeerSession, timeout: float, why: str) -> None:
    """The relay says the peer left while we reach it directly: ping it, and if nothing
    at all comes back within ``timeout`` s the peer is gone (killed or crashed: no
    CONNECTION_CLOSE), so close now instead of after the path's dead-path timers. A relay
    that lies costs nothing: the peer's ACK keeps the session."""
    drv = session.driver
    if drv is None or session.closed:
        return
    heard = drv.bytes_in
    drv.ping()

    def check() -> None:
        if not session.closed and drv.bytes_in == heard:
            session.close(f"{why} (and it no longer answers directly)")

    asyncio.get_running_loop().call_later(timeout, check)


def _wire_relay(at: _Attempt, tunnel: Tunnel, sid: int,
                on_message: Callable[[sigproto.Message], None], key: ResumeKey | None) -> None:
    """Route the relay link's packets and messages to the session; when the link is
    lost, re-open it and resume the session there (``key``: the relay keeps sessions
    for a resume, and has our key)."""
    session = tunnel.session

    def install(sc: SignalClient) -> None:
        sc.on_relay = lambda s, data: session.relay_received(data) if s == sid else None
        sc.on_message = on_message

        def lost(exc: BaseException | None) -> None:
            session.relay_lost()
            if tunnel.relink is not None and not session.closed:
                tunnel.relink.lost()

        sc.on_lost = lost

    def restored(sc: SignalClient) -> None:
        old, tunnel.signal = tunnel.signal, sc
        asyncio.ensure_future(old.close())
        session.relay_restored(sc)

    install(at.sc)
    welcome = at.sc.welcome
    if key is not None and welcome is not None and welcome.resume:
        tunnel.relink = ClientRelink(at.sc.url, at.sc.token, at.config, sid, key,
                                     float(welcome.resume), install=install,
                                     restored=restored, alive=lambda: not tunnel.closed)


async def _until_ready(at: _Attempt, handler: ClientHandler, failed: asyncio.Future[str],
                       session: PeerSession) -> None:
    """Wait for the handshake (and our proof) or a failure; one-line errors."""
    timeout = at.config.connect_timeout
    ready = asyncio.ensure_future(handler.ready)
    try:
        done, _ = await asyncio.wait({ready, failed}, timeout=timeout,
                                     return_when=asyncio.FIRST_COMPLETED)
        if failed in done:
            raise TunnelError(f"punching failed: {failed.result()}"
                              + (" (try without --direct-only)"
                                 if at.mode == Mode.DIRECT else ""))
        if ready not in done:
            raise TunnelError(f"no working path to {at.name!r} within {timeout:.0f} s "
                              "(run `quictun netcheck` on both sides)")
        try:
            ready.result()
        except ConnectionRefusedError as exc:
            raise AuthError(str(exc)) from None
    except BaseException:
        ready.cancel()
        session.close("connect failed")
        raise


@contextlib.asynccontextmanager
async def connect(
    name: str,
    *,
    signal: str = DEFAULT_SIGNAL,
    secret: str | bytes,
    mode: str = "auto",
    token: str | None = None,
    identity: Identity | None = None,
    on_status: StatusCallback | None = None,
    config: TunnelConfig | None = None,
) -> AsyncIterator[Tunnel]:
    """``async with connect(NAME, signal=URL, secret=S) as tunnel:`` — see :class:`Tunnel`
    and :func:`open_tunnel`."""
    tunnel = await open_tunnel(name, signal=signal, secret=secret, mode=mode, token=token,
                               identity=identity, on_status=on_status, config=config)
    try:
        yield tunnel
    finally:
        await tunnel.close()
