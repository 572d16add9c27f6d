"""The benchmark (``python -m quictun.bench``); not in the wheel."""
