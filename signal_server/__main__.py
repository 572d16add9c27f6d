"""``python -m signal_server``: same as the ``quictun-signal`` command."""

from __future__ import annotations

from .cli import main

main(prog_name="quictun-signal")
