"""Measure push throughput and CPU per side for every pair of QUIC engines.

Not a test (pytest does not collect it). From the repository root::

    python3 -m tests.lab.measure_engines [--where loopback,lab] [--size-mb 40] [--runs 3]
                                         [--pairs aioquic:aioquic,qh3:qh3,...] [--json PATH]

A pair is ``SERVE:CONNECT`` (QUICTUN_ENGINE of each process). For each pair, one tunnel
(relay, ``quictun serve`` forwarding to a hashing TCP sink, ``quictun connect
--listen``) carries a 1 MB warm-up push, then ``--runs`` pushes of ``--size-mb`` MB
(10^6 bytes) through the listener, each SHA-256 checked (quictun.bench.rig.push_and_verify).
Reported per push: MB/s and CPU seconds (user + system) of the connect and the serve
process. ``loopback``: all processes on this host (quictun.bench.rig.Rig). ``lab`` (root and nft
needed): firewall<->firewall IPv4, the relay in the wan, serve and the sink in host A,
connect and the pusher in host B; the path is checked to be direct (nftables counters).

Progress goes to stderr, a markdown table to stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

from quictun.bench.rig import Rig, cpu_seconds, push_and_verify
from quictun.quic import engines

from .netlab import Lab, SiteSpec, lab_available, sweep_stale_namespaces
from .test_lab_tunnel import Tunnel

MB = 1_000_000
PREFIX = "qte"

# in host A: the benchmark's hashing sink; in host B: pushes through connect's listener
SINK = r"""
import sys, time
sys.path.insert(0, sys.argv[1])
from quictun.bench.rig import Target
print("sink port", Target().port, flush=True)
time.sleep(1e9)
"""
PUSH = r"""
import json, os, sys
sys.path.insert(0, sys.argv[1])
from quictun.bench.rig import push_and_verify
print(json.dumps(push_and_verify(int(sys.argv[2]), os.urandom(int(sys.argv[3])))), flush=True)
"""


def log(msg: str) -> None:
    print(f"[measure_engines] {msg}", file=sys.stderr, flush=True)


def _timed(push: Any, pids: tuple[int, int]) -> dict[str, Any]:
    """Run ``push()`` (a push_and_verify result) and add the CPU each process spent."""
    before = [cpu_seconds(p) for p in pids]
    res = dict(push())
    res["connect_cpu_s"], res["serve_cpu_s"] = (
        round(cpu_seconds(p) - b, 2) for p, b in zip(pids, before, strict=True))
    return res


def loopback(pair: tuple[str, str], size: int, runs: int) -> list[dict[str, Any]]:
    work = Path(tempfile.mkdtemp(prefix="quictun-engines-"))
    rig = Rig(work, {}, None)
    base_env = rig._env

    def env(home: str, profile: str | None = None) -> dict[str, str]:
        e = base_env(home, profile)
        e[engines.ENV] = pair[0] if home.startswith("srv") else pair[1]
        return e

    rig._env = env  # type: ignore[method-assign]
    try:
        srv = rig.serve("bench")
        cli, port = rig.listen("bench")
        payload = os.urandom(size)
        push_and_verify(port, payload[:MB])
        return [_timed(lambda: push_and_verify(port, payload), (cli.p.pid, srv.p.pid))
                for _ in range(runs)]
    finally:
        rig.close()


def lab(pair: tuple[str, str], size: int, runs: int) -> list[dict[str, Any]]:
    repo = str(Path(__file__).resolve().parents[2])
    spec = SiteSpec("firewall", ipv6=False)
    with Lab(spec, spec, prefix=PREFIX) as lb:
        t = Tunnel(lb, Path(tempfile.mkdtemp(prefix="quictun-engines-")), engines=pair)
        t.start_relay()
        sink = lb.spawn_python(lb.host_a_ns, SINK, repo, name="sink")
        port = int(sink.wait_for_line(r"sink port (\d+)", timeout=10).group(1))
        t.serve(forward=f"127.0.0.1:{port}")
        t.connect()
        t.wait_path("direct")
        listen = "7001"

        def push(n: int) -> dict[str, Any]:
            r = lb.run_python(lb.host_b_ns, PUSH, repo, listen, str(n), timeout=300,
                              check=False)
            try:
                return json.loads(r.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]
            except (ValueError, IndexError):
                return {"sha256_ok": False, "mb_s": 0.0, "error": (r.stdout + r.stderr)[-500:]}

        push(MB)
        assert t.connect_proc is not None and t.serve_proc is not None
        pids = (t.connect_proc.pid, t.serve_proc.pid)
        out = []
        for _ in range(runs):
            before = lb.direct_udp_bytes(4)
            res = _timed(lambda: push(size), pids)
            res["direct"] = lb.direct_udp_bytes(4) - before >= size
            out.append(res)
        return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python3 -m tests.lab.measure_engines",
                                 description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--where", default="loopback,lab")
    ap.add_argument("--size-mb", type=float, default=40.0)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--pairs", default=",".join(
        f"{s}:{c}" for s in engines.NAMES for c in engines.NAMES))
    ap.add_argument("--json", metavar="PATH")
    args = ap.parse_args(argv)
    pairs = [tuple(p.split(":")) for p in args.pairs.split(",")]
    have = set(engines.available())
    missing = {e for p in pairs for e in p} - have
    if missing:
        ap.error(f"engines not installed here: {sorted(missing)}")
    wheres = args.where.split(",")
    if "lab" in wheres:
        reason = lab_available()
        if reason:
            ap.error(f"network lab unavailable: {reason}")
        sweep_stale_namespaces(PREFIX)
    size = int(args.size_mb * MB)
    results = []
    for where in wheres:
        for pair in pairs:
            log(f"{where} serve={pair[0]} connect={pair[1]}")
            runs = (loopback if where == "loopback" else lab)(pair, size, args.runs)  # type: ignore[arg-type]
            for r in runs:
                log(f"  {r}")
            results.append({"where": where, "serve": pair[0], "connect": pair[1],
                            "runs": runs})
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    print(f"{args.size_mb:g} MB pushes, {args.runs} per pair; median (min-max)\n")
    print("| where | serve | connect | MB/s | CPU s connect | CPU s serve | SHA-256 |")
    print("|---|---|---|---|---|---|---|")
    for r in results:
        mbs = [x.get("mb_s", 0.0) for x in r["runs"]]
        cc = [x.get("connect_cpu_s", 0.0) for x in r["runs"]]
        sc = [x.get("serve_cpu_s", 0.0) for x in r["runs"]]
        ok = all(x.get("sha256_ok") for x in r["runs"]) and all(
            x.get("direct", True) for x in r["runs"])
        print(f"| {r['where']} | {r['serve']} | {r['connect']} | "
              f"{statistics.median(mbs):.1f} ({min(mbs):.1f}-{max(mbs):.1f}) | "
              f"{statistics.median(cc):.2f} | {statistics.median(sc):.2f} | "
              f"{'ok' if ok else 'FAILED'} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
