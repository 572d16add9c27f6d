"""Who holds which name: the local table the matchmaker reads synchronously, and the
protocol of the shared registry a cluster of relays keeps in Redis.

Two layers, so that the matchmaker stays a pure state machine:

* :class:`Registry` (sync, in the matchmaker): the names held by *this* relay's
  connections, live or in their grace period. For a single relay it is the whole truth
  (:class:`InMemoryRegistry`, the default). In a cluster it is the local view: the
  matchmaker pairs with a local holder without a round trip, and the ownership policy
  (who may claim, grace periods) is enforced here for local decisions.
* :class:`SharedRegistry` (async, in the shell): the cluster's truth. The matchmaker never
  calls it; it emits :class:`~signal_server.types.Claim`,
  :class:`~signal_server.types.Release` and :class:`~signal_server.types.Lookup`
  effects, the shell performs them with a SharedRegistry (``signal_server.redis_registry``)
  and feeds the answers back.

An owner is an opaque byte string: the hash of the key that signed the name's
``register`` (:func:`signal_server.admission.owner_of`). Neither layer interprets it
beyond comparing it for equality.

A local record is *live* while ``conn_id`` is set, and *held* (in its grace period)
while ``conn_id`` is None and ``expires`` is in the future.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from .types import ClaimResult, HeldName, Holder, LostName

__all__ = ["NameRecord", "Registry", "InMemoryRegistry", "SharedRegistry"]


@dataclass(frozen=True)
class NameRecord:
    """One name's owner and holder.

    Attributes:
        owner: opaque owner id (the hash of the registering key, never the key).
        conn_id: the live connection holding the name, or None in the grace period.
        expires: when a released name becomes free (None while live).
    """

    owner: bytes
    conn_id: int | None
    expires: float | None


class Registry(Protocol):
    """Local name storage used by the matchmaker. All methods are synchronous and cheap."""

    def get(self, name: str) -> NameRecord | None:
        """Return the record for ``name`` (live, held or expired-but-not-purged)."""
        ...

    def claim(self, name: str, owner: bytes, conn_id: int) -> None:
        """Make ``conn_id`` the live holder of ``name`` for ``owner``."""
        ...

    def release(self, name: str, expires: float | None) -> None:
        """Detach the live holder: keep the owner until ``expires``, or forget the name
        now if ``expires`` is None. No-op for unknown names."""
        ...

    def purge(self, now: float) -> None:
        """Forget released names whose ``expires`` is <= ``now``."""
        ...

    def list_names(self) -> list[str]:
        """All stored names (live and held)."""
        ...


class InMemoryRegistry:
    """The default :class:`Registry`: a dict in this process."""

    def __init__(self) -> None:
        self._records: dict[str, NameRecord] = {}

    def get(self, name: str) -> NameRecord | None:
        return self._records.get(name)

    def claim(self, name: str, owner: bytes, conn_id: int) -> None:
        self._records[name] = NameRecord(owner, conn_id, None)

    def release(self, name: str, expires: float | None) -> None:
        record = self._records.get(name)
        if record is None:
            return
        if expires is None:
            del self._records[name]
        else:
            self._records[name] = NameRecord(record.owner, None, expires)

    def purge(self, now: float) -> None:
        stale = [
            n
            for n, r in self._records.items()
            if r.conn_id is None and r.expires is not None and r.expires <= now
        ]
        for n in stale:
            del self._records[n]

    def list_names(self) -> list[str]:
        return list(self._records)

    def __len__(self) -> int:
        return len(self._records)


class SharedRegistry(Protocol):
    """The cluster-wide registry, used by the shell (never by the matchmaker).

    Every method raises ``ConnectionError`` (or a subclass) when the backend cannot be
    reached; the shell turns that into an ``unavailable`` answer. Claims and releases
    for one name take effect in the order they were called.
    """

    async def claim(self, name: str, owner: bytes, conn_id: int) -> ClaimResult:
        """Atomically give ``name`` to (``owner``, this instance, ``conn_id``) unless
        another owner holds or reserves it (``taken``)."""
        ...

    async def release(self, name: str, owner: bytes, conn_id: int,
                      grace: float | None) -> None:
        """If (this instance, ``conn_id``) holds ``name``: keep it reserved for
        ``owner`` for ``grace`` seconds, or delete it (``grace`` None)."""
        ...

    async def lookup(self, name: str) -> Holder | None:
        """The live holder of ``name`` on a live instance, or None."""
        ...

    async def refresh(self, held: list[HeldName]) -> list[LostName]:
        """Extend the lease of every name in ``held`` (re-creating those the backend
        lost, e.g. after a restart) and return those now held by someone else."""
        ...
