"""Smoke test of ``python -m quictun.bench --quick``: it runs end to end, writes a JSON
with every section, and every SHA-256 check passed. No timing assertions."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from helpers import base_env


def test_bench_quick(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    r = subprocess.run([sys.executable, "-m", "quictun.bench", "--quick", "--quiet",
                        "--json", str(out)], capture_output=True, text=True, timeout=180,
                       env=base_env(tmp_path / "home"), cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(out.read_text())
    for key in ("engine", "tunnel_direct", "tunnel_relayed", "ttfb", "latency", "rss",
                "raw_tcp", "ssh", "relay"):
        assert key in res, key
    for kind in ("flowcontrolled", "aioquic"):
        assert res["engine"][kind]["sha256_ok"]
    for key in ("tunnel_direct", "tunnel_relayed", "rss", "raw_tcp"):
        assert res[key]["sha256_ok"], key
    if "sha256_ok" in res["ssh"]:
        assert res["ssh"]["sha256_ok"]
    assert res["ttfb"]["median_s"] > 0
    assert res["latency"]["tunnel_us"] > 0
    assert "kib_per_peer" in res["relay"], res["relay"]
    assert "| measurement |" in r.stdout


def test_levers_build_the_tunnel_config(tmp_path: Path) -> None:
    """The wrapper's levers become TunnelConfig fields (the CLI is replaced by a probe)."""
    probe = r"""
import json, sys, types
from quictun.bench.rig import WRAPPER
seen = {}
fake = types.ModuleType("quictun.cli.main")
fake.main = lambda obj: seen.update(cfg=obj["config"])
sys.modules["quictun.cli.main"] = fake
exec(WRAPPER)
c = seen["cfg"]
print(json.dumps({"max": c.max_datagram, "pmtu": c.pmtu and c.pmtu.max_size,
                  "relay": c.relay_datagram_size, "offload": c.udp_offload}))
"""
    cases = [({"fixed": "1350", "offload": "off"},
              {"max": 1350, "pmtu": None, "relay": 1350, "offload": "off"}),
             ({"pmtu_max": "1472", "relay_dgram": "8000", "offload": "gso"},
              {"max": 1200, "pmtu": 1472, "relay": 8000, "offload": "gso"}),
             ({"pmtu_max": "0"}, {"max": 1200, "pmtu": None, "relay": 16380, "offload": "auto"})]
    for patch, want in cases:
        env = {**base_env(tmp_path / "home"), "QUICTUN_BENCH_PATCH": json.dumps(patch)}
        r = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                           timeout=60, env=env)
        assert r.returncode == 0, r.stderr
        assert json.loads(r.stdout) == want, patch


def test_bad_levers_are_one_line(tmp_path: Path) -> None:
    """Both benchmarks refuse a malformed or unknown lever in one line, before measuring."""
    env = base_env(tmp_path / "home")
    for argv in (["quictun.bench", "--lever", "nope=1"],
                 ["quictun.bench.compare", "--lever", "fixed"]):
        r = subprocess.run([sys.executable, "-m", *argv], capture_output=True, text=True,
                           timeout=60, env=env, cwd=tmp_path)
        assert r.returncode != 0, argv
        assert "Traceback" not in r.stderr, r.stderr
        line = [ln for ln in r.stderr.splitlines() if "bad --lever" in ln]
        assert line and "fixed" in line[0] and "offload" in line[0], r.stderr
