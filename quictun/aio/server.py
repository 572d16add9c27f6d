"""The serving side: one registration on the relay, one session per connecting client.

:class:`Server` keeps ``name`` registered (re-registering after the relay restarts or
the network blips), checks each offer's MAC (a wrong secret is refused before anything
else), refuses replayed offers, answers with our identity's fingerprint and fresh
candidates, and runs one :class:`~quictun.aio.session.PeerSession` per client. Used by
:func:`quictun.aio.client.serve`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass

from ..errors import TunnelError
from ..proto import auth
from ..proto import signalling as sigproto
from ..proto.identity import Identity
from ..proto.limits import ReplayWindow, Sighting
from ..punch.manager import Path, PathConfig
from .client import (
    CONNECT_TIMEOUT,
    MAX_SESSIONS,
    NONCE_MEMORY,
    StatusCallback,
    _candidates,
    _decode_cands,
    _quic_config,
    _regather,
)
from .handlers import ServerHandler
from .relay import RelayError, SignalClient
from .session import PeerSession, describe, new_path_manager

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
        mode: str, token: str | None, identity: Identity,
        on_event: StatusCallback | None, path_config: PathConfig | None,
        on_registered: Callable[[], None] | None = None,
    ) -> None:
        self.name = name
        self.on_registered = on_registered
        self.target = target
        self.url = signal
        self.mode = mode
        self.token = token
        self.identity = identity
        self.root = auth.root_key(secret, name)
        self.emit = on_event or (lambda s: log.info("%s", s))
        self.path_config = path_config
        self.sessions: dict[int, _ServedSession] = {}
        self._accepting: set[int] = set()
        # client nonces of authenticated offers; full, it refuses rather than forgets
        self._nonces = ReplayWindow(NONCE_MEMORY, 65536, evict_when_full=False)
        self.signal: SignalClient | None = None
        self.registered = asyncio.Event()

    async def run(self) -> None:
        delay = 1.0
        first = True
        while True:
            sc = SignalClient(self.url, token=self.token)
            try:
                await sc.open()
                await sc.request(
                    sigproto.Register(name=self.name,
                                      owner=auth.owner_token(self.identity.private_bytes(),
                                                             self.name)),
                    lambda m: isinstance(m, sigproto.Registered), timeout=10)
            except RelayError as exc:
                await sc.close()
                if exc.code in (sigproto.E_NAME_TAKEN, sigproto.E_UNAUTHORIZED):
                    if exc.code == sigproto.E_NAME_TAKEN:
                        raise TunnelError(
                            f"the name {self.name!r} is held by another identity on this "
                            "relay; choose another name"
                        ) from None
                    if not self.token:
                        raise TunnelError(
                            "this relay requires a token to register a name (set "
                            "QUICTUN_SIGNAL_TOKEN or pass --token)"
                        ) from None
                    raise TunnelError(
                        "the relay refused our token (check QUICTUN_SIGNAL_TOKEN / --token)"
                    ) from None
                if first:
                    raise
                self.emit(f"relay: {exc}; retrying in {delay:.0f} s")
            except TunnelError as exc:
                await sc.close()
                if first:
                    raise
                self.emit(f"{exc}; retrying in {delay:.0f} s")
            else:
                first = False
                delay = 1.0
                self.signal = sc
                lost = asyncio.get_running_loop().create_future()
                sc.on_message = self._on_message
                sc.on_relay = self._on_relay
                sc.on_lost = lambda exc, lost=lost: lost.done() or lost.set_result(None)
                self.registered.set()
                self.emit(f"serving {self.name!r} -> {self.target[0]}:{self.target[1]} "
                          f"via {self.url}")
                if self.on_registered is not None:
                    self.on_registered()
                try:
                    await lost
                finally:
                    self.registered.clear()
                    await sc.close()
                for s in self.sessions.values():
                    s.session.relay_lost()
                self.emit("lost the relay; reconnecting")
            await asyncio.sleep(delay)
            delay = min(delay * 2, 30.0)

    def _on_relay(self, sid: int, data: bytes) -> None:
        s = self.sessions.get(sid)
        if s is not None:
            s.session.relay_received(data)

    def _on_message(self, m: sigproto.Message) -> None:
        if isinstance(m, sigproto.Incoming):
            asyncio.ensure_future(self._accept(m))
        elif isinstance(m, sigproto.Go):
            s = self.sessions.get(m.session)
            if s is not None:
                s.session.start()
        elif isinstance(m, sigproto.Closed):
            s = self.sessions.get(m.session)
            if s is not None:
                s.relay_closed = True
            if s is not None and (s.session.engine is None or s.session.paths.current is None
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

    def _fresh_nonce(self, nonce: str) -> bool:
        """False for a client nonce seen recently: a replayed offer (the relay or an
        eavesdropper resending one) gets no session, no sockets, no punching."""
        return self._nonces.check(nonce, time.monotonic()) is Sighting.NEW

    async def _accept_offer(self, inc: sigproto.Incoming) -> None:
        sc = self.signal
        if sc is None:
            return
        offer = inc.offer
        pub, nonce, cands = offer.get("pub"), offer.get("nonce"), offer.get("cands")
        if not (isinstance(pub, str) and isinstance(nonce, str) and isinstance(cands, list)
                and all(isinstance(c, str) for c in cands)):
            await self._reject(inc.session, "malformed offer", sigproto.REJECT_MALFORMED)
            return
        if not auth.check(auth.offer_mac(self.root, nonce, pub, cands), offer.get("mac")):
            self.emit(f"refused a client: wrong secret (session {inc.session})")
            await self._reject(inc.session, "authentication failed: wrong secret",
                               sigproto.REJECT_AUTH)
            return
        try:
            client_pub = bytes.fromhex(pub)
            if len(client_pub) != 32:
                raise ValueError
        except ValueError:
            await self._reject(inc.session, "malformed offer", sigproto.REJECT_MALFORMED)
            return
        if not self._fresh_nonce(nonce):
            self.emit(f"refused a replayed offer (session {inc.session})")
            await self._reject(inc.session, "replayed offer", sigproto.REJECT_REPLAY)
            return
        if len(self.sessions) + len(self._accepting) > MAX_SESSIONS:
            await self._reject(inc.session, "server busy", sigproto.REJECT_BUSY)
            return
        ep, mine = await _candidates(sc, self.mode)
        snonce = os.urandom(16).hex()
        fp = self.identity.fingerprint
        mine_text = [c.encode() for c in mine]
        keys = auth.session_keys(self.root, nonce, snonce, pub, fp)
        pm = new_path_manager(local_key=keys.to_server, remote_key=keys.to_client,
                              mode=self.mode, relay_available=bool(sc.welcome.relay),
                              config=self.path_config)
        loop = asyncio.get_running_loop()
        pm.set_local_candidates(mine)
        pm.add_remote_candidates(_decode_cands(cands), loop.time())
        sid = inc.session
        served = _ServedSession(session=None, started=time.monotonic())  # type: ignore[arg-type]

        def on_auth(client_fp: str) -> None:
            served.client_fp = client_fp
            self.emit(f"client {client_fp[:16]} connected (session {sid}, "
                      f"{describe(session.paths.current)})")

        def on_path(path: Path | None) -> None:
            if served.client_fp:
                self.emit(f"client {served.client_fp[:16]} {describe(path)}")

        session = PeerSession(
            endpoint=ep, signal=sc, session_id=sid, paths=pm,
            quic_config=_quic_config(False, self.identity), is_client=False,
            handler_factory=lambda eng: ServerHandler(
                eng, identity=self.identity, keys=keys, client_pub=client_pub,
                target=self.target, on_authenticated=on_auth),
            on_path=on_path,
            on_failed=lambda reason: session.close(reason),
            regather=lambda: _regather(sc, ep, self.mode),
        )
        served.session = session
        self.sessions[sid] = served
        asyncio.ensure_future(self._watch(sid, served))
        answer = {"v": 1, "fp": fp, "nonce": snonce, "cands": mine_text,
                  "mac": auth.answer_mac(self.root, nonce, snonce, fp, pub, mine_text)}
        try:
            await sc.send(sigproto.Answer(session=sid, answer=answer))
        except TunnelError:
            session.close("relay lost")

    async def _watch(self, sid: int, served: _ServedSession) -> None:
        """End a session whose QUIC never starts; log its summary when it ends."""
        session = served.session
        waited = 0.0
        while not session.closed and session.engine is None and waited < CONNECT_TIMEOUT * 2:
            await asyncio.sleep(0.5)
            waited += 0.5
        if session.engine is None:
            session.close("no QUIC from the client")
        else:
            await session.engine.terminated.wait()
        session.close()
        if self.sessions.get(sid) is served:
            del self.sessions[sid]
        if self.signal is not None and self.signal.connected and not served.relay_closed:
            with contextlib.suppress(TunnelError):
                await self.signal.send(sigproto.Close(session=sid, reason="ended"))
        if served.client_fp:
            eng = session.engine
            h = session.handler
            self.emit(
                f"client {served.client_fp[:16]} disconnected after "
                f"{time.monotonic() - served.started:.1f} s, "
                f"{getattr(h, 'connections', 0)} connections, "
                f"{eng.bytes_in if eng else 0} bytes in, {eng.bytes_out if eng else 0} out"
            )


