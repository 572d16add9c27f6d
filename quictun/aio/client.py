"""The library API: :func:`connect` and :func:`serve`.

Example::

    import asyncio, quictun

    async def main():
        async with quictun.connect("home", signal="ws://relay:8765/", secret=s) as tunnel:
            reader, writer = await tunnel.open_connection()
            writer.write(b"hello")
            print(await reader.read(100))

    asyncio.run(main())

Offer/answer handshake over the relay (see docs/architecture.md):

1. the connector sends ``offer = {pub, nonce, cands, mac}``, the MAC keyed by the
   secret-derived root key; the server rejects a bad MAC (wrong secret) at once;
2. the server answers ``{fp, nonce, cands, mac}``; the connector checks the MAC and pins
   ``fp``, the server's identity;
3. both start punching when the relay says go; QUIC starts at once over whatever path
   exists (the relay first, if allowed) and moves when a better path appears.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

from ..errors import AuthError, TunnelError, printable
from ..proto import auth
from ..proto import signalling as sigproto
from ..proto.addr import parse_hostport
from ..proto.identity import Identity, load_or_create
from ..punch.manager import Candidate, Path, PathConfig
from ..quic import engines
from ..quic.flow import CONNECTION_WINDOW, STREAM_WINDOW
from .handlers import ClientHandler
from .relay import RelayError, SignalClient
from .session import PeerSession, describe, new_path_manager
from .udp import UdpEndpoint, gather, resolve

log = logging.getLogger("quictun")

ALPN = "quictun/1"
DEFAULT_SIGNAL = "ws://127.0.0.1:8765/"
MODES = ("auto", "direct", "relay")
MAX_DATAGRAM = 1350
CONNECT_TIMEOUT = 20.0
MAX_SESSIONS = 256
NONCE_MEMORY = 600.0  # s a client nonce is remembered (replayed offers are refused)
STUN_WAIT = 0.5  # how long gathering waits for the relay's reflectors before the offer

StatusCallback = Callable[[str], None]


def _quic_config(is_client: bool, identity: Identity) -> Any:
    # a client does not verify the certificate: it pins the fingerprint after the handshake
    return engines.current().configuration(
        is_client, identity, alpn=ALPN, max_datagram_size=MAX_DATAGRAM,
        max_stream_data=STREAM_WINDOW, max_data=CONNECTION_WINDOW, idle_timeout=60.0,
    )


async def _stun_servers(signal: SignalClient) -> list[tuple[str, int]]:
    assert signal.welcome is not None
    addrs = await resolve(signal.host, signal.port)
    v4 = [a[0] for a in addrs if ":" not in a[0]][:1]
    v6 = [a[0] for a in addrs if ":" in a[0]][:1]
    return [(ip, p) for ip in v4 + v6 for p in signal.welcome.stun[:2]]


async def _candidates(signal: SignalClient, mode: str) -> tuple[UdpEndpoint, list[Candidate]]:
    ep = await UdpEndpoint.bind()
    if mode == "relay":
        return ep, []
    try:
        # a short wait: reflexive candidates that miss it follow in-band once QUIC is up
        return ep, await gather(ep, await _stun_servers(signal), timeout=STUN_WAIT)
    except BaseException:
        ep.close()
        raise


async def _regather(signal: SignalClient, ep: UdpEndpoint, mode: str) -> list[Candidate]:
    """Candidates of an existing socket, re-learned (after the NAT may have moved it)."""
    if mode == "relay" or signal.welcome is None:
        return []
    return await gather(ep, await _stun_servers(signal))


def _decode_cands(raw: Any) -> list[Candidate]:
    out = []
    for c in raw if isinstance(raw, list) else []:
        try:
            out.append(Candidate.decode(c))
        except (ValueError, TypeError):
            continue
    return out[:32]


# --------------------------------------------------------------------------------------
# client
# --------------------------------------------------------------------------------------
@dataclass
class Tunnel:
    """An established tunnel to a served port. Many connections may share it."""

    name: str
    session: PeerSession
    handler: ClientHandler
    signal: SignalClient
    started: float
    path: Path | None = None
    _servers: list[asyncio.AbstractServer] = field(default_factory=list)

    async def open_connection(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """Open one forwarded connection; returns asyncio streams (like
        ``asyncio.open_connection``). Raises :class:`TunnelError` if the tunnel is closed."""
        if self.closed:
            raise TunnelError("the tunnel is closed")
        loop = asyncio.get_running_loop()
        ours, theirs = socket.socketpair()
        bridge = self.handler.open_bridge()
        await loop.connect_accepted_socket(lambda: bridge, sock=ours)
        return await asyncio.open_connection(sock=theirs)

    def bridge(self) -> Any:
        """A protocol for one local transport (used by ``--listen`` and ``--stdio``)."""
        return self.handler.open_bridge()

    @property
    def closed(self) -> bool:
        return self.session.closed or self.handler.closed.done()

    async def wait_closed(self) -> str:
        """Wait until the tunnel ends; returns why."""
        return await self.handler.closed

    @property
    def bytes_sent(self) -> int:
        return self.session.engine.bytes_out if self.session.engine else 0

    @property
    def bytes_received(self) -> int:
        return self.session.engine.bytes_in if self.session.engine else 0

    async def close(self) -> None:
        for srv in self._servers:
            srv.close()
        self.session.close("client closed")
        with contextlib.suppress(TunnelError):
            await self.signal.send(sigproto.Close(session=self.session.session_id,
                                                  reason="client closed"))
        await asyncio.sleep(0)
        await self.signal.close()


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
    timeout: float = CONNECT_TIMEOUT,
    pin: str | None = None,
) -> Tunnel:
    """Connect to the peer serving ``name``; returns when the tunnel is authenticated.

    Raises:
        TunnelError: with a one-line reason (relay unreachable, no such name, wrong
            secret, punching failed, ...).
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}")
    if not sigproto.valid_name(name):
        raise TunnelError(f"{name!r} is not a valid name (1-64 of A-Z a-z 0-9 . _ -)")
    status = on_status or (lambda s: log.info("%s", s))
    identity = identity or load_or_create()
    sc = SignalClient(signal, token=token)
    status(f"contacting the relay {signal}")
    welcome = await sc.open()
    try:
        if mode == "relay" and not welcome.relay:
            raise TunnelError("--relay-only was asked for, but this relay does not relay")
        ep, cands = await _candidates(sc, mode)
        try:
            return await _handshake(name, sc, ep, cands, secret, mode, identity, status,
                                    path_config, timeout, pin)
        except BaseException:
            ep.close()
            raise
    except BaseException:
        await sc.close()
        raise


