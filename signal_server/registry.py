"""Storage for registered names, behind a small protocol so a shared backend can be added.

The registry only stores records; the ownership policy (who may claim a name, grace
periods) lives in :mod:`signal_server.matchmaker`. A record is *live* while
``conn_id`` is set, and *held* (in its grace period) while ``conn_id`` is None and
``expires`` is in the future.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

__all__ = ["NameRecord", "Registry", "InMemoryRegistry"]


@dataclass(frozen=True)
class NameRecord:
    """One name's owner and holder.

    Attributes:
        owner_hash: sha256 of the registrant's owner secret (never the secret itself).
        conn_id: the live connection holding the name, or None in the grace period.
        expires: when a released name becomes free (None while live).
    """

    owner_hash: bytes
    conn_id: int | None
    expires: float | None


class Registry(Protocol):
    """Name storage used by the matchmaker. All methods are synchronous and cheap."""

    def get(self, name: str) -> NameRecord | None:
        """Return the record for ``name`` (live, held or expired-but-not-purged)."""
        ...

    def claim(self, name: str, owner_hash: bytes, conn_id: int) -> None:
        """Make ``conn_id`` the live holder of ``name`` for ``owner_hash``."""
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

    def claim(self, name: str, owner_hash: bytes, conn_id: int) -> None:
        self._records[name] = NameRecord(owner_hash, conn_id, None)

    def release(self, name: str, expires: float | None) -> None:
        record = self._records.get(name)
        if record is None:
            return
        if expires is None:
            del self._records[name]
        else:
            self._records[name] = NameRecord(record.owner_hash, None, expires)

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
