"""The serving side: :func:`serve`, one registration on the relay and one session per client.

:class:`Server` keeps ``name`` registered (re-registering after the relay restarts or
the network blips). For each offer it runs the server's side of the SPAKE2 exchange
(:class:`~quictun.proto.exchange.ServerExchange`): version, shape, hint, freshness and
replay checks first, then one charge to the guess throttle, then the answer (sealed: our
fingerprint and candidates). Only when the client's sealed hello opens, which proves it
knows the secret, does it refund the charge, punch and accept QUIC: one
:class:`~quictun.aio.session.PeerSession` per client. An exchange that never confirms
keeps its charge (a guess).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Callable, Coroutine, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from ..config import DEFAULT_SIGNAL, TunnelConfig
from ..errors import TunnelError, printable
from ..proto import pake
from ..proto import signalling as sigproto
from ..proto.addr import Candidate, decode_candidates
from ..proto.allow import AllowError, AllowList
from ..proto.exchange import ServerExchange
from ..proto.identity import Identity, fingerprint_of_raw, raw_public
from ..proto.limits import ReplayWindow, Sighting
from ..proto.offer import E_STALE, E_VERSION, SKEW_MS, ClientHello, OfferError
from ..proto.pairing import PairingCode
from ..proto.pairing import generate as generate_code
from ..proto.resume import ResumeKey
from ..proto.services import ServiceError, services_from
from ..proto.throttle import Throttle
from ..proto.ticket import Ticket
from ..punch.types import Mode, NetPath, PathConfig, describe
from ..store import KnownClients, load_or_create
from .candidates import open_and_gather, regather, start_portmap
from .client import StatusCallback, check_mode, now_ms
from .handlers import ServerHandler
from .pairing import PairingHost
from .relay import RelayError, SignalClient
from .relink import announce, new_signal_client, resume
from .served import ServedSession, close_all, log_summary
from .session import PeerSession, load_engine, new_path_manager
from .targets import Forwarding
from .udp import UdpEndpoint

__all__ = ["Server", "serve"]

log = logging.getLogger("quictun")


@dataclass
class _Pending:
    """An answered exchange waiting for the client's sealed hello."""

    exchange: ServerExchange
    endpoint: UdpEndpoint
    mine: list[Candidate]
    throttle_key: object
    timer: asyncio.TimerHandle | None = None


