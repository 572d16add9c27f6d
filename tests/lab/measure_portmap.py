"""Measure the port mapper in the network lab (not a test; pytest does not collect it).

Run from the repository root, as root::

    python3 -m tests.lab.measure_portmap [--runs N] [--json PATH]

1. Time to a mapping from a real miniupnpd (symmetric NAT router, ``portmap="allow"``) for
   each protocol alone and for the three racing: wall time from ``PortMapper.start()``
   until the first race ends, N runs each (a fresh socket and mapper per run, deleted
   after).
2. Networks where no gateway grants anything: a router without a daemon (its kernel
   answers ICMP "port unreachable"), a router that silently drops PCP/NAT-PMP/SSDP, a
   host without a default route, and a refusing miniupnpd (deny rule). For each: what
   ``start()`` costs the caller, how long the background race takes to give up, the
   event loop's worst lag meanwhile (a 5 ms ticker), and the round trip of a UDP
   datagram sent right after ``start()`` to the relay's echo server, against the same
   round trip with no mapper at all: the "first byte".

Prints a Markdown table; ``--json`` also writes the raw figures.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from typing import Any

from .netlab import Lab, SiteSpec, lab_available, sweep_stale_namespaces

PREFIX = "qtp"

RUN = r"""
import asyncio, json, socket, sys, time
from quictun.aio.portmap import PortMapper, PortmapConfig

async def one(protocols, echo):
    loop = asyncio.get_running_loop()
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("0.0.0.0", 0)); sock.setblocking(False)
    lag = [0.0]
    stop = asyncio.Event()
    async def ticker():
        while not stop.is_set():
            t = loop.time(); await asyncio.sleep(0.005)
            lag[0] = max(lag[0], loop.time() - t - 0.005)
    tick = loop.create_task(ticker())
    await asyncio.sleep(0.02)
    pm = None
    t0 = time.perf_counter()
    if protocols:
        pm = PortMapper(sock.getsockname()[1],
                        config=PortmapConfig(protocols=protocols, require_global=False))
        pm.start()
    start_cost = time.perf_counter() - t0
    # the "first byte": one datagram to the relay's echo, sent right away
    t1 = time.perf_counter()
    sock.sendto(b"first byte", (echo, 3478))
    await loop.sock_recv(sock, 2048)
    echo_rtt = time.perf_counter() - t1
    mappings = await pm.wait_first(30) if pm else []
    done = time.perf_counter() - t0
    stop.set(); await tick
    out = {"start_cost": start_cost, "echo_rtt": echo_rtt, "done": done,
           "loop_lag": lag[0], "mappings": [[m.protocol, *m.external] for m in mappings],
           "tried": pm.tried if pm else {}}
    if pm:
        await pm.close()
    sock.close()
    return out

async def main():
    protocols = tuple(p for p in sys.argv[1].split(",") if p)
    runs = int(sys.argv[2])
    for _ in range(runs):
        print(json.dumps(await one(protocols, sys.argv[3])), flush=True)

asyncio.run(main())
"""


def run_case(lab: Lab, protocols: str, runs: int) -> list[dict[str, Any]]:
    out = lab.run_python(lab.host_a_ns, RUN, protocols, str(runs), lab.relay_ip4,
                         timeout=120)
    return [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]


def ms(values: list[float]) -> str:
    if not values:
        return "-"
    med = statistics.median(values) * 1000
    return f"{med:.1f} ({min(values) * 1000:.1f}–{max(values) * 1000:.1f})"


def us(values: list[float]) -> str:
    return f"{statistics.median(values) * 1e6:.0f} µs" if values else "-"


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
    results: dict[str, list[dict[str, Any]]] = {}
    with Lab(SiteSpec("symmetric", portmap="allow"), "cone", prefix=PREFIX) as lab:
        lab.start_stun()
        for protos in ("pcp", "natpmp", "upnp", "pcp,natpmp,upnp", ""):
            print(f"mapping: {protos or 'no mapper'} ...", file=sys.stderr)
            results[f"grant/{protos or 'none'}"] = run_case(lab, protos, args.runs)
    cases = {
        "no daemon (ICMP)": (SiteSpec("symmetric"), None),
        "silent gateway": (SiteSpec("symmetric"), "silent"),
        "no default route": (SiteSpec("symmetric"), "noroute"),
        "miniupnpd deny rule": (SiteSpec("symmetric", portmap="deny"), None),
    }
    for name, (spec, tweak) in cases.items():
        print(f"nothing granted: {name} ...", file=sys.stderr)
        with Lab(spec, "cone", prefix=PREFIX) as lab:
            lab.start_stun()
            if tweak == "silent":
                lab.run(lab.router_a_ns, ["nft", "insert", "rule", "inet", "qlab_router",
                                          "input_chain", "iifname", "lan0", "udp", "dport",
                                          "{ 5351, 1900 }", "drop"], check=True)
            results[f"nothing/{name}/none"] = run_case(lab, "", args.runs)
            if tweak == "noroute":  # the echo needs a route: a host route to the relay only
                lab.run(lab.host_a_ns, ["ip", "route", "replace", f"{lab.relay_ip4}/32",
                                        "via", "198.19.1.1"], check=True)
                lab.run(lab.host_a_ns, ["ip", "route", "del", "default"], check=True)
            results[f"nothing/{name}"] = run_case(lab, "pcp,natpmp,upnp", args.runs)
    print_tables(results, args.runs)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return 0


def print_tables(results: dict[str, list[dict[str, Any]]], runs: int) -> None:
    print(f"\n### Time to a mapping (miniupnpd 2.3.1, symmetric NAT router; {runs} runs: "
          "median (min–max) ms)\n")
    print("| protocols | granted by | start() returns in | mapping after |")
    print("|---|---|---|---|")
    for key, rows in results.items():
        if not key.startswith("grant/") or key == "grant/none":
            continue
        winners = sorted({r["mappings"][0][0] for r in rows if r["mappings"]})
        print(f"| {key[6:]} | {', '.join(winners) or 'nothing'} | "
              f"{us([r['start_cost'] for r in rows])} | {ms([r['done'] for r in rows])} |")
    print(f"\n### No gateway grants anything ({runs} runs: median (min–max) ms)\n")
    print("| network | start() returns in | background race gives up after | worst loop "
          "lag | first datagram's echo RTT with mapper | without mapper |")
    print("|---|---|---|---|---|---|")
    base = results.get("grant/none", [])
    for key, rows in results.items():
        if not key.startswith("nothing/") or key.endswith("/none"):
            continue
        name = key[8:]
        without = results.get(f"{key}/none", base)
        print(f"| {name} | {us([r['start_cost'] for r in rows])} | "
              f"{ms([r['done'] for r in rows])} | {ms([r['loop_lag'] for r in rows])} | "
              f"{ms([r['echo_rtt'] for r in rows])} | "
              f"{ms([r['echo_rtt'] for r in without])} |")
    if base:
        print(f"\n(on the granting router, the echo RTT without a mapper: "
              f"{ms([r['echo_rtt'] for r in base])} ms; with the three racing: "
              f"{ms([r['echo_rtt'] for r in results['grant/pcp,natpmp,upnp']])} ms)")
    for key, rows in results.items():
        tried = {json.dumps(r["tried"], sort_keys=True) for r in rows if r["tried"]}
        if key.startswith("nothing/") and tried:
            print(f"\n{key[8:]}: {'; '.join(sorted(tried))}")


if __name__ == "__main__":
    sys.exit(main())
