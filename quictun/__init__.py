"""quictun: connect two machines behind NATs with QUIC over a punched UDP path.

Imports are lazy so that ``quictun --help`` and ``import quictun`` stay fast.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"
__all__ = ["connect", "serve", "Tunnel", "__version__"]

if TYPE_CHECKING:  # pragma: no cover
    from .aio.client import Tunnel, connect, serve


def __getattr__(name: str) -> Any:
    if name in ("connect", "serve", "Tunnel"):
        from .aio import client as api

        return getattr(api, name)
    raise AttributeError(name)
