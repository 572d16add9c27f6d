"""Measure the forwarding modes: ``python -m quictun.bench.forwarding [--lab] [--json P]``.

On loopback (real relay, ``serve`` and ``connect`` processes): UDP echoed through the
tunnel at several offered rates (what arrives, and the echoed payload rate), and the
setup time of a connection through the SOCKS5 entry (TCP connect to the proxy, greeting,
CONNECT, the serving side's verdict, the target's first byte) beside the same through a
plain ``--listen`` port. With ``--lab`` (root, nft): the UDP rates between two lab
namespaces, direct across two NATs, and under 10 % loss.
"""

from __future__ import annotations

import argparse
import json
import socket
import statistics
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from .rig import PY, Proc, Rig

UDP_RATES = (500, 1000, 2000, 4000, 8000)
WG_SIZES = [148, 92, 32] + [1312] * 7  # WireGuard's messages with MTU 1280


def _udp_echo() -> tuple[socket.socket, int]:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("127.0.0.1", 0))

    def loop() -> None:
        while True:
            try:
                data, addr = s.recvfrom(65535)
                s.sendto(data, addr)
            except OSError:
                return

    threading.Thread(target=loop, daemon=True).start()
    return s, s.getsockname()[1]


def _greeter() -> tuple[socket.socket, int]:
    srv = socket.socket()
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind(("127.0.0.1", 0))
    srv.listen(128)

    def loop() -> None:
        while True:
            try:
                c, _ = srv.accept()
            except OSError:
                return
            c.sendall(b"hi")
            c.close()

    threading.Thread(target=loop, daemon=True).start()
    return srv, srv.getsockname()[1]


def udp_run(port: int, count: int, rate: float, sizes: list[int], work: Path) -> dict[str, Any]:
    """Run the lab's UDP client (tests/lab/test_lab_udp.py) against ``port`` here."""
    from tests.lab.test_lab_udp import UDP_CLIENT

    p = Proc([PY, "-c", UDP_CLIENT, str(port), str(count), str(rate),
              ",".join(map(str, sizes)), "2"], work / "udp-client.log")
    m = p.wait_for(r"(\{.*\})", timeout=count / rate + 60)
    p.stop()
    return json.loads(m.group(1))


def _udp_row(res: dict[str, Any], rate: float) -> dict[str, Any]:
    return {"offered_pps": rate, "sent": res["sent"], "received": res["received"],
            "arrived": round(res["received"] / res["sent"], 3),
            "echoed_mb_s": round(res["bytes"] / res["seconds"] / 1e6, 2)}


def socks_setup(socks_port: int, host: str, port: int) -> float:
    """Seconds from connect() to the target's first byte, through SOCKS5."""
    t0 = time.perf_counter()
    with socket.create_connection(("127.0.0.1", socks_port), timeout=10) as c:
        c.sendall(b"\x05\x01\x00")
        assert c.recv(2) == b"\x05\x00"
        name = host.encode()
        c.sendall(b"\x05\x01\x00\x03" + bytes([len(name)]) + name + port.to_bytes(2, "big"))
        reply = b""
        while len(reply) < 10:
            reply += c.recv(10 - len(reply))
        assert reply[1] == 0, reply
        assert c.recv(2) == b"hi"
    return time.perf_counter() - t0


def plain_setup(listen_port: int) -> float:
    t0 = time.perf_counter()
    with socket.create_connection(("127.0.0.1", listen_port), timeout=10) as c:
        assert c.recv(2) == b"hi"
    return time.perf_counter() - t0


def _ms(samples: list[float]) -> dict[str, float]:
    q = statistics.quantiles(samples, n=10)
    return {"median_ms": round(statistics.median(samples) * 1e3, 2),
            "p90_ms": round(q[-1] * 1e3, 2), "n": len(samples)}


def loopback(work: Path, samples: int) -> dict[str, Any]:
    echo, echo_port = _udp_echo()
    greeter, greet_port = _greeter()
    rig = Rig(work, {}, None)
    try:
        rig.qt(["serve", "fw", "--forward", f"dns=udp:127.0.0.1:{echo_port}",
                "--forward", f"web=127.0.0.1:{greet_port}", "--allow",
                f"localhost:{greet_port}", "--signal", rig.url], "serve", "srv"
               ).wait_for("serving")
        conn = rig.qt(["connect", "fw", "--listen", "dns=udp:127.0.0.1:0", "--listen",
                       "web=127.0.0.1:0", "--socks", "127.0.0.1:0", "--signal", rig.url],
                      "connect", "cli")
        udp_port = int(conn.wait_for(r"listening on udp:127\.0\.0\.1:(\d+)").group(1))
        web_port = int(conn.wait_for(r"listening on 127\.0\.0\.1:(\d+)").group(1))
        socks_port = int(conn.wait_for(r"proxy on 127\.0\.0\.1:(\d+)").group(1))
        udp_run(udp_port, 200, 200, WG_SIZES, work)  # warm up
        rows = [_udp_row(udp_run(udp_port, int(r * 3), r, WG_SIZES, work), r)
                for r in UDP_RATES]
        socks = [socks_setup(socks_port, "localhost", greet_port) for _ in range(samples)]
        plain = [plain_setup(web_port) for _ in range(samples)]
        return {"udp_wireguard_sized": rows, "socks5_setup": _ms(socks),
                "listen_setup": _ms(plain)}
    finally:
        rig.close()
        echo.close()
        greeter.close()


def lab(work: Path) -> dict[str, Any]:
    """The UDP rates across the lab (cone <-> cone, direct), then at 10 % loss."""
    from tests.lab.netlab import Lab, lab_available
    from tests.lab.test_lab_udp import _udp_tunnel, run_udp

    if lab_available() is not None:
        return {"skipped": lab_available()}
    labs: list[Lab] = []

    def factory(a: Any, b: Any = None, **kw: Any) -> Lab:
        made = Lab(a, b, prefix="qtl", **kw)
        labs.append(made)
        made.start()
        return made

    try:
        the_lab, _t = _udp_tunnel(factory, work)
        rows = [_udp_row(run_udp(the_lab, int(r * 3), r, WG_SIZES), r) for r in UDP_RATES]
        the_lab.set_loss(10)
        lossy = [_udp_row(run_udp(the_lab, 1500, r, [200, 600, 1200]), r) for r in (300,)]
        return {"udp_wireguard_sized": rows, "udp_10pct_loss": lossy}
    finally:
        for made in labs:
            made.close()


def table(out: dict[str, Any]) -> str:
    lines = []
    for where in ("loopback", "lab"):
        res = out.get(where) or {}
        for key in ("udp_wireguard_sized", "udp_10pct_loss"):
            for row in res.get(key, []):
                lines.append(f"{where:8} {key:20} {row['offered_pps']:>6} pps offered: "
                             f"{row['arrived']:.1%} arrived, {row['echoed_mb_s']} MB/s echoed")
    lb = out.get("loopback") or {}
    for key in ("socks5_setup", "listen_setup"):
        if key in lb:
            r = lb[key]
            lines.append(f"loopback {key:20} median {r['median_ms']} ms, p90 {r['p90_ms']} ms "
                         f"(n={r['n']})")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lab", action="store_true", help="also measure in the network lab")
    ap.add_argument("--samples", type=int, default=100)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="qtbench-fw-") as d:
        out: dict[str, Any] = {"loopback": loopback(Path(d), args.samples)}
        if args.lab:
            lab_dir = Path(d) / "lab"
            lab_dir.mkdir()
            out["lab"] = lab(lab_dir)
    print(table(out))
    if args.json:
        args.json.write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
