"""Side by side in the lab: ``python -m quictun.bench.compare [--runs 3] [--json PATH]``.

quictun beside what a user would pick instead, in ONE run of the network lab (both sites
stateful firewalls, no NAT, IPv4; see :mod:`quictun.bench.labrig`): quictun with each QUIC
engine (and mixed pairs), ``ssh -L`` (real OpenSSH) and raw TCP as references, and
holesail 2.4.1 on a local HyperDHT (when node and npm are present). Per case and run:

* throughput: SIZE bytes pushed from host B through the tool into host A's TCP sink,
  SHA-256 checked; the lab's nftables counters (reset before the push) say which path the
  bytes took (``direct``: UDP router<->router; ``direct-tcp``; ``relayed``; ``mixed``);
* CPU seconds per GB on each side (the tool's processes only, from ``/proc``);
* time to first byte of a fresh client process (quictun: ``connect --stdio``);
* peak RSS per side while SLOW bytes go into a sink that reads at SLOW_RATE.

Also, per run, the one-core in-memory QUIC ceiling (two connections in one process, no
sockets: ``python -m quictun.bench``'s engine measurement) and the machine's load. Cases
run interleaved within a run, so drift hits all alike; medians and ranges over runs.
Needs root and nft for the lab (else only the ceiling is measured); holesail is skipped,
with one line, without node/npm. ``--lever NAME=VALUE`` starts every quictun process
through :data:`quictun.bench.rig.WRAPPER` with that patch (the levers of ``python -m
quictun.bench``).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.lab.netlab import lab_available, sweep_stale_namespaces

from . import holesail as hs
from .compare_report import render
from .labrig import REPO, CompareLab, RssSampler, classify
from .pyenv import like_a_user
from .rig import parse_levers
from .tools import Ends, start_holesail, start_quictun, start_raw, start_ssh

PY = sys.executable
MB = 1_000_000

CEILING_CODE = r"""
import json, pathlib, sys, tempfile
from quictun.bench.__main__ import _cert_files, engine_ceiling
kind, n = sys.argv[1], int(sys.argv[2])
with tempfile.TemporaryDirectory() as d:
    try:
        res = engine_ceiling(kind, n, _cert_files(pathlib.Path(d)))
    except ImportError as exc:
        res = {"skipped": f"not importable: {exc}"}
