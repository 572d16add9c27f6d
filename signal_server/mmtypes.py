"""The matchmaker's vocabulary (see :mod:`signal_server.matchmaker`): what it asks the
shell to do (:class:`Send`, :class:`Disconnect`), its tunables (:class:`MatchmakerConfig`)
and its per-connection and per-session records. Plain data, no behaviour beyond
:meth:`SessionRecord.other`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["Send", "Disconnect", "Output", "MatchmakerConfig", "Bucket", "ConnRecord",
           "SessionRecord"]


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


Output = Send | Disconnect


@dataclass
class MatchmakerConfig:
    """Tunables of the matchmaker (times in seconds, rates in bytes per second)."""

    token: str | None = None
    relay_enabled: bool = True
    relay_rate: float | None = None
    relay_burst: float | None = None
    hello_timeout: float = 10.0
    connect_timeout: float = 15.0
    name_grace: float = 60.0
    max_errors: int = 10
    max_names_per_conn: int = 32
    max_pending_per_conn: int = 32
    max_data_per_session: int = 16  # `data` messages each member may send in one session
    max_sessions_per_conn: int = 256
    stun_ports: tuple[int, ...] = ()


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
    names: set[str] = field(default_factory=set)
    sessions: set[int] = field(default_factory=set)
    errors: int = 0
    relay_warned: bool = False
    last_bad_relay: int | None = None


@dataclass
class SessionRecord:
    """One connect request, from ``connect`` until closed, rejected or expired."""

    id: int
    connector: int
    owner: int
    name: str
    deadline: float
    answered: bool = False
    relayed_bytes: int = 0
    buckets: dict[int, Bucket] = field(default_factory=dict)
    data_sent: dict[int, int] = field(default_factory=dict)  # ``data`` messages, by sender

    def other(self, conn_id: int) -> int:
        return self.owner if conn_id == self.connector else self.connector
