"""``python -m quictun``: the same as the ``quictun`` command."""

from .cli.main import main

main()
