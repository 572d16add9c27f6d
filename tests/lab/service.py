"""The small TCP service the lab's tunnel tests and measurements forward to.

Run as a script in a host namespace (``python3 -c SERVICE PORT``). One request line:

- ``UP n``: read n bytes, answer ``<sha256> <count>``;
- ``DOWN n``: send n bytes of ``random.Random(n).randbytes(n)``;
- ``PACE n rate``: the same bytes, paced at ``rate`` bytes/s;
- ``ECHO``: echo lines until EOF;
- ``BYE``: send ``bye`` and close at once (the service hangs up first).
"""

from __future__ import annotations

SERVICE = r"""
import hashlib, random, socket, sys, threading, time
def handle(c):
    try:
        f = c.makefile("rb")
        head = f.readline().split()
        if head[0] == b"UP":
            n = left = int(head[1]); h = hashlib.sha256()
            while left:
                data = f.read1(min(left, 65536))
                if not data:
                    break
                h.update(data); left -= len(data)
            c.sendall(f"{h.hexdigest()} {n - left}\n".encode())
        elif head[0] == b"DOWN":
            c.sendall(random.Random(int(head[1])).randbytes(int(head[1])))
        elif head[0] == b"PACE":
            n, rate = int(head[1]), float(head[2])
            data = memoryview(random.Random(n).randbytes(n))
            start, sent = time.monotonic(), 0
            while sent < n:
                c.sendall(data[sent:sent + 16384]); sent = min(n, sent + 16384)
                delay = start + sent / rate - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
        elif head[0] == b"ECHO":
            while line := f.readline():
                c.sendall(line)
        elif head[0] == b"BYE":
            c.sendall(b"bye\n")
            c.close()
            return
        c.shutdown(socket.SHUT_WR)
        while c.recv(65536):
            pass
    except OSError as exc:
        print("service error", exc, flush=True)
    finally:
        c.close()
srv = socket.socket()
srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind(("127.0.0.1", int(sys.argv[1]))); srv.listen(16)
print("service listening", flush=True)
while True:
    c, _ = srv.accept()
    threading.Thread(target=handle, args=(c,), daemon=True).start()
"""
