"""The side-by-side benchmark's harness in its quickest form (``python -m
quictun.bench.compare --quick``), so that it cannot rot: every case produces well-formed
results, every SHA-256 matches, the nftables counters show the path each tool should take,
and nothing was sent outside the lab. No timing assertions (speed is the benchmark's job).

Needs root and nft (the lab); the holesail case also needs node and npm (and the npm
registry once, for ``npm install holesail``): without them the rest still runs and the
test ends skipped, naming the reason.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import lab_skip_reason

pytestmark = pytest.mark.lab

REPO = Path(__file__).resolve().parents[2]
# what the counters must show for each tool between two stateful firewalls (no NAT)
PATHS = {"quictun-default": "direct", "holesail": "direct", "ssh": "direct-tcp",
         "raw": "direct-tcp"}


def test_compare_quick(tmp_path: Path) -> None:
    reason = lab_skip_reason()
    if reason:
        pytest.skip(f"network lab needs root and nft: {reason}")
    out = tmp_path / "compare.json"
    r = subprocess.run([sys.executable, "-m", "quictun.bench.compare", "--quick",
                        "--prefix", "qtl", "--json", str(out)], cwd=REPO,
                       capture_output=True, text=True, timeout=280)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(out.read_text())
    assert res["meta"]["outside"]["packets"] == 0, res["meta"]["outside"]
    assert len(res["runs"]) == 1
    run = res["runs"][0]
    assert run["ceiling"]["aioquic"]["sha256_ok"], run["ceiling"]
    assert run["ceiling"]["aioquic"]["mb_s"] > 0
    skipped = res["skipped"]
    for key, path in PATHS.items():
        if key == "holesail" and "holesail" in skipped:
            assert key not in run["cases"]
            continue
        case = run["cases"][key]
        assert not case.get("error"), (key, case.get("error"))
        assert case["sha256_ok"] and case["slow"]["sha256_ok"], (key, case)
        assert case["path"] == path, (key, case["counters"])
        assert case["mb_s"] > 0
        assert all(t is not None and t > 0 for t in case["ttfb_s"]), (key, case)
        if key != "raw":  # a tunnel: both ends are processes we account for
            assert set(case["cpu_s_per_gb"]) == {"a", "b"}
            assert min(case["rss_mb"].values()) > 0, (key, case["rss_mb"])
    assert "| quictun (default engine) |" in r.stdout
    assert "| in-memory QUIC ceiling" in r.stdout
    if "holesail" in skipped:
        pytest.skip(f"the rest passed; holesail case: {skipped['holesail']}")