print(json.dumps(res), flush=True)
"""
CEILING_KINDS = ("aioquic", "flowcontrolled", "qh3")


@dataclass(frozen=True)
class Case:
    key: str
    label: str
    tool: str  # quictun | ssh | holesail | raw
    engine_b: str | None = None  # quictun: connect side (B); None = the default
    engine_a: str | None = None  # quictun: serve side (A)


def qh3_importable() -> bool:
    return subprocess.run([PY, "-c", "import qh3"], capture_output=True).returncode == 0


def cases(*, mixed: bool, qh3: bool, quick: bool) -> list[Case]:
    """The cases of one run, quictun first."""
    out = [Case("quictun-default", "quictun (default engine)", "quictun")]
    if not quick:
        out.append(Case("quictun-aioquic", "quictun aioquic", "quictun", "aioquic", "aioquic"))
    if qh3 and not quick:
        out.append(Case("quictun-qh3", "quictun qh3", "quictun", "qh3", "qh3"))
        if mixed:
            out += [Case("quictun-aioquic-qh3", "quictun aioquic → qh3 serve", "quictun",
                         "aioquic", "qh3"),
                    Case("quictun-qh3-aioquic", "quictun qh3 → aioquic serve", "quictun",
                         "qh3", "aioquic")]
    out += [Case("holesail", f"holesail {hs.VERSION}", "holesail"),
            Case("ssh", "ssh -L (OpenSSH)", "ssh"), Case("raw", "raw TCP", "raw")]
    return out


def start(cl: CompareLab, case: Case, tag: str) -> Ends:
    if case.tool == "quictun":
        return start_quictun(cl, tag, case.engine_b, case.engine_a)
    starters: dict[str, Callable[[CompareLab, str], Ends]] = {
        "ssh": start_ssh, "holesail": start_holesail, "raw": start_raw}
    return starters[case.tool](cl, tag)


@dataclass(frozen=True)
class Sizes:
    size: int
    slow: int
    ttfb_samples: int


def _per_gb(cpu: float, nbytes: int) -> float:
    return round(cpu / (nbytes / 1e9), 2)


def measure(cl: CompareLab, ends: Ends, sizes: Sizes) -> dict[str, Any]:
    """Warm up, slow reader (RSS), throughput (CPU, counters), TTFB samples."""
    out: dict[str, Any] = {"notes": ends.notes}
    warm = cl.client("push", ends.host, str(ends.port), str(256 * 1024), "H", timeout=120)
    if not warm.get("sha256_ok"):
        raise RuntimeError(f"warm-up push failed: {warm}")
    ends.a.refresh()
    ends.b.refresh()
    sampler = RssSampler(ends.a, ends.b)
    slow = cl.client("push", ends.host, str(ends.port), str(sizes.slow), "S")
    peak = sampler.stop()
    out["slow"] = {"seconds": round(slow.get("seconds", 0), 2),
                   "sha256_ok": bool(slow.get("sha256_ok")), "error": slow.get("error")}
    if ends.a.procs:
        out["rss_mb"] = {s: round(max(peak[s], side.hwm_kib()) / 1024, 1)
                         for s, side in (("a", ends.a), ("b", ends.b))}
    ends.a.refresh()
    ends.b.refresh()
    cl.reset_counters()
    ca, cb = ends.a.cpu(), ends.b.cpu()
    res = cl.client("push", ends.host, str(ends.port), str(sizes.size), "H")
    ca, cb = ends.a.cpu() - ca, ends.b.cpu() - cb
    counters = cl.path_counters()
    ok = bool(res.get("sha256_ok"))
    out.update(sha256_ok=ok, seconds=round(res.get("seconds", 0), 3), counters=counters,
               path=classify(counters, sizes.size), error=res.get("error") or res.get("reply"))
    out["mb_s"] = round(sizes.size / res["seconds"] / MB, 1) if ok else None
    if ends.a.procs:
        out["cpu_s_per_gb"] = {"a": _per_gb(ca, sizes.size), "b": _per_gb(cb, sizes.size)}
        out["hwm_after_mb"] = {"a": round(ends.a.hwm_kib() / 1024, 1),
                               "b": round(ends.b.hwm_kib() / 1024, 1)}
    samples = [ends.ttfb() for _ in range(sizes.ttfb_samples)]
    out["ttfb_s"] = [round(s["ttfb"], 3) if s.get("ttfb") is not None else None
                     for s in samples]
    errs = [s for s in samples if s.get("ttfb") is None]
    if errs:
        out["ttfb_error"] = str(errs[0])[:300]
    return out


def ceiling(kind: str, nbytes: int) -> dict[str, Any]:
    r = subprocess.run([PY, "-c", CEILING_CODE, kind, str(nbytes)], capture_output=True,
                       text=True, timeout=600, cwd=REPO)
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith("{")]
    if r.returncode != 0 or not lines:
        return {"error": r.stderr[-500:]}
    res: dict[str, Any] = json.loads(lines[-1])
    return res


def cpu_busy() -> tuple[int, int]:
    """(busy, total) jiffies of all CPUs, from /proc/stat."""
    with open("/proc/stat", encoding="ascii") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    idle = v[3] + (v[4] if len(v) > 4 else 0)
    return sum(v) - idle, sum(v)


def background_busy(seconds: float = 1.0) -> float:
    """Fraction of all CPUs busy over ``seconds`` while this harness runs nothing: the
    other workers' load on a shared machine."""
    b0, t0 = cpu_busy()
    time.sleep(seconds)
    b1, t1 = cpu_busy()
    return round((b1 - b0) / max(1, t1 - t0), 2)


def run_once(cl: CompareLab | None, case_list: list[Case], sizes: Sizes, index: int,
             skips: dict[str, str], log: Callable[[str], None]) -> dict[str, Any]:
    """One run: the ceiling, then every case once."""
    run: dict[str, Any] = {"loadavg_before": os.getloadavg()[0],
                           "background_busy": background_busy(), "ceiling": {}, "cases": {}}
    log(f"run {index}: other workers keep {run['background_busy']:.0%} of the CPUs busy")
    b0, t0 = cpu_busy()
    for kind in CEILING_KINDS:
        run["ceiling"][kind] = ceiling(kind, sizes.size)
        log(f"run {index}: ceiling {kind}: {run['ceiling'][kind]}")
    for case in case_list:
        if cl is None or case.key in skips or case.tool in skips:
            continue
        t = time.monotonic()
        try:
            ends = start(cl, case, f"{index}-{case.key}")
            try:
                res = measure(cl, ends, sizes)
            finally:
                ends.stop()
        except Exception as exc:  # one broken case must not lose the others
            res = {"error": f"{type(exc).__name__}: {exc}"[:1500], "sha256_ok": False}
        res["case_seconds"] = round(time.monotonic() - t, 1)
        run["cases"][case.key] = res
        log(f"run {index}: {case.key}: {res.get('mb_s')} MB/s path={res.get('path')} "
            f"sha={res.get('sha256_ok')} ttfb={res.get('ttfb_s')} rss={res.get('rss_mb')} "
            f"cpu/GB={res.get('cpu_s_per_gb')}"
            + (f" ERROR {res['error'][:300]}" if res.get("error") else ""))
    b1, t1 = cpu_busy()
    run["machine_busy"] = round((b1 - b0) / max(1, t1 - t0), 2)
    run["loadavg_after"] = os.getloadavg()[0]
    return run