class Server:
    """Serves ``target`` (its services and proxy rules) under ``name`` until cancelled;
    see :func:`serve`."""

    def __init__(
        self, name: str, target: Forwarding, *, signal: str, secret: str | bytes,
        mode: Mode, token: str | None, identity: Identity,
        on_event: StatusCallback | None, config: TunnelConfig,
        on_registered: Callable[[], None] | None = None,
        pairing: tuple[PairingCode, Ticket] | None = None,
        on_pairing: Callable[[PairingCode], None] | None = None,
        known: KnownClients | None = None,
    ) -> None:
        self.name = name
        self.on_registered = on_registered
        self.on_pairing = on_pairing
        self._announced = False  # on_pairing was called (the code in use is final)
        self.target = target
        self.url = signal
        self.mode = mode
        self.token = token
        self.identity = identity
        self.config = config
        # the secret-dependent part of SPAKE2, once (the rest takes secret-independent time)
        self._prepared = pake.prepare(secret, name, pake.KIND_CONNECT, "server")
        self._box_private, self.box_key = pake.box_keypair(identity.private_bytes())
        self.throttle = Throttle()
        # identities that proved the secret before (kept on disk when ``known`` is given)
        self.known_clients: KnownClients | set[str] = known if known is not None else set()
        self.on_event = on_event
        self.emit = on_event or (lambda s: log.info("%s", s))
        self.sessions: dict[int, ServedSession] = {}
        self._pending: dict[int, _Pending] = {}
        self._accepting: set[int] = set()
        # hints seen (their ephemeral keys): a replayed offer costs no throttle charge.
        # Full, it refuses rather than forgets.
        self._hints = ReplayWindow(2 * SKEW_MS / 1000, 65536, evict_when_full=False)
        self._tasks: set[asyncio.Task[None]] = set()
        self.signal: SignalClient | None = None
        self.registered = asyncio.Event()
        self.pairing: PairingHost | None = None
        self._taken_over: str | None = None  # the relay gave our name to a newer serve
        if pairing is not None:
            self._new_pairing(pairing[0], pairing[1])

    def _new_pairing(self, code: PairingCode, ticket: Ticket) -> None:
        self.pairing = PairingHost(code, ticket, self.identity, send=self._send_soon,
                                   emit=self.emit, paired=self._paired,
                                   timeout=self.config.connect_timeout)

    async def run(self) -> None:
        """Register and serve; re-register with backoff after the relay is lost.

        Raises :class:`TunnelError` when the first registration fails, or when the relay
        refuses the name or the token (no retry can help)."""
        delay, first, hurried = 1.0, True, False
        load_engine()  # the QUIC engine now, not while the first client waits
        try:
            while True:
                sc = new_signal_client(self.url, self.token, self.config)
                try:
                    await self._register(sc)
                except TunnelError as exc:
                    await sc.close()
                    if first or exc.permanent:
                        raise
                    self.emit(f"{exc}; retrying in {delay:.0f} s")
                else:
                    first = hurried = False
                    delay = 1.0
                    await self._serve_until_lost(sc)
                    if self._taken_over is not None:
                        raise _Permanent(f"{self._taken_over} (another `quictun serve "
                                         f"{self.name}` with this identity started); this "
                                         "one stops")
                    self.emit("lost the relay; reconnecting")
                if self.sessions and not hurried:
                    hurried = True  # live sessions wait to resume: one early try, then
                    await asyncio.sleep(0.25)  # the backoff as before (1 s, 2 s, ...)
                    continue
                await asyncio.sleep(delay)
                delay = min(delay * 2, 30.0)
        finally:
            for task in list(self._tasks):
                task.cancel()
            await close_all(self.sessions, self.signal)

    async def _register(self, sc: SignalClient) -> None:
        """Connect and register the name. Raises TunnelError (``permanent`` for a name
        held by another identity or a refused token)."""
        try:
            await sc.open()
            await self._resume_sessions(sc)  # before the name: the relay ends the others
            await self._claim(sc, self.name)
            if self.pairing is not None and self.pairing.live():
                await self._claim_pairing(sc, self.pairing)
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

    async def _claim(self, sc: SignalClient, name: str) -> None:
        await sc.request(self._register_message(sc, name),
                         lambda m: isinstance(m, sigproto.Registered) and m.name == name,
                         timeout=10)

    async def _claim_pairing(self, sc: SignalClient, host: PairingHost) -> None:
        """Register the pairing code's name. Before the code is shown, a number another
        server holds is replaced by a fresh code (up to 5 draws); after, losing it ends
        the pairing only (the code can no longer work), never the serving."""
        for _ in range(5):
            try:
                await self._claim(sc, host.name)
                return
            except RelayError as exc:
                if exc.code != sigproto.E_NAME_TAKEN:
                    raise
                if self._announced:
                    self.emit(f"the pairing code's name {host.name} was taken on the relay "
                              "meanwhile: the code no longer works (serving goes on)")
                    self.pairing = None
                    return
            self._new_pairing(generate_code(os.urandom(32)), host.ticket)
            host = self.pairing
            assert host is not None
        raise _Permanent("no free pairing number on this relay after 5 draws; try again "
                         "later")

    async def _resume_sessions(self, sc: SignalClient) -> None:
        """Move our live sessions to the new relay link ``sc`` (after a NAT reset or a
        network change broke the old one; see :mod:`quictun.aio.relink`)."""
        sc.on_relay = self._on_relay  # relayed packets may follow each ``resumed``
        sc.on_message = self._on_message
        for sid, served in list(self.sessions.items()):
            if served.resume_key is None or served.session.closed or served.relay_closed:
                continue
            if await resume(sc, sid, served.resume_key):
                log.info("session %d resumed on the new relay link", sid)
                served.session.relay_restored(sc)

    def _register_message(self, sc: SignalClient, name: str) -> sigproto.Register:
        """``register`` signed over this connection's challenge with the name's registration
        key (:meth:`Identity.registration_key`): the relay binds the name to that key, and
        a recorded message is useless on any other connection."""
        challenge = sc.welcome.challenge if sc.welcome is not None else None
        if challenge is None:
            raise _Permanent("this relay speaks the old protocol (no registration "
                             "challenge); upgrade quictun-signal there")
        key = self.identity.registration_key(name)
        sig = key.sign(sigproto.register_signed(bytes.fromhex(challenge), name))
        return sigproto.Register(name=name, key=raw_public(key).hex(), sig=sig.hex())

    async def _serve_until_lost(self, sc: SignalClient) -> None:
        self.signal = sc
        lost = asyncio.get_running_loop().create_future()
        sc.on_message = self._on_message
        sc.on_relay = self._on_relay
        sc.on_lost = lambda exc, lost=lost: lost.done() or lost.set_result(None)
        self.registered.set()
        self.emit(f"serving {self.name!r} -> {self.target.describe()} via {self.url}")
        if self.on_registered is not None:
            self.on_registered()
        if self.pairing is not None and not self._announced:
            self._announced = True
            self.pairing.arm()
            if self.on_pairing is not None:
                self.on_pairing(self.pairing.code)
        try:
            await lost
        except asyncio.CancelledError:
            await close_all(self.sessions, sc)  # stopping: tell every client while we can
            raise
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
        host = self.pairing
        if isinstance(m, sigproto.Incoming):
            if host is not None and m.name == host.name:
                host.incoming(m)
            else:
                self._spawn(self._accept(m))
        elif isinstance(m, sigproto.Data):
            if host is not None and host.owns(m.session):
                host.data(m)
            else:
                self._client_hello(m)
        elif isinstance(m, sigproto.Closed):
            if host is not None:
                host.closed(m.session)
            if m.session in self._pending:
                self._exchange_failed(
                    m.session, "the client did not confirm: a wrong secret, or it gave up")
                return
            s = self.sessions.get(m.session)
            if s is not None:
                s.relay_closed = True
            if s is not None and (s.session.driver is None or s.session.paths.current is None
                                  or s.session.paths.current.kind == "relay"):
                s.session.close("peer closed")
        elif isinstance(m, sigproto.Error):
            if m.code == sigproto.E_TAKEN_OVER and self.signal is not None:
                self._taken_over = printable(m.message)
                self.signal.on_lost(None)  # ends _serve_until_lost, which closes the link
            else:
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

    async def _check_offer(self, inc: sigproto.Incoming) -> ServerExchange | None:
        """The offer's exchange, or None after rejecting it: another version, malformed,
        stale, replayed, throttled, or no room. Nothing here costs PAKE work."""
        sid = inc.session
        try:
            ex = ServerExchange.receive(self._prepared, self._box_private, name=self.name,
                                        offer_obj=inc.offer, now_ms=now_ms())
        except OfferError as exc:
            code = {E_VERSION: sigproto.REJECT_VERSION, E_STALE: sigproto.REJECT_STALE}.get(
                exc.code, sigproto.REJECT_MALFORMED)
            self.emit(f"refused a client: {exc.message} (session {sid})")
            await self._reject(sid, exc.message, code)
            return None
        rid = ex.replay_id
        if rid is not None and self._hints.check(rid, time.monotonic()) is not Sighting.NEW:
            self.emit(f"refused a replayed offer (session {sid})")
            await self._reject(sid, "replayed offer", sigproto.REJECT_REPLAY)
            return None
        if len(self.sessions) + len(self._pending) + len(self._accepting) > \
                self.config.max_sessions:
            await self._reject(sid, "server busy", sigproto.REJECT_BUSY)
            return None
        key = ex.throttle_key(self.known_clients)
        verdict = self.throttle.admit(key, time.monotonic())
        if not verdict.admitted:
            self.emit(f"throttled guesses on {self.name!r} ({_who(key)}): {verdict.reason}")
            await self._reject(sid, verdict.reason, sigproto.REJECT_BUSY)
            return None
        return ex

    async def _accept_offer(self, inc: sigproto.Incoming) -> None:
        sc = self.signal
        if sc is None:
            return
        ex = await self._check_offer(inc)
        if ex is None:
            return
        key = ex.throttle_key(self.known_clients)
        sid = inc.session
        try:
            # no port mapping yet: a stranger's offer must not change our router's state
            ep, mine, _ = await open_and_gather(sc, self.mode, self.config.stun_wait)
        except BaseException:
            self.throttle.succeeded(key, time.monotonic())  # our failure: no guess happened
            raise
        try:
            answer = ex.answer(self.identity.fingerprint, [c.encode() for c in mine],
                               os.urandom(pake.RANDOM_SIZE), now_ms())
        except pake.PakeError as exc:  # not a group element: no guess happened
            ep.close()
            self.throttle.succeeded(key, time.monotonic())
            self.emit(f"refused a client: {exc} (session {sid})")
            await self._reject(sid, str(exc), sigproto.REJECT_MALFORMED)
            return
        pending = _Pending(ex, ep, mine, key)
        self._pending[sid] = pending
        pending.timer = asyncio.get_running_loop().call_later(
            self.config.connect_timeout, self._exchange_failed, sid, "no sealed hello")
        try:
            await sc.send(sigproto.Answer(session=sid, answer=answer))
        except TunnelError:
            self._exchange_failed(sid, "relay lost")

    def _exchange_failed(self, sid: int, why: str) -> None:
        """An answered exchange that will not confirm: it keeps its throttle charge."""
        pending = self._pending.pop(sid, None)
        if pending is None:
            return
        if pending.timer is not None:
            pending.timer.cancel()
        pending.endpoint.close()
        now = time.monotonic()
        self.throttle.failed(pending.throttle_key, now)
        failures = self.throttle.failures(pending.throttle_key, now)
        self.emit(f"failed exchange on {self.name!r} ({_who(pending.throttle_key)}, {why}; "
                  f"{failures:.0f} failures in the window)")
        self._send_soon(sigproto.Close(session=sid, reason="authentication failed"))

    def _send_soon(self, msg: sigproto.Message) -> None:
        """Send ``msg`` to the relay from synchronous code (order kept per call site)."""
        if self.signal is not None and self.signal.connected:
            self._spawn(self._send_quietly(msg))

    async def _send_quietly(self, msg: sigproto.Message) -> None:
        if self.signal is not None:
            with contextlib.suppress(TunnelError):
                await self.signal.send(msg)

    def _paired(self, client_fp: str) -> None:
        """A client paired: it is known from now on, and the code's name is released."""
        self._know(client_fp)
        if self.pairing is not None:
            self._send_soon(sigproto.Unregister(self.pairing.name))

    def _client_hello(self, m: sigproto.Data) -> None:
        """The client's sealed hello: a right guess opens it; then punch and serve."""
        pending = self._pending.get(m.session)
        if pending is None:
            return
        try:
            hello = pending.exchange.client_hello(m.data, now_ms())
        except pake.PakeError:
            self._exchange_failed(m.session, "wrong secret")
            return
        except OfferError as exc:
            self._exchange_failed(m.session, exc.message)
            return
        del self._pending[m.session]
        if pending.timer is not None:
            pending.timer.cancel()
        fp = fingerprint_of_raw(hello.public)
        known = pending.throttle_key == ("client", fp)
        self.throttle.succeeded(pending.throttle_key, time.monotonic(), reset=known)
        self._know(fp)
        self._start_session(m.session, pending, hello)

    def _know(self, fp: str) -> None:
        try:
            self.known_clients.add(fp)
        except OSError as exc:  # still known in memory; only a restart forgets it
            log.warning("cannot keep the known clients of %r: %s", self.name, exc)

    def _start_session(self, sid: int, pending: _Pending, hello: ClientHello) -> None:
        sc = self.signal
        assert sc is not None and sc.welcome is not None
        keys = pending.exchange.keys
        assert keys is not None
        ep = pending.endpoint
        pm = new_path_manager(local_key=keys.punch_to_server, remote_key=keys.punch_to_client,
                              mode=self.mode, relay_available=bool(sc.welcome.relay),
                              config=self.config)
        pm.set_local_candidates(pending.mine)
        pm.add_remote_candidates(decode_candidates(list(hello.candidates)),
                                 asyncio.get_running_loop().time())
        # the client proved the secret: ask for a mapping now (sent in-band once granted)
        mapper = start_portmap(ep, self.mode, self.config.portmap)
        served = ServedSession(session=None, started=time.monotonic())  # type: ignore[arg-type]

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
                client_pub=hello.public, target=self.target, on_authenticated=on_auth),
            on_path=on_path,
            on_failed=lambda reason: session.close(reason),
            regather=lambda: regather(session.signal or sc, ep, self.mode),
            portmap=mapper, signalled=pending.mine,
        )
        served.session = session
        self.sessions[sid] = served
        served.resume_key = ResumeKey(keys.resume_seed("server"))
        self._spawn(self._announce(sc, sid, served.resume_key))
        self._spawn(self._watch(sid, served))
        session.start()

    async def _announce(self, sc: SignalClient, sid: int, key: ResumeKey) -> None:
        await announce(sc, sid, key)

    async def _watch(self, sid: int, served: ServedSession) -> None:
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
        await session.released()
        if self.sessions.get(sid) is served:
            del self.sessions[sid]
        if self.signal is not None and self.signal.connected and not served.relay_closed:
            with contextlib.suppress(TunnelError):
                await self.signal.send(sigproto.Close(session=sid, reason="ended"))
        if served.client_fp:
            log_summary(served, self.on_event)

