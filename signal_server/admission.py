"""Who may register which name, and how fast anyone may ask (pure: time passed in).

Theory of operation
-------------------
Names are bound to a key, not to a token anyone can replay:

* every ``welcome`` carries a fresh random **challenge** (per connection, from the
  randomness the shell passes in);
* ``register`` carries a raw Ed25519 public key and its signature over
  ``lp("quictun/2 register") || lp(challenge) || lp(name)``
  (:func:`quictun.proto.signalling.register_signed`). quictun's ``serve`` derives that
  key from its identity and the name (``Identity.registration_key``), so the relay
  never sees the identity that tickets pin and cannot link two names of one machine;
* the name's owner is ``SHA-256("quictun/2 key" || key)`` (:func:`owner_of`): the same
  owner can come back from any connection (a restart, another instance of a
  cluster), a recorded ``register`` is useless on any other connection, and nobody can
  take a name over without the private key. Protocol 1's owner token (a fixed
  value, replayable on ``ws://``) is refused with the message to upgrade.

An operator reserves names with **prefix tokens** (``--name-token PREFIX=FILE``): a name
that starts with PREFIX is only registered by a connection whose ``hello`` carried that
token. That is all a tokenless relay needs to keep, say, ``corp-`` for its own servers.

Rates: :class:`AddressRates` keeps one token bucket per client IP for ``connect`` and one
for ``register`` (so a flood from one address cannot crowd out everyone else), and
:func:`decayed_errors` forgives a client one mistake every ``error_decay`` seconds, so a
long-lived holder is never disconnected for mistakes spread over hours.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
from collections import OrderedDict
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING

from quictun.proto import signalling as sp
from quictun.proto.identity import verify_signature
from quictun.proto.limits import TokenBucket

from .types import Claim, ConnRecord, Release

if TYPE_CHECKING:
    from collections import deque

    from .registry import Registry
    from .types import MatchmakerConfig, Output

__all__ = ["AddressRates", "Admitting", "decayed_errors", "ip_of", "owner_of",
           "prefix_allowed"]

logger = logging.getLogger("quictun.signal")

#: The ``error unauthorized`` message for a ``register`` without the relay token.
NEED_TOKEN_MESSAGE = (
    "this relay requires a token to register a name "
    "(set QUICTUN_SIGNAL_TOKEN or pass --token)"
)
UPGRADE_REGISTER = ("registering with an owner token is refused (anyone who saw it could "
                    "replay it): upgrade quictun on the serving machine")
_CLOSE_POLICY, _CLOSE_PROTOCOL = 1008, 1002


def owner_of(key: bytes, sig: bytes, challenge: bytes, name: str) -> bytes | None:
    """The owner id of a verified ``register``, or None if the signature does not verify."""
    if len(key) != 32 or not verify_signature(key, sig, sp.register_signed(challenge, name)):
        return None
    return hashlib.sha256(b"quictun/2 key" + key).digest()


def prefix_allowed(name: str, token: str | None, prefix_tokens: Mapping[str, str]) -> bool:
    """Whether a connection whose hello carried ``token`` may register ``name`` (a name
    under a reserved prefix needs that prefix's token; constant-time comparison)."""
    for prefix, wanted in prefix_tokens.items():
        if name.startswith(prefix):
            given = (token or "").encode()
            if not hmac.compare_digest(given, wanted.encode()):
                return False
    return True


def prefix_granted(name: str, token: str | None, prefix_tokens: Mapping[str, str]) -> bool:
    """Whether ``token`` is the token of a reserved prefix ``name`` starts with (what a
    connection without the relay's own token needs to register ``name``)."""
    given = (token or "").encode()
    return any(name.startswith(prefix) and hmac.compare_digest(given, wanted.encode())
               for prefix, wanted in prefix_tokens.items())


def ip_of(addr: str) -> str:
    """The IP of an ``ip:port`` / ``[ipv6]:port`` text (the whole text if it has no port)."""
    if addr.startswith("["):
        return addr[1:].partition("]")[0]
    host, sep, port = addr.rpartition(":")
    return host if sep and port.isdigit() and ":" not in host else addr


def decayed_errors(errors: int, since: float, now: float, decay: float) -> tuple[int, float]:
    """``(errors, since)`` after forgiving one mistake for every whole ``decay`` seconds
    that passed since ``since`` (the time the count was last reduced or started)."""
    if errors <= 0 or decay <= 0 or now <= since:
        return max(0, errors), now if errors <= 0 else since
    periods = int((now - since) // decay)
    if periods <= 0:
        return errors, since
    left = max(0, errors - periods)
    return left, (since + periods * decay) if left else now


class AddressRates:
    """Per-address token buckets for one kind of request: ``rate`` per second, ten
    seconds' worth at once; ``rate`` 0 means no limit. Bounded: the least recently used
    addresses are forgotten beyond ``max_addresses``."""

    def __init__(self, rate: float, max_addresses: int = 65536) -> None:
        self.rate = rate
        self.burst = max(1.0, 10 * rate)
        self.max_addresses = max_addresses
        self._buckets: OrderedDict[str, TokenBucket] = OrderedDict()

    def allow(self, ip: str, now: float) -> bool:
        """Spend one request of ``ip``'s budget (True), or refuse it (False)."""
        if self.rate <= 0:
            return True
        bucket = self._buckets.get(ip)
        if bucket is None:
            bucket = self._buckets[ip] = TokenBucket(self.rate, self.burst)
            while len(self._buckets) > self.max_addresses:
                self._buckets.popitem(last=False)
        else:
            self._buckets.move_to_end(ip)
        return bucket.take(now)


class Admitting:
    """``hello``, ``register`` and ``unregister`` in the matchmaker (see the module
    docstring); mixed into :class:`~signal_server.matchmaker.Matchmaker`."""

    config: MatchmakerConfig
    registry: Registry
    _conns: dict[int, ConnRecord]
    _out: deque[Output]
    _random_bytes: Callable[[int], bytes]
    _register_rates: AddressRates

    if TYPE_CHECKING:
        @property
        def cluster(self) -> bool: ...
        def _send(self, conn_id: int, msg: sp.Message) -> None: ...
        def _fatal(self, conn: ConnRecord, code: str, message: str, close_code: int,
                   now: float) -> None: ...
        def _client_error(self, conn: ConnRecord, code: str, message: str, now: float, *,
                          session: int | None = None, count: bool = True) -> None: ...
        def _end_stale_holder_sessions(self, name: str, holder: int) -> None: ...

    def _handle_hello(self, conn: ConnRecord, msg: sp.Hello, now: float) -> None:
        if msg.v not in sp.SUPPORTED_VERSIONS:
            newest = max(sp.SUPPORTED_VERSIONS)
            self._fatal(conn, sp.E_UNSUPPORTED_VERSION,
                        f"relay speaks protocol version {newest}, client sent {msg.v}"
                        + ("; upgrade quictun-signal" if msg.v > newest else "; upgrade quictun"),
                        _CLOSE_PROTOCOL, now)
            return
        token = self.config.token
        if token is None:
            conn.may_register = True
        elif msg.token:  # a token was given: it must be right (constant-time compare)
            given = msg.token.encode("utf-8")
            if hmac.compare_digest(given, token.encode("utf-8")):
                conn.may_register = True
            elif any(hmac.compare_digest(given, t.encode("utf-8"))
                     for t in self.config.name_tokens.values()):
                conn.prefix_only = True  # names under its prefix, nothing else
            else:
                self._fatal(conn, sp.E_UNAUTHORIZED,
                            "wrong relay token (check QUICTUN_SIGNAL_TOKEN / --token)",
                            _CLOSE_POLICY, now)
                return
        # else: no token given; welcome it, but it may only connect, not register
        conn.hello = True
        conn.token = msg.token
        conn.challenge = self._random_bytes(32)
        self._send(conn.id, sp.Welcome(
            v=msg.v,  # the client's version: a version-1 client sees what it expects
            stun=list(self.config.stun_ports), relay=self.config.relay_enabled,
            addr=conn.addr, challenge=conn.challenge.hex() if msg.v >= 2 else None,
            resume=round(self.config.resume_window) if msg.v >= 2
            and self.config.resume_window > 0 else None))

    def _owner(self, conn: ConnRecord, msg: sp.Register, now: float) -> bytes | None:
        """The owner id a ``register`` proves, or None after the one-line error."""
        if msg.key is None or msg.sig is None:
            self._client_error(conn, sp.E_UNSUPPORTED_VERSION, UPGRADE_REGISTER, now,
                               count=False)
            return None
        owner = owner_of(bytes.fromhex(msg.key), bytes.fromhex(msg.sig), conn.challenge,
                         msg.name)
        if owner is None:
            self._client_error(conn, sp.E_UNAUTHORIZED, "the register signature does not "
                               "verify for this connection's challenge", now)
        return owner

    def _handle_register(self, conn: ConnRecord, msg: sp.Register, now: float) -> None:
        if not self._register_rates.allow(ip_of(conn.addr), now):
            self._client_error(conn, sp.E_RATE_LIMITED, "too many registrations from this "
                               "address; try again shortly", now, count=False)
            return
        if not conn.may_register and not (conn.prefix_only and prefix_granted(
                msg.name, conn.token, self.config.name_tokens)):
            self._client_error(conn, sp.E_UNAUTHORIZED, NEED_TOKEN_MESSAGE, now)
            return
        if not prefix_allowed(msg.name, conn.token, self.config.name_tokens):
            self._client_error(conn, sp.E_UNAUTHORIZED, f"the name {msg.name!r} is reserved "
                               "on this relay (it needs the token for its prefix)", now)
            return
        owner = self._owner(conn, msg, now)
        if owner is None:
            return
        record = self.registry.get(msg.name)
        if record is not None and not hmac.compare_digest(record.owner, owner):
            held = record.conn_id is not None or (
                record.expires is not None and record.expires > now)
            if held:
                self._client_error(conn, sp.E_NAME_TAKEN,
                                   f"name {msg.name!r} is registered by another owner", now,
                                   count=False)
                return
        held_or_asked = len(conn.names) + len(conn.claiming - conn.names)
        if msg.name not in conn.names and held_or_asked >= self.config.max_names_per_conn:
            self._client_error(conn, sp.E_RATE_LIMITED,
                               f"at most {self.config.max_names_per_conn} names per "
                               "connection", now)
            return
        if self.cluster:  # the shared registry decides; claim_result() finishes
            if msg.name not in conn.claiming:
                conn.claiming.add(msg.name)
                self._out.append(Claim(conn.id, msg.name, owner))
            return
        self._grant(conn, msg.name, owner)

    def _grant(self, conn: ConnRecord, name: str, owner: bytes) -> None:
        """Give ``name`` to ``conn`` locally and reply ``registered``. A name held by
        another local connection (the same identity: a second ``serve``, or a restart
        the relay has not noticed yet) moves to the newer one, and the older is told,
        so that it is never left serving a name nobody can reach."""
        record = self.registry.get(name)
        if record is not None and record.conn_id is not None and record.conn_id != conn.id:
            old = self._conns.get(record.conn_id)
            if old is not None:
                old.names.discard(name)
                logger.info("name %r taken over by conn %d from conn %d", name, conn.id, old.id)
                self._tell_taken_over(old, name)
        self.registry.claim(name, owner, conn.id)
        conn.names.add(name)
        self._end_stale_holder_sessions(name, conn.id)  # a restarted holder's old ones
        self._send(conn.id, sp.Registered(name))

    def _tell_taken_over(self, old: ConnRecord, name: str) -> None:
        """Tell a connection that lost ``name`` to a newer registration of the same owner
        (here or on another instance of a cluster), so that it never serves on silently."""
        self._send(old.id, sp.Error(sp.E_TAKEN_OVER, "another connection with the same "
                                    f"identity took over {name!r}"))

    def _handle_unregister(self, conn: ConnRecord, msg: sp.Unregister, now: float) -> None:
        if msg.name not in conn.names:
            self._client_error(conn, sp.E_NOT_REGISTERED,
                               f"name {msg.name!r} is not registered here", now)
            return
        conn.names.discard(msg.name)
        record = self.registry.get(msg.name)
        if record is not None and record.conn_id == conn.id:
            self.registry.release(msg.name, None)
            if self.cluster:
                self._out.append(Release(conn.id, msg.name, record.owner, None))