def _git(*args: str) -> str:
    return subprocess.run(["git", *args], cwd=REPO, capture_output=True,
                          text=True).stdout.strip()


def _version(argv: list[str]) -> str | None:
    try:
        r = subprocess.run(argv, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    text = (r.stdout or r.stderr).strip().splitlines()
    return text[0] if text else None


def versions() -> dict[str, str | None]:
    """Versions of what is compared (None: not installed)."""
    py = "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))"
    return {"aioquic": _version([PY, "-c", py, "aioquic"]),
            "qh3": _version([PY, "-c", py, "qh3"]) if qh3_importable() else None,
            "openssh": _version(["ssh", "-V"]), "node": _version(["node", "--version"])}


def meta(argv: list[str], sizes: Sizes) -> dict[str, Any]:
    return {"date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
            "command": "python -m quictun.bench.compare"
                       + "".join(f" {shlex.quote(a)}" for a in argv),
            "commit": _git("rev-parse", "--short", "HEAD"),
            "dirty": bool(_git("status", "--porcelain", "--untracked-files=no")),
            "kernel": platform.release(), "python": platform.python_version(),
            "cpus": os.cpu_count(), "root": os.geteuid() == 0, "size": sizes.size,
            "slow": sizes.slow, "versions": versions()}


def tool_skips(opts: argparse.Namespace, case_list: list[Case], skipped: dict[str, str],
               log: Callable[[str], None]) -> Path | None:
    """Note in ``skipped`` the tools that cannot run here (one line each); install holesail
    when it is wanted and can be: its npm prefix, or None."""
    if any(c.tool == "ssh" for c in case_list) and not all(
            shutil.which(t) or os.path.exists(f"/usr/sbin/{t}") for t in ("sshd", "ssh")):
        skipped["ssh"] = "needs openssh-server and openssh-client"
        log(f"ssh skipped: {skipped['ssh']}")
    if opts.no_holesail:
        skipped["holesail"] = "--no-holesail"
        return None
    if not any(c.tool == "holesail" for c in case_list):
        return None
    prefix, why = hs.ensure_installed(Path(opts.holesail_dir) if opts.holesail_dir else None)
    if why:
        skipped["holesail"] = why
        log(f"holesail skipped: {why}")
    return prefix


def start_lab(opts: argparse.Namespace, work: Path, holesail_prefix: Path | None,
              skipped: dict[str, str], log: Callable[[str], None]) -> CompareLab | None:
    """The lab, up; or None, with the reason in ``skipped["lab"]`` (one line on stderr)."""
    cl = CompareLab(work, prefix=opts.prefix, slow_rate=opts.slow_rate_mb * MB,
                    holesail_prefix=holesail_prefix, sshd="ssh" not in skipped,
                    patch=opts.patch)
    try:
        cl.start()  # closes whatever it built when it fails
    except (RuntimeError, AssertionError, OSError, subprocess.SubprocessError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        skipped["lab"] = f"the lab did not start: {first[:300]}; only the ceiling ran"
        print(f"lab skipped: {skipped['lab']}", file=sys.stderr)
        return None
    log(f"lab up (HyperDHT {cl.bootstrap or 'not started'})")
    return cl


def run(opts: argparse.Namespace, log: Callable[[str], None]) -> dict[str, Any]:
    """Everything: the lab (when it can run), ``opts.runs`` runs, the results as a dict."""
    quick = opts.quick
    sizes = Sizes(int((opts.size_mb or (2 if quick else 40)) * MB),
                  int((opts.slow_mb or (1 if quick else 20)) * MB),
                  opts.ttfb or (1 if quick else 3))
    runs = opts.runs or (1 if quick else 3)
    qh3 = qh3_importable()
    case_list = cases(mixed=not opts.no_mixed, qh3=qh3, quick=quick)
    if opts.cases:
        wanted = set(opts.cases.split(","))
        known = {k for c in cases(mixed=True, qh3=True, quick=False) for k in (c.key, c.tool)}
        if wanted - known:
            raise SystemExit(f"compare: unknown --cases {','.join(sorted(wanted - known))}; "
                             f"choose from {','.join(sorted(known))}")
        case_list = [c for c in case_list if c.key in wanted or c.tool in wanted]
    out: dict[str, Any] = {"meta": meta(opts.argv, sizes), "skipped": {},
                           "cases": [c.__dict__ for c in case_list], "runs": []}
    out["meta"]["runs"] = runs
    out["meta"]["levers"] = opts.patch
    out["meta"]["qh3_installed"] = qh3
    reason = lab_available()
    if reason:
        out["skipped"]["lab"] = f"the lab needs root and nft: {reason}; only the ceiling ran"
        print(f"lab skipped: {out['skipped']['lab']}", file=sys.stderr)
    prefix = None
    if reason is None:
        prefix = tool_skips(opts, case_list, out["skipped"], log)
    work = Path(tempfile.mkdtemp(prefix="quictun-compare-"))
    cl = None
    try:
        if reason is None:
            sweep_stale_namespaces(opts.prefix)  # left by a killed earlier run
            cl = start_lab(opts, work, prefix, out["skipped"], log)
        for i in range(1, runs + 1):
            out["runs"].append(run_once(cl, case_list, sizes, i, out["skipped"], log))
        if cl is not None:
            out["meta"]["outside"] = cl.outside()
    finally:
        if cl is not None:
            cl.close()
        if not opts.keep_logs:
            shutil.rmtree(work, ignore_errors=True)
        else:
            log(f"logs kept in {work}")
    return out


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m quictun.bench.compare",
                                 description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, help="runs (default 3; --quick 1)")
    ap.add_argument("--size-mb", type=float, help="throughput payload (default 40)")
    ap.add_argument("--slow-mb", type=float, help="slow-reader payload (default 20)")
    ap.add_argument("--slow-rate-mb", type=float, default=4.0,
                    help="the slow reader's rate, MB/s (default 4)")
    ap.add_argument("--ttfb", type=int, help="TTFB samples per case and run (default 3)")
    ap.add_argument("--cases", help="comma separated case keys or tools (quictun, ssh, "
                    "holesail, raw, quictun-qh3, ...)")
    ap.add_argument("--lever", action="append", default=[], metavar="NAME=VALUE",
                    help="patch every quictun process, as python -m quictun.bench --lever "
                    "(fixed=1200, pmtu_max=N, offload=off, ...)")
    ap.add_argument("--no-mixed", action="store_true", help="no mixed-engine quictun pairs")
    ap.add_argument("--no-holesail", action="store_true", help="leave holesail out")
    ap.add_argument("--holesail-dir", help=f"npm prefix for holesail (default "
                    f"{hs.default_dir()})")
    ap.add_argument("--quick", action="store_true",
                    help="one run, 2 MB, default quictun only (the test)")
    ap.add_argument("--prefix", default="qtc", help="lab namespace prefix")
    ap.add_argument("--json", type=Path, help="write all results here")
    ap.add_argument("--markdown", type=Path, help="write the tables here")
    ap.add_argument("--keep-logs", action="store_true")
    ap.add_argument("-q", "--quiet", action="store_true")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    opts = parser().parse_args(args)
    opts.argv = args
    try:
        opts.patch = parse_levers(opts.lever)
    except ValueError as exc:
        raise SystemExit(f"compare: {exc}") from None
    t0 = time.monotonic()

    def log(msg: str) -> None:
        if not opts.quiet:
            print(f"[compare {time.monotonic() - t0:6.1f}s] {msg}", file=sys.stderr,
                  flush=True)

    if like_a_user():
        log("PYTHONDONTWRITEBYTECODE was set: dropped, so every process starts from cached "
            "bytecode as on a user's machine")
    out = run(opts, log)
    out["meta"]["seconds"] = round(time.monotonic() - t0, 1)
    text = render(out)
    print(text)
    if opts.json:
        opts.json.write_text(json.dumps(out, indent=2) + "\n")
    if opts.markdown:
        opts.markdown.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
