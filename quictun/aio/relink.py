"""Keeping a session's relay link: a lost WebSocket is re-opened and the session resumed.

A NAT that forgets its mappings (a router reboot, a carrier NAT flush) breaks the relay
WebSocket as well as the direct path. The tunnel survives if its session moves to a new
relay connection: each peer gave the relay the public half of its resume key when the
session was confirmed (:func:`announce`), and signs the new connection's challenge to
move its half there (:func:`resume`; see :mod:`quictun.proto.resume`). Then QUIC flows
over the relay again, fresh candidates go to the peer in-band and the direct path is
re-punched (:meth:`~quictun.aio.session.PeerSession.relay_restored`).

:class:`ClientRelink` does this for ``connect``'s one session; ``serve`` resumes its
sessions in its own re-registration loop (:mod:`quictun.aio.server`) before it
registers its name again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable

from ..config import TunnelConfig
from ..errors import TunnelError
from ..proto import signalling as sigproto
from ..proto.resume import ResumeKey
from .relay import SignalClient

__all__ = ["ClientRelink", "announce", "new_signal_client", "resume"]

log = logging.getLogger("quictun")

RETRY_DELAYS = (0.0, 0.5, 1.0, 2.0, 3.0, 5.0)  # then every 5 s, while the window lasts


def new_signal_client(url: str, token: str | None, config: TunnelConfig) -> SignalClient:
    """A relay client with the tunnel's ping settings (how fast a dead link is seen)."""
    return SignalClient(url, token=token, ping_interval=config.relay_ping_interval,
                        ping_timeout=config.relay_ping_timeout)


async def announce(sc: SignalClient, session: int, key: ResumeKey) -> bool:
    """Give the relay our resume key for ``session`` (only to a relay that resumes
    sessions: an older one would count the message as a mistake). True if sent."""
    if sc.welcome is None or not sc.welcome.resume:
        return False
    try:
        await sc.send(sigproto.Resumable(session=session, key=key.public.hex()))
    except TunnelError:
        return False
    return True


async def resume(sc: SignalClient, session: int, key: ResumeKey, timeout: float = 10.0
                 ) -> bool | None:
    """Move our half of ``session`` to ``sc`` (opened). True once the relay said
    ``resumed``; False if it refused (it forgot the session, or cannot resume); None if
    the link failed meanwhile (another link may do)."""
    welcome = sc.welcome
    if welcome is None or not welcome.resume or welcome.challenge is None:
        return False
    sig = key.sign(bytes.fromhex(welcome.challenge), session)
    try:
        reply = await sc.request(
            sigproto.Resume(session=session, sig=sig.hex()),
            lambda m: isinstance(m, (sigproto.Resumed, sigproto.Error))
            and getattr(m, "session", None) == session, timeout=timeout)
    except TunnelError as exc:
        log.debug("resuming session %d: %s", session, exc)
        return None
    if isinstance(reply, sigproto.Error):
        log.info("the relay could not resume session %d: %s", session, reply.message)
        return False
    return True


class ClientRelink:
    """Re-opens the relay link of one client session when it is lost, and resumes the
    session on it, for as long as the relay keeps the session waiting (its
    ``welcome.resume`` seconds).

    ``install(sc)`` wires a new link's callbacks; ``restored(sc)`` runs once the session
    lives on ``sc``; ``alive()`` says whether the tunnel still wants a link.
    """

    def __init__(self, url: str, token: str | None, config: TunnelConfig, session: int,
                 key: ResumeKey, window: float, *, install: Callable[[SignalClient], None],
                 restored: Callable[[SignalClient], None],
                 alive: Callable[[], bool]) -> None:
        self.url = url
        self.token = token
        self.config = config
        self.session = session
        self.key = key
        self.window = window
        self._install = install
        self._restored = restored
        self._alive = alive
        self._task: asyncio.Task[None] | None = None
        self.resumes = 0

    def lost(self) -> None:
        """The current link is gone: start re-opening (once at a time)."""
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._relink())

    def close(self) -> None:
        if self._task is not None:
            self._task.cancel()

    async def _relink(self) -> None:
        loop = asyncio.get_running_loop()
        until = loop.time() + self.window
        attempt = 0
        while self._alive() and loop.time() < until:
            await asyncio.sleep(RETRY_DELAYS[min(attempt, len(RETRY_DELAYS) - 1)])
            attempt += 1
            sc = new_signal_client(self.url, self.token, self.config)
            try:
                await sc.open(timeout=min(5.0, max(1.0, until - loop.time())))
            except TunnelError as exc:
                log.debug("re-opening the relay link: %s", exc)
                continue
            self._install(sc)  # callbacks before the reply: relayed packets may follow it
            done = await resume(sc, self.session, self.key)
            if done and self._alive():
                self.resumes += 1
                log.info("relay link re-opened; the session resumed on it")
                self._restored(sc)
                return
            with contextlib.suppress(Exception):
                await sc.close()
            if done is False:
                break  # the relay forgot the session (or cannot resume): no retry helps
        if self._alive():
            log.warning("the relay link is gone and the session could not resume on a "
                        "new one; the tunnel goes on over its direct path while it lasts")
