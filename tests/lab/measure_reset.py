"""Measure a full NAT reset in the network lab: how long data stops, when it is direct again.

Not a test (pytest does not collect it). Run from the repository root, as root::

    python3 -m tests.lab.measure_reset [--runs 3] [--json PATH] [--cells NAME,...]

For every cell (see ``CELLS``) and run, in a fresh lab: relay (wan), service, ``quictun
serve`` (host A), ``quictun connect --listen`` (host B); once both ends are direct, a
transfer paced at 1 MB/s (arrival times recorded by the client); 3 s in, the router of
the reset site forgets every mapping and masquerades UDP **and TCP** onto new ports (its
relay WebSocket breaks too). Reported per run: SHA-256 intact, the data gap (the
longest stretch without bytes after the reset), when data flows again, when both ends
report ``path=direct`` again, and whether the relay link was re-opened and the session
resumed on it. Progress on stderr, the table on stdout (markdown).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from .measure import CLIENT, LISTEN_PORT, PATH_LINE, PREFIX, Rig, Watch, analyse_pace
from .netlab import Lab, SiteSpec, lab_available, sweep_stale_namespaces

MB = 1024 * 1024
PACE_RATE = 1 * MB
PACE_SIZE = 14 * MB
RESET_AT = 3.0  # seconds into the paced transfer
RANGE = (20000, 29999)

CELLS = {  # name: (site a, site b, site that resets)
    "cone-reset-serving": ("cone", "cone", "a"),
    "cone-reset-connecting": ("cone", "cone", "b"),
    "symmetric-reset-serving": ("symmetric", "cone", "a"),
    "symmetric-reset-connecting": ("cone", "symmetric", "b"),
}


def log(msg: str) -> None:
    print(f"[measure-reset {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def _state_lines(w: Watch, after: float) -> list[tuple[float, str]]:
    """(seconds since t0, "direct" | "relay" | "none" | "quiet") of an end's path lines
    and quiet spells after ``after``: an end whose remote did not move reports no new
    path line, only a quiet spell that ends ("answers again")."""
    with w._lock:
        lines = list(w.lines)
    out = []
    for t, line in lines:
        if t - w.t0 <= after:
            continue
        m = PATH_LINE.search(line)
        if m:
            out.append((t - w.t0, m.group(1)))
        elif "direct path quiet" in line:
            out.append((t - w.t0, "quiet"))
        elif "direct path answers again" in line:
            out.append((t - w.t0, "direct"))
    return out


def _direct_again(watches: list[Watch], after: float, timeout: float) -> float | None:
    """Seconds after ``after`` when every end is direct again (its latest state line
    says so); an end that noticed nothing counts as direct all along. Called after the
    transfer, when both ends have seen the reset."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        times = []
        for w in watches:
            states = _state_lines(w, after)
            if states and states[-1][1] != "direct":
                break
            times.append(states[-1][0] if states else after)
        else:
            return round(max(times) - after, 2)
        time.sleep(0.1)
    return None


def one_run(name: str, a: str, b: str, reset: str, workdir: Path) -> dict[str, Any]:
    (workdir / "logs").mkdir(parents=True)
    with Lab(SiteSpec(a, ipv6=False), SiteSpec(b, ipv6=False), prefix=PREFIX,
             logdir=str(workdir / "logs")) as lab:
        rig = Rig(lab, workdir, 4)
        t0 = time.monotonic()
        rig.start()
        serve = next(p for p in lab.processes if p.name == "serve")
        sw = Watch(serve, t0)
        conn, cw = rig.connect_listen()
        cw.t0 = t0
        try:
            ok_direct = cw.wait_path("direct", 60) and sw.wait_path("direct", 60)
            if not ok_direct:
                return {"cell": name, "error": "never direct before the reset"}
            xfer = lab.spawn_python(lab.host_b_ns, CLIENT, str(LISTEN_PORT), "pace",
                                    str(PACE_SIZE), str(PACE_RATE), name="client-pace")
            time.sleep(RESET_AT)
            lab.set_masquerade_ports(reset, *RANGE, tcp=True)
            t_flush = time.monotonic()
            lab.flush_conntrack(reset)
            after = t_flush - t0
            xfer.wait(timeout=180)
            direct = _direct_again([cw, sw], after, 60.0)
            out = xfer.output("stdout").strip().splitlines()
            res = json.loads(out[-1]) if out else {"ok": False}
            pace = analyse_pace(res, t_flush)
            stalls = pace["stalls"]
            text = serve.output() + conn.output()
            return {"cell": name, "sha_ok": bool(res.get("ok")), "bytes": res.get("bytes"),
                    "gap": max((e - max(s, 0.0) for s, e in stalls), default=0.0),
                    "data_again": pace["resume"], "direct_again": direct,
                    "resumed": ("resumed on the new relay link" in text
                                or "the session resumed on it" in text),
                    "paths_after": [p[1] for p in cw.paths() if p[0] > after][:6]}
        finally:
            cw.stop()
            sw.stop()


def _fmt(x: object) -> str:
    return "-" if x is None else f"{x:.1f}" if isinstance(x, float) else str(x)


def table(results: list[dict[str, Any]]) -> str:
    lines = ["| cell | run | SHA-256 | data gap (s) | data again (s) | direct again (s) | "
             "relay link resumed |", "|---|---|---|---|---|---|---|"]
    for i, r in enumerate(results):
        if "error" in r:
            lines.append(f"| {r['cell']} | {i % 3 + 1} | {r['error']} | | | | |")
            continue
        lines.append(f"| {r['cell']} | {r['run']} | {'ok' if r['sha_ok'] else 'LOST'} | "
                     f"{_fmt(round(r['gap'], 2))} | {_fmt(r['data_again'])} | "
                     f"{_fmt(r['direct_again'])} | {'yes' if r['resumed'] else 'no'} |")
    by_cell: dict[str, list[dict[str, Any]]] = {}
    for r in results:
        by_cell.setdefault(r["cell"], []).append(r)
    lines += ["", "| cell | intact | median data gap (s) | median direct again (s) |",
              "|---|---|---|---|"]
    for cell, rs in by_cell.items():
        gaps = [r["gap"] for r in rs if r.get("sha_ok")]
        directs = [r["direct_again"] for r in rs if r.get("direct_again") is not None]
        lines.append(f"| {cell} | {sum(bool(r.get('sha_ok')) for r in rs)}/{len(rs)} | "
                     f"{_fmt(statistics.median(gaps) if gaps else None)} | "
                     f"{_fmt(statistics.median(directs) if directs else None)} |")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--json", type=Path)
    ap.add_argument("--cells", default=",".join(CELLS))
    args = ap.parse_args()
    reason = lab_available()
    if reason:
        print(f"the lab cannot run here: {reason}", file=sys.stderr)
        return 2
    sweep_stale_namespaces(PREFIX)
    results = []
    with tempfile.TemporaryDirectory(prefix="qt-measure-reset-") as tmp:
        for name in args.cells.split(","):
            a, b, reset = CELLS[name]
            for run in range(1, args.runs + 1):
                log(f"{name}: run {run}")
                r = one_run(name, a, b, reset, Path(tmp) / f"{name}-{run}")
                r["run"] = run
                log(f"  {r}")
                results.append(r)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    print(table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
