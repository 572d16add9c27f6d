"""Measure port mapping in real tunnels (not a test; pytest does not collect it).

Run from the repository root, as root::

    python3 -m tests.lab.measure_portmap_tunnel [--runs N] [--json PATH]

Every run is a fresh ``quictun connect NAME --stdio`` in host B (``serve`` already
registered in host A, both with ``QUICTUN_LAB=1``), timed from process start (see
:meth:`tests.lab.measure.Rig.ttfb`): TTFB is until an echoed line is back, "direct" until
connect's first ``path=direct`` line.

1. Time to direct, symmetric <-> symmetric, a real miniupnpd granting on both routers
   (and symmetric+mapping <-> cone): N runs.
2. The delay a fresh connect pays for port mapping where no gateway grants anything:
   TTFB with port mapping on and with ``QUICTUN_PORTMAP=0`` on both sides, N runs each
   (alternating in one lab, ``serve`` restarted with each setting),
   behind a router without a daemon (its kernel answers ICMP "port unreachable"), a
   router that silently drops PCP/NAT-PMP/SSDP, a miniupnpd with a deny rule, and one
   that grants (cone <-> cone, so the path does not depend on the mapping).

Prints Markdown tables; ``--json`` also writes the raw figures.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

from .measure import NAME, REPO, SERVICE_PORT, Rig, startup_baseline
from .netlab import Lab, LabProcess, SiteSpec, lab_available, sweep_stale_namespaces
from .service import SERVICE

PREFIX = "qtq"


class PortmapRig(Rig):
    """measure.Rig with port mapping on (the CLI's default) or off on both sides; ``serve``
    can be restarted with the other setting (runs of both settings alternate in one lab,
    so that the machine's load drifts alike for both)."""

    def __init__(self, lab: Lab, workdir: Path, *, portmap: bool) -> None:
        super().__init__(lab, workdir, 4)
        self.portmap = portmap
        self.serve_proc: LabProcess | None = None

    def env(self, site: str) -> dict[str, str]:
        env = super().env(site)
        if not self.portmap:
            env["QUICTUN_PORTMAP"] = "0"
        return env

    def connect_argv(self, *args: str, relay_after: float | None = None) -> list[str]:
        """connect with JSON log lines (their timestamps give the phases, see phases())."""
        argv = super().connect_argv(*args, relay_after=relay_after)
        return [argv[0], "--log-format", "json", *argv[1:]]

    def start_base(self) -> None:
        """Relay and service, no serve yet."""
        lab = self.lab
        relay = lab.spawn(lab.relay_ns,
                          [sys.executable, "-m", "signal_server", "--port", str(lab.relay_port),
                           "--stun-port2", str(lab.relay_port + 1)],
                          env={"PYTHONPATH": str(REPO)}, cwd=REPO, name="relay")
        svc = lab.spawn_python(lab.host_a_ns, SERVICE, str(SERVICE_PORT), name="service")
        relay.wait_for_line(r"listening", timeout=20)
        svc.wait_for_line("service listening", timeout=10)

    def restart_serve(self, portmap: bool) -> None:
        """``quictun serve`` (again) with port mapping ``portmap``."""
        if self.serve_proc is not None:
            self.serve_proc.stop(timeout=5.0)
        self.portmap = portmap
        self.serve_proc = self.lab.spawn(
            self.lab.host_a_ns, [str(self.quictun), "serve", NAME, "--forward",
                                 f"127.0.0.1:{SERVICE_PORT}", "--signal", self.signal],
            env=self.env("a"), name="serve")
        self.serve_proc.wait_for_line(r"serving", timeout=20)


def v4(kind: str, portmap: str = "none") -> SiteSpec:
    return SiteSpec(kind, ipv6=False, portmap=portmap)


def silence_gateway(lab: Lab, site: str) -> None:
    """The router drops PCP/NAT-PMP (5351) and SSDP (1900) from its LAN: no answer, no
    ICMP (a gateway that speaks none of them and filters its input)."""
    lab.run(lab.router_ns(site), ["nft", "insert", "rule", "inet", "qlab_router",
                                  "input_chain", "iifname", "lan0", "udp", "dport",
                                  "{ 5351, 1900 }", "drop"], check=True)


PHASES = {"offer": "asking the relay", "answer": "punching a path",
          "direct": "path=direct"}


def phases(proc: LabProcess) -> dict[str, float]:
    """Seconds from ``contacting the relay`` to the offer leaving, the answer arriving
    and the first direct path, from connect's JSON log lines."""
    first: dict[str, float] = {}
    for line in proc.stderr_path.read_text(errors="replace").splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        for key, prefix in {"start": "contacting the relay", **PHASES}.items():
            if rec.get("msg", "").startswith(prefix) and key not in first:
                first[key] = rec["ts"]
    if "start" not in first:
        return {}
    return {k: first[k] - first["start"] for k in PHASES if k in first}


def runs_of(a: SiteSpec, b: SiteSpec, *, runs: int, silent: bool = False,
            direct_cap: float = 0.0, settings: tuple[bool, ...] = (True,)
            ) -> dict[bool, list[dict[str, Any]]]:
    """``runs`` fresh connects per port-mapping setting, the settings alternating (and
    their order swapped every round), serve restarted with each."""
    out: dict[bool, list[dict[str, Any]]] = {on: [] for on in settings}
    with tempfile.TemporaryDirectory() as tmp, Lab(a, b, prefix=PREFIX) as lab:
        if silent:
            silence_gateway(lab, "a")
            silence_gateway(lab, "b")
        rig = PortmapRig(lab, Path(tmp), portmap=settings[0])
        rig.start_base()
        for i in range(runs):
            for on in settings if i % 2 == 0 else settings[::-1]:
                rig.restart_serve(on)
                rig.ttfb()  # warm-up (the new serve's first session): not counted
                r = rig.ttfb(direct_cap=direct_cap)
                r["phases"] = phases(lab.processes[-1])
                r.pop("error", None)
                out[on].append(r)
    print(f"  {runs} runs", file=sys.stderr)
    return out


def fmt(xs: list[float | None]) -> str:
    got = [x for x in xs if x is not None]
    if not got:
        return "-"
    return (f"{statistics.median(got):.3f} ({min(got):.3f}–{max(got):.3f})"
            + (f", {len(xs) - len(got)} none" if len(got) < len(xs) else ""))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--json", help="write the raw figures here")
    args = ap.parse_args()
    reason = lab_available()
    if reason:
        print(f"the lab cannot run here: {reason}", file=sys.stderr)
        return 2
    sweep_stale_namespaces(PREFIX)
    res: dict[str, Any] = {"startup": startup_baseline()}
    direct = {
        "symmetric+portmap <-> symmetric+portmap": (v4("symmetric", "allow"),
                                                    v4("symmetric", "allow")),
        "symmetric+portmap (serve) <-> cone": (v4("symmetric", "allow"), v4("cone")),
        "symmetric <-> symmetric, no mapping (today)": (v4("symmetric"), v4("symmetric")),
    }
    for name, (a, b) in direct.items():
        print(f"time to direct: {name} ...", file=sys.stderr)
        res[f"direct|{name}"] = runs_of(a, b, runs=args.runs, direct_cap=10.0)[True]
    nets = {
        "router without a daemon (ICMP)": (v4("cone"), False),
        "router dropping 5351/1900 (silent)": (v4("cone"), True),
        "miniupnpd, deny rule": (v4("cone", "deny"), False),
        "miniupnpd, grants": (v4("cone", "allow"), False),
    }
    for name, (spec, silent) in nets.items():
        print(f"ttfb: {name}, portmap on and off ...", file=sys.stderr)
        got = runs_of(spec, spec, runs=args.runs, silent=silent, settings=(True, False))
        res[f"ttfb|{name}|on"], res[f"ttfb|{name}|off"] = got[True], got[False]
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=2)
    print_tables(res, args.runs)
    return 0


def print_tables(res: dict[str, Any], runs: int) -> None:
    print(f"\nPython start + imports alone: {res['startup']:.3f} s\n")
    print(f"### Time to direct, fresh `connect --stdio` ({runs} runs; seconds from process "
          "start, median (min–max))\n")
    print("| pair | first path | TTFB | path=direct at | per run |")
    print("|---|---|---|---|---|")
    for key, rows in res.items():
        if not key.startswith("direct|"):
            continue
        firsts = sorted({r["first_path"] or "none" for r in rows})
        per_run = ", ".join("-" if r["direct_at"] is None else f"{r['direct_at']:.2f}"
                            for r in rows)
        print(f"| {key[7:]} | {'/'.join(firsts)} | {fmt([r['ttfb'] for r in rows])} | "
              f"{fmt([r['direct_at'] for r in rows])} | {per_run} |")
    print(f"\n### TTFB of a fresh `connect --stdio`, port mapping on vs off, cone <-> cone "
          f"({runs} runs; seconds, median (min–max))\n")
    print("| both routers | portmap on | QUICTUN_PORTMAP=0 | difference of medians |")
    print("|---|---|---|---|")
    names = list(dict.fromkeys(k.split("|")[1] for k in res if k.startswith("ttfb|")))
    for name in names:
        on = [r["ttfb"] for r in res[f"ttfb|{name}|on"]]
        off = [r["ttfb"] for r in res[f"ttfb|{name}|off"]]
        ok_on, ok_off = [x for x in on if x], [x for x in off if x]
        diff = (f"{(statistics.median(ok_on) - statistics.median(ok_off)) * 1000:+.0f} ms"
                if ok_on and ok_off else "-")
        print(f"| {name} | {fmt(on)} | {fmt(off)} | {diff} |")
    print("\n### Inside connect, from `contacting the relay` (same runs; milliseconds, median "
          "with port mapping on / off)\n")
    print("| both routers | offer sent | answer in | path=direct |")
    print("|---|---|---|---|")
    for name in names:
        cells = []
        for phase in PHASES:
            on_off = []
            for setting in ("on", "off"):
                xs = [r["phases"][phase] for r in res[f"ttfb|{name}|{setting}"]
                      if phase in r.get("phases", {})]
                on_off.append(f"{statistics.median(xs) * 1000:.1f}" if xs else "-")
            cells.append(" / ".join(on_off))
        print(f"| {name} | {' | '.join(cells)} |")


if __name__ == "__main__":
    sys.exit(main())
