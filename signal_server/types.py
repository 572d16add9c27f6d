"""The matchmaker's vocabulary (see :mod:`signal_server.matchmaker`): what it asks the
shell to do (:class:`Send`, :class:`Disconnect`, and in a cluster :class:`Claim`,
:class:`Release`, :class:`Lookup`, :class:`ToPeer`), the answers the shell feeds back
(:class:`ClaimResult`, :class:`Holder`, :class:`LostName`), its tunables
(:class:`MatchmakerConfig`) and its per-connection and per-session records. Plain data,
no behaviour beyond :meth:`SessionRecord.other`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

__all__ = ["Send", "Disconnect", "Claim", "Release", "Lookup", "ToPeer", "Output",
           "Effect", "ClaimResult", "Holder", "LostName", "HeldName", "UNAVAILABLE",
           "MatchmakerConfig", "Bucket", "ConnRecord", "SessionRecord", "ClusterError"]


class ClusterError(Exception):
    """A relay cannot join its cluster at start (bad Redis URL, Redis unreachable, peer
    link address unusable); the message is one line for the user, password redacted."""


@dataclass(frozen=True)
class Send:
    """Write one frame to a connection."""

    conn_id: int
    #: text (str) for a JSON message, bytes for a relayed binary frame
    data: str | bytes


@dataclass(frozen=True)
class Disconnect:
    """Close a connection; the matchmaker has already dropped its state."""

    conn_id: int
    #: WebSocket close code (1008 policy, 1002 protocol error)
    code: int
    #: short close reason, at most 120 bytes
    reason: str


# --- cluster effects: only emitted when MatchmakerConfig.instance is set -----------------


@dataclass(frozen=True)
class Claim:
    """Claim ``name`` in the shared registry for ``owner``, held by ``conn_id`` here.

    The shell must answer with :meth:`Matchmaker.claim_result` (same conn_id and name),
    and must perform claims and releases in the order they were emitted.
    """

    conn_id: int
    name: str
    #: opaque owner id: the hash of the key that signed the register (admission.owner_of)
    owner: bytes


@dataclass(frozen=True)
class Release:
    """The holder ``conn_id`` here no longer holds ``name``: keep it reserved for
    ``owner`` for ``grace`` seconds, or forget it now if ``grace`` is None. A no-op in
    the shared registry if the name is held by someone else by now. No answer."""

    conn_id: int
    name: str
    owner: bytes
    grace: float | None


@dataclass(frozen=True)
class Lookup:
    """Find the live holder of ``name`` in the shared registry for the pending local
    session ``session_id``; answer with :meth:`Matchmaker.lookup_result`."""

    session_id: int
    name: str


@dataclass(frozen=True)
class ToPeer:
    """Deliver ``data`` (a :mod:`signal_server.peerwire` message) to instance
    ``instance``. ``droppable`` frames (relayed packets) may be dropped under
    backpressure; the others must be delivered in order or the instance declared down
    (:meth:`Matchmaker.peer_down`)."""

    instance: str
    data: bytes
    droppable: bool


Output = Send | Disconnect | Claim | Release | Lookup | ToPeer
Effect = Claim | Release | Lookup | ToPeer


@dataclass(frozen=True)
class Holder:
    """Where a name is live: on instance ``instance``, held by its connection
    ``conn_id``."""

    instance: str
    conn_id: int


#: A lookup or claim that could not reach the shared registry.
UNAVAILABLE: Literal["unavailable"] = "unavailable"


@dataclass(frozen=True)
class ClaimResult:
    """The shared registry's answer to a :class:`Claim`.

    ``status`` is ``"ok"`` (the name is ours; ``previous`` is who held it live before,
    if anyone), ``"taken"`` (another owner holds or reserves it) or ``"unavailable"``
    (the shared registry could not be reached)."""

    status: Literal["ok", "taken", "unavailable"]
    previous: Holder | None = None


@dataclass(frozen=True)
class HeldName:
    """A name held live by a connection of this instance (what the shell refreshes)."""

    name: str
    owner: bytes
    conn_id: int


@dataclass(frozen=True)
class LostName:
    """A name the shared registry no longer gives to ``conn_id``: ``moved`` (the same
    owner holds it elsewhere now) or ``taken`` (another owner does, after an outage)."""

    name: str
    conn_id: int
    reason: Literal["moved", "taken"]


@dataclass
class MatchmakerConfig:
    """Tunables of the matchmaker (times in seconds, rates in bytes per second).

    ``instance`` is this relay's id in a cluster (the shell generates it); None means a
    single relay whose in-memory registry is the whole truth (no cluster effects).
    """

    token: str | None = None
    relay_enabled: bool = True
    relay_rate: float | None = None
    relay_burst: float | None = None
    hello_timeout: float = 10.0
    connect_timeout: float = 15.0
    name_grace: float = 60.0
    #: how long a session whose member's connection dropped waits for it to ``resume``
    #: (0: never; the session ends at once, as before)
    resume_window: float = 15.0
    max_errors: int = 10
    max_names_per_conn: int = 32
    max_pending_per_conn: int = 32
    max_data_per_session: int = 16  # `data` messages each member may send in one session
    max_sessions_per_conn: int = 256
    #: unanswered ``incoming`` per holder, from this instance and others alike
    max_pending_per_holder: int = 64
    #: one client mistake is forgiven every this many seconds
    error_decay: float = 60.0
    #: per client IP: connects and registrations per second (0: no limit), at most
    #: ten seconds' worth at once
    connect_rate: float = 20.0
    register_rate: float = 5.0
    #: reserved name prefixes -> the hello token a name under them needs
    name_tokens: dict[str, str] = field(default_factory=dict)
    stun_ports: tuple[int, ...] = ()
    instance: str | None = None


@dataclass
class Bucket:
    """A token bucket's state (relay rate limit, one per session and direction)."""

    tokens: float
    last: float


