"""Markdown tables of :mod:`quictun.bench.compare` results (one run of the harness).

Every figure is a median over the runs with its range (min–max); ratios against holesail
and against the in-memory ceiling are taken run by run (same run, same load), then
summarised the same way.
"""

from __future__ import annotations

import statistics
from typing import Any

MB = 1_000_000


def summary(values: list[Any]) -> dict[str, float] | None:
    """median, min, max and count of the values that are not None (None if none are)."""
    vals = [v for v in values if v is not None]
    if not vals:
        return None
    return {"median": round(statistics.median(vals), 3), "min": min(vals), "max": max(vals),
            "n": len(vals)}


def fmt(s: dict[str, float] | None, digits: int = 1, n: bool = False) -> str:
    """``median (min–max)``, or ``-``."""
    if s is None:
        return "-"
    med = f"{s['median']:.{digits}f}"
    if s["n"] == 1:
        return med + (" (n=1)" if n else "")
    tail = f", n={s['n']}" if n else ""
    return f"{med} ({s['min']:.{digits}f}–{s['max']:.{digits}f}{tail})"


def _series(out: dict[str, Any], key: str, get: Any) -> list[Any]:
    vals = []
    for run in out["runs"]:
        res = run["cases"].get(key)
        vals.append(get(res) if res and not res.get("error") else None)
    return vals


def _dig(*path: str) -> Any:
    def get(res: dict[str, Any]) -> Any:
        cur: Any = res
        for p in path:
            cur = cur.get(p) if isinstance(cur, dict) else None
        return cur
    return get


def case_row(out: dict[str, Any], case: dict[str, Any]) -> str:
    key = case["key"]
    runs = [r["cases"].get(key) for r in out["runs"] if key in r["cases"]]
    if not runs:
        why = ("no lab, see above" if "lab" in out["skipped"]
               else out["skipped"].get(case["tool"]) or "not run")
        return f"| {case['label']} | skipped: {why} | | | | | | |"
    errors = [r["error"] for r in runs if r.get("error")]
    paths = sorted({r.get("path") or "-" for r in runs})
    shas = sum(1 for r in runs if r.get("sha256_ok") and r.get("slow", {}).get("sha256_ok"))
    ttfb = [t for r in runs for t in r.get("ttfb_s", [])]
    rss_a = summary(_series(out, key, _dig("rss_mb", "a")))
    rss_b = summary(_series(out, key, _dig("rss_mb", "b")))
    rss = "-" if rss_a is None else f"{fmt(rss_a)} / {fmt(rss_b)}"
    cells = [case["label"], fmt(summary(_series(out, key, _dig("mb_s")))),
             "/".join(paths), fmt(summary(_series(out, key, _dig("cpu_s_per_gb", "a")))),
             fmt(summary(_series(out, key, _dig("cpu_s_per_gb", "b")))),
             fmt(summary(ttfb), 3, n=True), rss, f"{shas}/{len(runs)} ok"]
    if errors:
        cells[-1] += f"; {len(errors)} failed: `{errors[0][:160]}`"
    return "| " + " | ".join(cells) + " |"


def _ratio_series(out: dict[str, Any], num: Any, den: Any) -> list[float | None]:
    vals: list[float | None] = []
    for run in out["runs"]:
        a, b = num(run), den(run)
        vals.append(round(a / b, 2) if a and b else None)
    return vals


def _mbs(key: str) -> Any:
    def get(run: dict[str, Any]) -> Any:
        res = run["cases"].get(key) or {}
        return res.get("mb_s") if not res.get("error") else None
    return get


def _ceil(kind: str) -> Any:
    return lambda run: run["ceiling"].get(kind, {}).get("mb_s")


