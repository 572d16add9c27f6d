"""The benchmark (``python -m quictun.bench``); not in the wheel.

It runs from a source checkout: the lab measurements drive ``tests/lab`` (the network
namespaces), so the checkout's root is put on ``sys.path`` when it is not there yet (a
run started from another directory).
"""

import sys
from pathlib import Path

_CHECKOUT = Path(__file__).resolve().parents[2]
if (_CHECKOUT / "tests" / "lab").is_dir() and str(_CHECKOUT) not in sys.path:
    sys.path.append(str(_CHECKOUT))
