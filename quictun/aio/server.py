"""The serving side: :func:`serve`, one registration on the relay and one session per client.

:class:`Server` keeps ``name`` registered (re-registering after the relay restarts or
the network blips), verifies each :class:`~quictun.proto.offer.Offer` (a wrong secret is
refused before anything else), refuses replayed offers, answers with our identity's
fingerprint and fresh candidates, and runs one :class:`~quictun.aio.session.PeerSession`
per client.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any

from ..config import DEFAULT_SIGNAL, TunnelConfig
from ..errors import TunnelError
from ..proto import auth
from ..proto import signalling as sigproto
from ..proto.addr import decode_candidates, parse_hostport
from ..proto.identity import Identity
from ..proto.limits import ReplayWindow, Sighting
from ..proto.offer import Answer, Forged, Offer, OfferError, session_keys
from ..punch.types import Mode, NetPath, PathConfig, describe
from ..store import load_or_create
from .candidates import open_and_gather, regather
from .client import StatusCallback, check_mode
from .handlers import ServerHandler
from .relay import RelayError, SignalClient
from .session import PeerSession, new_path_manager

__all__ = ["Server", "serve"]

log = logging.getLogger("quictun")


@dataclass
class _ServedSession:
    session: PeerSession
    started: float
    client_fp: str = ""
    relay_closed: bool = False  # the relay already ended this session (no Close needed)


class Server:
    """Serves ``target`` under ``name`` until cancelled; see :func:`serve`."""

    def __init__(
        self, name: str, target: tuple[str, int], *, signal: str, secret: str | bytes,
        mode: Mode, token: str | None, identity: Identity,
        on_event: StatusCallback | None, config: TunnelConfig,
        on_registered: Callable[[], None] | None = None,
    ) -> None:
        self.name = name
        self.on_registered = on_registered
        self.target = target
        self.url = signal
        self.mode = mode
        self.token = token
        self.identity = identity
        self.config = config
        self.root = auth.root_key(secret, name)
        self.emit = on_event or (lambda s: log.info("%s", s))
        self.sessions: dict[int, _ServedSession] = {}
        self._accepting: set[int] = set()
        # client nonces of authenticated offers; full, it refuses rather than forgets
        self._nonces = ReplayWindow(config.nonce_memory, 65536, evict_when_full=False)
        self._tasks: set[asyncio.Task[None]] = set()
        self.signal: SignalClient | None = None
        self.registered = asyncio.Event()

    async def run(self) -> None:
        """Register and serve; re-register with backoff after the relay is lost.

        Raises :class:`TunnelError` when the first registration fails, or when the relay
        refuses the name or the token (no retry can help)."""
        delay = 1.0
        first = True
        try:
            while True:
                sc = SignalClient(self.url, token=self.token)
                try:
                    await self._register(sc)
                except TunnelError as exc:
                    await sc.close()
                    if first or exc.permanent:
                        raise
                    self.emit(f"{exc}; retrying in {delay:.0f} s")
                else:
                    first = False
                    delay = 1.0
                    await self._serve_until_lost(sc)
                    self.emit("lost the relay; reconnecting")
                await asyncio.sleep(delay)
                delay = min(delay * 2, 30.0)
        finally:
            for task in list(self._tasks):
                task.cancel()

    async def _register(self, sc: SignalClient) -> None:
        """Connect and register the name. Raises TunnelError (``permanent`` for a name
        held by another identity or a refused token)."""
        try:
            await sc.open()
            owner = auth.owner_token(self.identity.private_bytes(), self.name)
            await sc.request(sigproto.Register(name=self.name, owner=owner),
                             lambda m: isinstance(m, sigproto.Registered), timeout=10)
        except RelayError as exc:
            if exc.code == sigproto.E_NAME_TAKEN:
                raise _Permanent(f"the name {self.name!r} is held by another identity on "
                                 "this relay; choose another name") from None
            if exc.code == sigproto.E_UNAUTHORIZED:
                if not self.token:
                    raise _Permanent("this relay requires a token to register a name (set "
                                     "QUICTUN_SIGNAL_TOKEN or pass --token)") from None
                raise _Permanent("the relay refused our token (check QUICTUN_SIGNAL_TOKEN "
                                 "/ --token)") from None
            raise

    async def _serve_until_lost(self, sc: SignalClient) -> None:
        self.signal = sc
        lost = asyncio.get_running_loop().create_future()
        sc.on_message = self._on_message
        sc.on_relay = self._on_relay
        sc.on_lost = lambda exc, lost=lost: lost.done() or lost.set_result(None)
        self.registered.set()
        self.emit(f"serving {self.name!r} -> {self.target[0]}:{self.target[1]} via {self.url}")
        if self.on_registered is not None:
            self.on_registered()
        try:
            await lost
        finally:
            self.registered.clear()
            await sc.close()
        for s in self.sessions.values():
            s.session.relay_lost()

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        """Run ``coro`` as a task that is kept until done, its failure logged."""
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("serving task failed: %r", task.exception())

    def _on_relay(self, sid: int, data: bytes) -> None:
        s = self.sessions.get(sid)
        if s is not None:
            s.session.relay_received(data)

    def _on_message(self, m: sigproto.Message) -> None:
        if isinstance(m, sigproto.Incoming):
            self._spawn(self._accept(m))
        elif isinstance(m, sigproto.Go):
            s = self.sessions.get(m.session)
            if s is not None:
                s.session.start()
        elif isinstance(m, sigproto.Closed):
            s = self.sessions.get(m.session)
            if s is not None:
                s.relay_closed = True
            if s is not None and (s.session.driver is None or s.session.paths.current is None
                                  or s.session.paths.current.kind == "relay"):
                s.session.close("peer closed")
        elif isinstance(m, sigproto.Error):
            log.debug("relay error: %s %s", m.code, m.message)

    async def _reject(self, sid: int, reason: str, code: str) -> None:
        """Refuse session ``sid``: ``reason`` for humans, ``code`` (a
        ``sigproto.REJECT_*`` constant) for the connector's program to act on."""
        if self.signal is not None:
            with contextlib.suppress(TunnelError):
                await self.signal.send(sigproto.Reject(session=sid, reason=reason, code=code))

    async def _accept(self, inc: sigproto.Incoming) -> None:
        """Answer one offer; never raises (a failure rejects that client only)."""
        if inc.session in self.sessions or inc.session in self._accepting:
            return  # a duplicate incoming for a session we already handle
        self._accepting.add(inc.session)
        try:
            await self._accept_offer(inc)
        except Exception as exc:  # e.g. out of sockets: this client fails, serving goes on
            log.error("could not accept session %d: %s", inc.session, exc)
            await self._reject(inc.session, "server error", sigproto.REJECT_SERVER_ERROR)
        finally:
            self._accepting.discard(inc.session)

    async def _check_offer(self, inc: sigproto.Incoming) -> Offer | None:
        """The verified offer, or None after rejecting it (malformed, wrong secret,
        replayed, or no room)."""
        try:
            offer = Offer.from_wire(inc.offer, self.root)
        except Forged:
            self.emit(f"refused a client: wrong secret (session {inc.session})")
            await self._reject(inc.session, "authentication failed: wrong secret",
                               sigproto.REJECT_AUTH)
            return None
        except OfferError:
            await self._reject(inc.session, "malformed offer", sigproto.REJECT_MALFORMED)
            return None
        # a replayed offer (the relay or an eavesdropper resending one) gets no session,
        # no sockets, no punching
        if self._nonces.check(offer.nonce, time.monotonic()) is not Sighting.NEW:
            self.emit(f"refused a replayed offer (session {inc.session})")
            await self._reject(inc.session, "replayed offer", sigproto.REJECT_REPLAY)
            return None
        if len(self.sessions) + len(self._accepting) > self.config.max_sessions:
            await self._reject(inc.session, "server busy", sigproto.REJECT_BUSY)
            return None
        return offer

    async def _accept_offer(self, inc: sigproto.Incoming) -> None:
        sc = self.signal
        if sc is None:
            return
        offer = await self._check_offer(inc)
        if offer is None:
            return
        ep, mine = await open_and_gather(sc, self.mode, self.config.stun_wait)
        answer = Answer.create(self.identity.fingerprint, [c.encode() for c in mine],
                               os.urandom)
        keys = session_keys(self.root, offer, answer)
        pm = new_path_manager(local_key=keys.to_server, remote_key=keys.to_client,
                              mode=self.mode, relay_available=bool(sc.welcome.relay),
                              config=self.config)
        pm.set_local_candidates(mine)
        pm.add_remote_candidates(decode_candidates(list(offer.cands)),
                                 asyncio.get_running_loop().time())
        sid = inc.session
        served = _ServedSession(session=None, started=time.monotonic())  # type: ignore[arg-type]

        def on_auth(client_fp: str) -> None:
            served.client_fp = client_fp
            self.emit(f"client {client_fp[:16]} connected (session {sid}, "
                      f"{describe(session.paths.current)})")

        def on_path(path: NetPath | None) -> None:
            if served.client_fp:
                self.emit(f"client {served.client_fp[:16]} {describe(path)}")

        session = PeerSession(
            endpoint=ep, signal=sc, session_id=sid, paths=pm, identity=self.identity,
            config=self.config, is_client=False,
            handler_factory=lambda drv: ServerHandler(
                drv, config=self.config, identity=self.identity, keys=keys,
                client_pub=offer.client_pub, target=self.target, on_authenticated=on_auth),
            on_path=on_path,
            on_failed=lambda reason: session.close(reason),
            regather=lambda: regather(sc, ep, self.mode),
        )
        served.session = session
        self.sessions[sid] = served
        self._spawn(self._watch(sid, served))
        try:
            await sc.send(sigproto.Answer(session=sid, answer=answer.to_wire(self.root, offer)))
        except TunnelError:
            session.close("relay lost")

    async def _watch(self, sid: int, served: _ServedSession) -> None:
        """End a session whose QUIC never starts; log its summary when it ends."""
        session = served.session
        waited = 0.0
        limit = self.config.connect_timeout * 2
        while not session.closed and session.driver is None and waited < limit:
            await asyncio.sleep(0.5)
            waited += 0.5
        if session.driver is None:
            session.close("no QUIC from the client")
        else:
            await session.driver.terminated.wait()
        session.close()
        if self.sessions.get(sid) is served:
            del self.sessions[sid]
        if self.signal is not None and self.signal.connected and not served.relay_closed:
            with contextlib.suppress(TunnelError):
                await self.signal.send(sigproto.Close(session=sid, reason="ended"))
        if served.client_fp:
            drv = session.driver
            h = session.handler
            self.emit(
                f"client {served.client_fp[:16]} disconnected after "
                f"{time.monotonic() - served.started:.1f} s, "
                f"{getattr(h, 'connections', 0)} connections, "
                f"{drv.bytes_in if drv else 0} bytes in, {drv.bytes_out if drv else 0} out"
            )


class _Permanent(TunnelError):
    """A registration failure no retry can fix."""

    permanent = True


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
    config: TunnelConfig | None = None,
) -> None:
    """Make ``forward`` (``HOST:PORT``) reachable as ``name`` until cancelled.

    Re-registers after the relay restarts or the network blips; ``on_registered`` is
    called after each successful registration. ``config`` carries every tunable
    (``path_config``, if given, replaces its ``paths``).

    Raises:
        TunnelError: the first registration failed (relay unreachable, name taken by
            another identity, bad token), or ``forward`` is not ``HOST:PORT``.
    """
    if not sigproto.valid_name(name):
        raise TunnelError(f"{name!r} is not a valid name (1-64 of A-Z a-z 0-9 . _ -)")
    try:
        target = parse_hostport(forward)
    except ValueError as exc:
        raise TunnelError(f"--forward: {exc}") from None
    checked = check_mode(mode)
    config = config or TunnelConfig()
    if path_config is not None:
        config = config.replace(paths=path_config)
    server = Server(name, target, signal=signal, secret=secret, mode=checked, token=token,
                    identity=identity or load_or_create(), on_event=on_event, config=config,
                    on_registered=on_registered)
    await server.run()
