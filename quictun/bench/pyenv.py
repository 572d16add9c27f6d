"""Run the benchmark's processes as a user's machine runs them: with bytecode cached.

A user's Python writes ``__pycache__`` (pip compiles installed packages; an editable
checkout compiles on first import) and starts from it. A machine with
``PYTHONDONTWRITEBYTECODE=1`` in its environment (CI images and build machines often set
it) recompiles every quictun module in every new process instead: on this project's
2-core machine that added about 80 ms to each fresh ``connect`` (0.40 s -> 0.32 s loopback
TTFB), which would be charged to quictun in a start-up or TTFB figure.
"""

from __future__ import annotations

import compileall
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def like_a_user() -> bool:
    """Drop ``PYTHONDONTWRITEBYTECODE`` from this process's environment (so the processes
    it starts inherit a normal one) and compile quictun and the relay once, now.
    Returns whether the variable was set (the report says so)."""
    was_set = os.environ.pop("PYTHONDONTWRITEBYTECODE", None) is not None
    sys.dont_write_bytecode = False
    for pkg in ("quictun", "signal_server"):
        compileall.compile_dir(REPO / pkg, quiet=1)
    return was_set
