"""The sans-I/O path manager: punching, validation, path choice (see :mod:`.manager`).

Nothing here touches a socket, a clock or a random source: the shell
(:mod:`quictun.aio.session`) feeds datagrams and the time in and sends what comes out.
"""

from .manager import MAX_CANDIDATES, MAX_PRFLX, PathManager
from .probes import MAX_TRANSACTIONS, REPLAY_WINDOW, TRANSACTION_LIFETIME
from .types import (
    RANK_HOST_IPV4,
    RANK_IPV6,
    RANK_LAN,
    RANK_PORTMAP,
    RANK_REFLEXIVE,
    RANK_RELAY,
    RELAY_PATH,
    Addr,
    Candidate,
    Event,
    GatherWanted,
    Mode,
    NetPath,
    PathChanged,
    PathConfig,
    PunchFailed,
    SuspectChanged,
    describe,
    normalize_addr,
)

__all__ = [
    "MAX_CANDIDATES", "MAX_PRFLX", "MAX_TRANSACTIONS", "RANK_HOST_IPV4", "RANK_IPV6",
    "RANK_LAN", "RANK_PORTMAP", "RANK_REFLEXIVE", "RANK_RELAY", "RELAY_PATH", "REPLAY_WINDOW",
    "TRANSACTION_LIFETIME", "Addr", "Candidate", "Event", "GatherWanted", "Mode", "NetPath",
    "PathChanged", "PathConfig", "PathManager", "PunchFailed", "SuspectChanged", "describe",
    "normalize_addr",
]