def targets(out: dict[str, Any]) -> list[str]:
    rows = ["| target (issue 13) | measured: median (range over runs) | target |",
            "|---|---|---|"]
    fast = "quictun-qh3"
    for key, label, goal in (("quictun-default", "quictun default / holesail, same run",
                              "none (the issue measured 0.18–0.38)"),
                             (fast, "quictun qh3 (`[fast]`) / holesail, same run", "≥ 1.0")):
        s = summary(_ratio_series(out, _mbs(key), _mbs("holesail")))
        if s:
            rows.append(f"| {label} | {fmt(s, 2)} | {goal} |")
    for key, label in (("quictun-aioquic", "aioquic"), ("quictun-default", "default")):
        s = summary(_ratio_series(out, _mbs(key), _ceil("aioquic")))
        if s:
            rows.append(f"| quictun {label} (lab) / in-memory aioquic ceiling (one core), "
                        f"same run | {fmt(s, 2)} | ≥ 1.8 |")
            break
    ttfb = [t for r in out["runs"] for t in
            (r["cases"].get("quictun-default") or {}).get("ttfb_s", [])]
    if ttfb:
        rows.append(f"| TTFB, fresh `connect --stdio`, default engine | "
                    f"{fmt(summary(ttfb), 3, n=True)} s | ≤ 0.3 s |")
    qt = [max(c["rss_mb"].values()) for r in out["runs"] for k, c in r["cases"].items()
          if k.startswith("quictun") and c.get("rss_mb")]
    if qt:
        rows.append(f"| peak RSS per end, slow reader (quictun, worst case and end) | "
                    f"{max(qt):.1f} MB | ≤ 100 MB |")
    return rows


def ceilings(out: dict[str, Any]) -> list[str]:
    rows = ["| in-memory QUIC ceiling (one process, no sockets) | MB/s: median (range) |",
            "|---|---|"]
    for kind in ("aioquic", "flowcontrolled", "qh3"):
        vals = [r["ceiling"].get(kind, {}) for r in out["runs"]]
        skipped = next((v.get("skipped") for v in vals if v.get("skipped")), None)
        s = summary([v.get("mb_s") for v in vals if v.get("sha256_ok")])
        label = {"flowcontrolled": "aioquic + quictun's flow control"}.get(kind, kind)
        rows.append(f"| {label} | {fmt(s) if s else skipped or 'failed'} |")
    return rows


def _outside(m: dict[str, Any]) -> str:
    o = m.get("outside")
    if not o:
        return "n/a"
    if not o["packets"]:
        return "0 (nftables guard in every namespace)"
    return f"{o['packets']}, dropped by the guard (to {o['addresses']})"


def render(out: dict[str, Any]) -> str:
    m = out["meta"]
    load = "; ".join(f"run {i}: {r['background_busy']:.0%} of the CPUs busy with other "
                     f"work before it, {r['machine_busy']:.0%} during it, load average "
                     f"{r['loadavg_before']:.1f}→{r['loadavg_after']:.1f}"
                     for i, r in enumerate(out["runs"], 1))
    v = m.get("versions", {})
    tools = ", ".join(f"{k} {val}" for k, val in v.items() if val)
    lines = [f"Measured {m['date']} with `{m['command']}` ("
             f"{'as root' if m.get('root') else 'not as root'}; "
             f"{m.get('seconds', 0):.0f} s wall) at commit `{m['commit']}`"
             f"{' plus uncommitted changes' if m['dirty'] else ''}; kernel {m['kernel']}, "
             f"Python {m['python']}, {m['cpus']} CPUs shared with other workers; "
             f"{m['runs']} runs, {m['size'] / MB:g} MB per throughput push, "
             f"{m['slow'] / MB:g} MB into the slow reader. Machine: {load}. "
             f"Packets to addresses outside the lab: {_outside(m)}. Versions: {tools}.", ""]
    for what, why in out["skipped"].items():
        lines.append(f"- {what} skipped: {why}")
    if out["skipped"]:
        lines.append("")
    lines += ["| case | MB/s | path (nft counters) | CPU s/GB, A (service) "
              "| CPU s/GB, B (user) | TTFB s | peak RSS MB A / B (slow reader) | SHA-256 |",
              "|---|---|---|---|---|---|---|---|"]
    lines += [case_row(out, c) for c in out["cases"]]
    lines += ["", *ceilings(out), "", *targets(out)]
    return "\n".join(lines)
