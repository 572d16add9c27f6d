"""A port-mapping client for lab hosts: run as a script inside a host namespace.

    python3 portmap_agent.py PROTOCOLS LIFETIME EXIT_MODE

It binds a UDP socket (the "tunnel socket"), starts a PortMapper for its port and prints
one line per event on stdout:

- ``MAPPED <json>``: the first race ended; the list of mappings (maybe empty), the
  outcomes per protocol and how long start() took to return, in seconds;
- ``GOT <ip> <port> <data>``: a datagram reached the tunnel socket (answered ``reply``
  unless it was one);
- ``CHANGE <n>``: on_change fired with n mappings;
- ``CLOSED``: close() finished.

Standard input: ``send <ip> <port>`` sends ``hello`` from the tunnel socket; ``close``
runs ``await close()``; ``quit`` exits. ``EXIT_MODE`` decides what
SIGTERM does: ``async`` (the loop cancels the main task, whose ``finally`` awaits
close(): what the CLI should do), ``sync`` (a plain signal handler calls
``close_all_sync()`` and exits at once) or ``none`` (default action: the process dies).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import socket
import sys
import time

from quictun.aio import portmap


async def main(protocols: tuple[str, ...], lifetime: int, exit_mode: str) -> None:
    loop = asyncio.get_running_loop()
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("0.0.0.0", 0))
    sock.setblocking(False)

    def readable() -> None:
        data, addr = sock.recvfrom(2048)
        print("GOT", addr[0], addr[1], data.decode(errors="replace"), flush=True)
        if data != b"reply":
            sock.sendto(b"reply", addr)

    loop.add_reader(sock.fileno(), readable)
    # the lab's addresses are not global (what QUICTUN_LAB=1 will switch off in the CLI)
    cfg = portmap.PortmapConfig(protocols=protocols, lifetime=lifetime, require_global=False)
    mapper = portmap.PortMapper(sock.getsockname()[1], config=cfg,
                                on_change=lambda ms: print("CHANGE", len(ms), flush=True))
    if exit_mode == "async":
        task = asyncio.current_task()
        assert task is not None
        loop.add_signal_handler(signal.SIGTERM, task.cancel)
    elif exit_mode == "sync":
        def on_term(signum: int, frame: object) -> None:
            portmap.close_all_sync()
            os._exit(143)
        signal.signal(signal.SIGTERM, on_term)
    try:
        t0 = time.perf_counter()
        mapper.start()
        start_cost = time.perf_counter() - t0
        mappings = await mapper.wait_first(30)
        print("MAPPED", json.dumps({
            "mappings": [[m.protocol, m.external[0], m.external[1], m.lifetime]
                         for m in mappings],
            "tried": mapper.tried, "internal_port": mapper.internal_port,
            "start_cost": start_cost}), flush=True)
        stdin = asyncio.StreamReader()
        await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(stdin), sys.stdin)
        while True:
            line = (await stdin.readline()).decode()
            if line.startswith("send "):
                _, ip, port = line.split()
                sock.sendto(b"hello", (ip, int(port)))
            elif line.strip() == "close":
                await mapper.close()
                print("CLOSED", flush=True)
            elif line.strip() in ("quit", ""):
                return
    finally:
        await mapper.close()


if __name__ == "__main__":
    logging.basicConfig(level=logging.DEBUG, stream=sys.stderr,
                        format="%(relativeCreated)7.1f %(name)s %(message)s")
    asyncio.run(main(tuple(sys.argv[1].split(",")), int(sys.argv[2]), sys.argv[3]))