def _who(key: object) -> str:
    """A throttle key for a log line: a known client's short fingerprint, or strangers."""
    if isinstance(key, tuple) and key and key[0] == "client":
        return f"client {str(key[1])[:16]}"
    return "strangers"


class _Permanent(TunnelError):
    """A registration failure no retry can fix."""

    permanent = True


async def serve(
    name: str,
    *,
    forward: str | Mapping[str, str] | Iterable[str] | None = None,
    allow: Iterable[str] = (),
    signal: str = DEFAULT_SIGNAL,
    secret: str | bytes,
    mode: str = "auto",
    token: str | None = None,
    identity: Identity | None = None,
    on_event: StatusCallback | None = None,
    path_config: PathConfig | None = None,
    on_registered: Callable[[], None] | None = None,
    config: TunnelConfig | None = None,
    pairing: tuple[PairingCode, Ticket] | None = None,
    on_pairing: Callable[[PairingCode], None] | None = None,
    known: KnownClients | None = None,
) -> None:
    """Make ``forward`` reachable as ``name`` until cancelled.

    ``forward``: one target (``"127.0.0.1:22"``, the default service), a mapping of
    service names to targets (``{"ssh": "127.0.0.1:22", "wg": "udp:127.0.0.1:51820",
    "app": "unix:/run/app.sock"}``), or several ``[NAME=]TARGET`` texts (the CLI's
    ``--forward``); see :mod:`quictun.proto.services`. ``allow``: the proxy (SOCKS)
    rules, none by default, so no proxying (:mod:`quictun.proto.allow`).

    Re-registers after the relay restarts or the network blips; ``on_registered`` is
    called after each successful registration. ``config`` carries every tunable
    (``path_config``, if given, replaces its ``paths``). ``pairing``: a code and the
    ticket to hand to whoever types it (see :mod:`quictun.aio.pairing`); ``on_pairing``
    is called once with the code in use, after its name is registered: another code
    when the relay already had the one given under its number. ``known``: where to keep
    the identities of clients that proved the secret, so that a restart keeps them apart
    from guessers (the CLI keeps them in the config dir; by default, in memory).

    Raises:
        TunnelError: the first registration failed (relay unreachable, name taken by
            another identity, bad token), or a ``forward`` / ``allow`` spec is malformed,
            or there is nothing to serve.
    """
    if not sigproto.valid_name(name):
        raise TunnelError(f"{name!r} is not a valid name (1-64 of A-Z a-z 0-9 . _ -)")
    target = forwarding(forward, allow)
    checked = check_mode(mode)
    config = config or TunnelConfig()
    if path_config is not None:
        config = config.replace(paths=path_config)
    server = Server(name, target, signal=signal, secret=secret, mode=checked, token=token,
                    identity=identity or load_or_create(), on_event=on_event, config=config,
                    on_registered=on_registered, pairing=pairing, on_pairing=on_pairing,
                    known=known)
    await server.run()


def forwarding(forward: str | Mapping[str, str] | Iterable[str] | None,
               allow: Iterable[str] = ()) -> Forwarding:
    """The :class:`Forwarding` of :func:`serve`'s arguments; TunnelError (one line) for a
    malformed spec or when there is nothing to serve."""
    try:
        services = services_from(forward)
        rules = AllowList(allow)
    except (ServiceError, AllowError) as exc:
        raise TunnelError(str(exc)) from None
    if not len(services) and not rules:
        raise TunnelError("nothing to serve: give --forward [NAME=]TARGET (or --allow for "
                          "the SOCKS entry)")
    return Forwarding(services, rules)
