"""Small programs the namespace tests run *inside* a network namespace (the test process
itself stays outside): ``target PORT`` serves hash_then_reply on 127.0.0.1:PORT until
killed; ``send PORT SIZE`` pushes SIZE random bytes through 127.0.0.1:PORT and prints one
JSON object {"expected": ..., "got": ...}."""

from __future__ import annotations

import json
import os
import socket
import sys
import threading
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parent.parent), str(Path(__file__).parent)]

from clusterkit import expected, hash_through  # noqa: E402
from helpers import hash_then_reply  # noqa: E402


def _serve_one(conn: socket.socket) -> None:
    try:
        hash_then_reply(conn)
    except OSError:
        pass
    finally:
        conn.close()


def main(argv: list[str]) -> int:
    if argv[:1] == ["target"]:
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", int(argv[1])))
        sock.listen(64)
        print("target ready", flush=True)
        while True:
            conn, _ = sock.accept()
            threading.Thread(target=_serve_one, args=(conn,), daemon=True).start()
    if argv[:1] == ["send"]:
        payload = os.urandom(int(argv[2]))
        try:
            got = hash_through(int(argv[1]), payload)
        except OSError as exc:
            got = f"error: {exc}"
        print(json.dumps({"expected": expected(payload), "got": got}), flush=True)
        return 0
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
