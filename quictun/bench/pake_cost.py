"""What protocol 2's cryptography costs on this machine (python -m quictun.bench.pake_cost).

Prints the median of N runs, in milliseconds, for each step of one exchange as the two
peers run it (quictun.proto.pake + offer), the stock spake2 library's full exchange,
and protocol 1's scrypt root key for comparison. Not a test: nothing is asserted.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import statistics
import time
from collections.abc import Callable

from cryptography.hazmat.primitives.asymmetric import ed25519
from spake2 import SPAKE2_A, SPAKE2_B

from quictun.proto import offer, pake

NOW = 1_750_000_000_000


def ms(f: Callable[[], object], n: int) -> float:
    runs = []
    for _ in range(n):
        t0 = time.perf_counter()
        f()
        runs.append((time.perf_counter() - t0) * 1000)
    return statistics.median(runs)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("-n", type=int, default=50)
    n = ap.parse_args().n
    secret = "a" * 43
    pc = pake.prepare(secret, "home", "connect", "client")
    ps = pake.prepare(secret, "home", "connect", "server")
    box_priv, box_pub = pake.box_keypair(os.urandom(32))
    ident = ed25519.Ed25519PrivateKey.generate()
    cands = ("host 192.168.1.20 40001", "srflx 198.51.100.7 40001")

    def client_offer() -> tuple[pake.Started, bytes]:
        c = pake.start(pc, os.urandom(64))
        return c, pake.seal_hint(box_public=box_pub, name="home", message=c.message,
                                 identity=ident, ts_ms=NOW, rand=os.urandom(32))

    def server_answer(msg: bytes, hint: bytes) -> tuple[pake.SessionKeys, bytes, bytes]:
        pake.open_hint(box_private=box_priv, name="home", message=msg, hint=hint)
        s = pake.start(ps, os.urandom(64))
        ks = pake.finish(s, msg, hint)
        box = ks.seal(0, offer.encode_payload(offer.ServerHello("ab" * 32, cands, NOW)))
        return ks, s.message, box

    def client_finish(c: pake.Started, hint: bytes, msg: bytes, box: bytes) -> bytes:
        kc = pake.finish(c, msg, hint)
        offer.decode_payload(kc.open(0, box), offer.ServerHello)
        return kc.seal(0, offer.encode_payload(offer.ClientHello(bytes(32), cands, NOW)))

    c, hint = client_offer()
    ks, smsg, sbox = server_answer(c.message, hint)
    cbox = client_finish(c, hint, smsg, sbox)

    def whole() -> None:
        c, hint = client_offer()
        ks, smsg, sbox = server_answer(c.message, hint)
        ks.open(0, client_finish(c, hint, smsg, sbox))

    def stock() -> None:
        a, b = SPAKE2_A(b"pw"), SPAKE2_B(b"pw")
        ma, mb = a.start(), b.start()
        a.finish(mb), b.finish(ma)

    rows = [
        ("prepare (once per process and secret)", ms(lambda: pake.prepare(
            secret, "home", "connect", "server"), n)),
        ("client: start + hint (before connect)", ms(client_offer, n)),
        ("server: hint + start + finish + box 0", ms(lambda: server_answer(c.message, hint), n)),
        ("client: finish + open + box 0", ms(lambda: client_finish(c, hint, smsg, sbox), n)),
        ("server: open client box 0", ms(lambda: ks.open(0, cbox), n)),
        ("one whole exchange, both sides, one core", ms(whole, n)),
        ("stock spake2 exchange, both sides (no caching)", ms(stock, n)),
        ("protocol 1: scrypt root key (N=2^14, r=8)", ms(lambda: hashlib.scrypt(
            secret.encode(), salt=b"quictun/v1|home", n=1 << 14, r=8, p=1,
            maxmem=64 << 20, dklen=32), max(5, n // 5))),
    ]
    for label, value in rows:
        print(f"{label:<50} {value:7.2f} ms")


if __name__ == "__main__":
    main()