@dataclass
class ConnRecord:
    """What the matchmaker knows about one WebSocket connection."""

    id: int
    addr: str
    hello: bool = False
    #: may ``register`` (no relay token is configured, or hello carried the right one)
    may_register: bool = False
    #: its hello carried a reserved prefix's token, not the relay's: it may register
    #: names under that prefix only
    prefix_only: bool = False
    names: set[str] = field(default_factory=set)
    sessions: set[int] = field(default_factory=set)
    errors: int = 0
    relay_warned: bool = False
    last_bad_relay: int | None = None
    #: names whose cluster claim is in flight (cluster only)
    claiming: set[str] = field(default_factory=set)
    #: the hello's token (for reserved name prefixes) and the welcome's challenge
    token: str | None = None
    challenge: bytes = b""
    #: since when ``errors`` has been decaying (see admission.decayed_errors)
    errors_at: float = 0.0


@dataclass
class SessionRecord:
    """One connect request, from ``connect`` until closed, rejected or expired.

    ``connector`` and ``owner`` are local connection ids; in a session with a member on
    another instance (``peer`` set), that member's side is None and ``peer_sid`` is the
    session's id on that instance (None until it is known).
    """

    id: int
    connector: int | None
    owner: int | None
    name: str
    deadline: float
    answered: bool = False
    relayed_bytes: int = 0
    buckets: dict[int, Bucket] = field(default_factory=dict)
    peer: str | None = None
    peer_sid: int | None = None
    #: the connector's offer, kept while the holder is being looked up (cluster only)
    offer: dict[str, Any] | None = None
    #: ``data`` messages sent in this session, by local sender
    data_sent: dict[int, int] = field(default_factory=dict)
    #: resume keys by role ("connector", "holder"; see signal_server.resuming)
    resume_keys: dict[str, bytes] = field(default_factory=dict)
    #: roles whose connection dropped, with the time they must resume by
    away: dict[str, float] = field(default_factory=dict)

    def other(self, conn_id: int) -> int | None:
        """The other member's local connection id (None if it is on another instance)."""
        return self.owner if conn_id == self.connector else self.connector

    def local_members(self) -> list[int]:
        """The members connected to this instance (one entry for a self-session)."""
        members = [m for m in (self.connector, self.owner) if m is not None]
        return members[:1] if len(members) == 2 and members[0] == members[1] else members
