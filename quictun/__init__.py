"""quictun: connect two machines behind NATs with QUIC over a punched UDP path.

The library API is :func:`connect` (a :class:`Tunnel` to a served port) and :func:`serve`;
their tunables are :class:`TunnelConfig`; failures raise :mod:`quictun.errors`'
``TunnelError``. Imports are lazy so that ``quictun --help`` and ``import quictun`` stay
fast.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .version import __version__

__all__ = ["connect", "serve", "Tunnel", "TunnelConfig", "__version__"]

if TYPE_CHECKING:  # pragma: no cover
    from .aio.client import Tunnel, connect
    from .aio.server import serve
    from .config import TunnelConfig

_LAZY = {"connect": "aio.client", "Tunnel": "aio.client", "serve": "aio.server",
         "TunnelConfig": "config"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(name)