async def _handshake(
    name: str, sc: SignalClient, ep: UdpEndpoint, cands: list[Candidate],
    secret: str | bytes, mode: str, identity: Identity, status: StatusCallback,
    path_config: PathConfig | None, timeout: float, pin: str | None,
) -> Tunnel:
    loop = asyncio.get_running_loop()
    t0 = time.monotonic()
    root = auth.root_key(secret, name)
    nonce = os.urandom(16).hex()
    pub = identity.public_bytes.hex()
    cand_text = [c.encode() for c in cands]
    offer = {"v": 1, "pub": pub, "nonce": nonce, "cands": cand_text,
             "mac": auth.offer_mac(root, nonce, pub, cand_text)}
    status(f"asking the relay for {name!r}")
    try:
        reply = await sc.request(
            sigproto.Connect(name=name, offer=offer),
            lambda m: isinstance(m, (sigproto.Answer, sigproto.Rejected))
            or (isinstance(m, sigproto.Error) and m.session is not None),
            timeout=timeout,
        )
    except RelayError as exc:
        if exc.code == sigproto.E_NO_SUCH_NAME:
            raise TunnelError(
                f"no peer is serving {name!r} on this relay; start `quictun serve {name}` "
                "on the other machine (same relay URL)"
            ) from None
        raise
    if isinstance(reply, sigproto.Rejected):
        # only the machine-readable code makes it permanent; the reason is free text
        if reply.code == sigproto.REJECT_AUTH:
            raise AuthError(
                f"{name!r} refused the connection: wrong secret "
                "(check QUICTUN_SECRET / --secret-file, or use the ticket)"
            )
        raise TunnelError(f"{name!r} refused the connection: {printable(reply.reason)}")
    if isinstance(reply, sigproto.Error):
        if reply.code == sigproto.E_TIMEOUT:
            raise TunnelError(f"the peer serving {name!r} did not answer (it may be gone)")
        raise TunnelError(f"relay: {printable(reply.message)}")
    assert isinstance(reply, sigproto.Answer)
    ans = reply.answer
    fp, snonce, scands = ans.get("fp"), ans.get("nonce"), ans.get("cands")
    if not (isinstance(fp, str) and isinstance(snonce, str) and isinstance(scands, list)
            and all(isinstance(c, str) for c in scands)):
        raise TunnelError(f"the answer from {name!r} is malformed")
    if not auth.check(auth.answer_mac(root, nonce, snonce, fp, pub, scands), ans.get("mac")):
        raise AuthError(
            f"the answer for {name!r} is not authenticated by our secret: the relay or "
            "someone else is impersonating the peer; refusing"
        )
    if pin is not None and fp != pin:
        raise AuthError(
            f"the peer answering for {name!r} is not the one in the ticket "
            "(fingerprint differs); refusing"
        )
    keys = auth.session_keys(root, nonce, snonce, pub, fp)
    pm = new_path_manager(local_key=keys.to_client, remote_key=keys.to_server, mode=mode,
                          relay_available=bool(sc.welcome and sc.welcome.relay),
                          config=path_config)
    pm.set_local_candidates(cands)  # lets it tell whether our own NAT is symmetric
    pm.add_remote_candidates(_decode_cands(scands), loop.time())
    failed: asyncio.Future[str] = loop.create_future()
    tunnel_box: list[Tunnel] = []

    peer_gone = False

    def on_path(path: Path | None) -> None:
        if tunnel_box:
            tunnel_box[0].path = path
        status(describe(path))
        if peer_gone and (path is None or path.kind == "relay"):
            session.close("the peer disconnected")

    def on_failed(reason: str) -> None:
        if not failed.done():
            failed.set_result(reason)

    session = PeerSession(
        endpoint=ep, signal=sc, session_id=reply.session, paths=pm,
        quic_config=_quic_config(True, identity), is_client=True,
        handler_factory=lambda eng: ClientHandler(eng, identity=identity, keys=keys,
                                                  server_fp=fp),
        on_path=on_path, on_failed=on_failed,
        regather=lambda: _regather(sc, ep, mode),
    )
    handler = session.handler
    assert isinstance(handler, ClientHandler)
    tunnel = Tunnel(name=name, session=session, handler=handler, signal=sc, started=t0)
    tunnel_box.append(tunnel)
    sc.on_relay = lambda sid, data: session.relay_received(data) if sid == reply.session else None
    sc.on_lost = lambda exc: session.relay_lost()

    def on_message(m: sigproto.Message) -> None:
        nonlocal peer_gone
        if isinstance(m, sigproto.Closed) and m.session == reply.session:
            # the peer left the relay; if we still have it directly, carry on until that
            # path dies too
            peer_gone = True
            if not session.paths.current or session.paths.current.kind == "relay":
                session.close("the peer disconnected")

    sc.on_message = on_message
    status("punching a path" if mode != "relay" else "using the relay")
    session.start()
    tunnel.path = pm.current
    ready = asyncio.ensure_future(handler.ready)
    try:
        done, _ = await asyncio.wait({ready, failed}, timeout=timeout,
                                     return_when=asyncio.FIRST_COMPLETED)
        if failed in done:
            raise TunnelError(f"punching failed: {failed.result()}"
                              + (" (try without --direct-only)" if mode == "direct" else ""))
        if ready not in done:
            raise TunnelError(f"no working path to {name!r} within {timeout:.0f} s "
                              "(run `quictun netcheck` on both sides)")
        try:
            ready.result()
        except ConnectionRefusedError as exc:
            raise AuthError(str(exc)) from None
    except BaseException:
        ready.cancel()
        session.close("connect failed")
        raise
    return tunnel


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
) -> AsyncIterator[Tunnel]:
    """``async with connect(NAME, signal=URL, secret=S) as tunnel:`` — see :class:`Tunnel`."""
    tunnel = await open_tunnel(name, signal=signal, secret=secret, mode=mode, token=token,
                               identity=identity, on_status=on_status)
    try:
        yield tunnel
    finally:
        await tunnel.close()


async def serve(
    name: str,
    *,
    forward: str,
    signal: str = DEFAULT_SIGNAL,
    secret: str | bytes,
    mode: str = "auto",
    token: str | None = None,
    identity: Identity | None = None,
    on_event: StatusCallback | None = None,
    path_config: PathConfig | None = None,
    on_registered: Callable[[], None] | None = None,
) -> None:
    """Make ``forward`` (``HOST:PORT``) reachable as ``name`` until cancelled.

    Re-registers after the relay restarts or the network blips; ``on_registered`` is
    called after each successful registration. Raises :class:`TunnelError` if the first
    registration fails (relay unreachable, name taken by another identity, bad token).
    """
    if not sigproto.valid_name(name):
        raise TunnelError(f"{name!r} is not a valid name (1-64 of A-Z a-z 0-9 . _ -)")
    try:
        target = parse_hostport(forward)
    except ValueError as exc:
        raise TunnelError(f"--forward: {exc}") from None
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}")
    from .server import Server

    server = Server(name, target, signal=signal, secret=secret, mode=mode, token=token,
                    identity=identity or load_or_create(), on_event=on_event,
                    path_config=path_config, on_registered=on_registered)
    await server.run()
