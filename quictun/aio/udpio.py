"""The UDP socket calls of a tunnel session: fewer system calls per byte (Linux offloads).

:class:`UdpIO` wraps one non-blocking UDP socket that the event loop watches with
``add_reader`` (asyncio's datagram transport cannot pass ancillary data):

* **GSO** (``UDP_SEGMENT``, Linux >= 4.18): a run of same-sized datagrams to one address
  (the last may be shorter) leaves in one ``sendmsg`` whose ancillary data names the
  segment size; the kernel (or the NIC) cuts it into datagrams. Segments are the
  datagrams QUIC built, so they never exceed the path's proven MTU; a run is at most
  :data:`GSO_MAX_SEGMENTS` datagrams and :data:`GSO_MAX_BYTES` bytes. A kernel or device
  that refuses (``EIO``: no checksum offload; ``EINVAL``/``ENOPROTOOPT``) turns GSO off for
  this socket and the run is sent datagram by datagram.
* **GRO** (``UDP_GRO``, Linux >= 5.0): the kernel may hand over several datagrams of one
  flow as one buffer; ``recvmsg`` ancillary data gives the segment size, and
  :meth:`UdpIO.receive` splits it. Without GRO, plain ``recvfrom``.
* **Don't fragment**: ``IP_PMTUDISC_PROBE`` (and the IPv6 twin): every datagram leaves
  with DF and is never fragmented by this host, whatever ICMP taught the route cache,
  so a path MTU probe measures the path (RFC 9000 §14: QUIC sets DF) and no ICMP message
  can push quictun below 1200 bytes. A datagram larger than the interface fails at once
  with ``EMSGSIZE``, reported to ``on_too_big``.

Where a platform lacks a feature (not Linux, an old kernel, or turned off:
:attr:`quictun.config.TunnelConfig.udp_offload`, ``QUICTUN_UDP_OFFLOAD=off`` for the CLI)
the same calls work without it. :func:`route_mtu` asks the kernel for the IP MTU of the
route to an address (Linux ``IP_MTU``), the ceiling of the path MTU search.
"""

from __future__ import annotations

import errno
import logging
import socket
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass

log = logging.getLogger("quictun.udp")

__all__ = ["GSO_MAX_BYTES", "GSO_MAX_SEGMENTS", "NO_OFFLOAD", "Offload", "UdpIO", "route_mtu"]

_LINUX = sys.platform.startswith("linux")
SOL_UDP = getattr(socket, "SOL_UDP", 17)
UDP_SEGMENT = 103  # linux/udp.h; missing from the socket module on most builds
UDP_GRO = 104
_IP_MTU_DISCOVER, _IP_PMTUDISC_PROBE, _IP_MTU = 10, 3, 14  # linux/in.h
_IPV6_MTU_DISCOVER, _IPV6_PMTUDISC_PROBE, _IPV6_MTU = 23, 3, 24  # linux/in6.h
_IPV6_DONTFRAG = getattr(socket, "IPV6_DONTFRAG", 62)

GSO_MAX_SEGMENTS = 64  # UDP_MAX_SEGMENTS of older kernels (newer ones allow 128)
GSO_MAX_BYTES = 65000  # one send must fit an IP packet's 16-bit length, headers included
RECV_SIZE = 65536  # a GRO buffer or one maximal datagram
_CMSG_SPACE = socket.CMSG_SPACE(4) if hasattr(socket, "CMSG_SPACE") else 0

Deliver = Callable[[bytes, tuple], None]


@dataclass(frozen=True)
class Offload:
    """Which offloads to try on a socket (each is used only if the kernel accepts it)."""

    gso: bool = True
    gro: bool = True

    @classmethod
    def named(cls, name: str) -> Offload:
        """The offloads of a :attr:`~quictun.config.TunnelConfig.udp_offload` setting:
        ``auto`` (both), ``off``, ``gso`` or ``gro`` (only that one). Raises ValueError
        for anything else."""
        try:
            gso, gro = _NAMED[name]
        except KeyError:
            raise ValueError(f"unknown UDP offload {name!r}") from None
        return cls(gso=gso, gro=gro)


_NAMED = {"auto": (True, True), "off": (False, False), "gso": (True, False),
          "gro": (False, True)}
NO_OFFLOAD = Offload(gso=False, gro=False)


def _set(sock: socket.socket, level: int, opt: int, value: int) -> bool:
    try:
        sock.setsockopt(level, opt, value)
    except OSError:
        return False
    return True


class UdpIO:
    """Batched sends and receives on one non-blocking UDP socket (module docstring).

    Args:
        sock: a bound, non-blocking UDP socket (AF_INET, or AF_INET6 possibly dual-stack).
        offload: the offloads to try (default none, see :meth:`configure`).
        on_too_big: ``on_too_big(sockaddr, size)`` when the stack refuses a datagram of
            ``size`` bytes as too large for the route (EMSGSIZE).
    """

    def __init__(self, sock: socket.socket, offload: Offload | None = None,
                 on_too_big: Callable[[tuple, int], None] | None = None) -> None:
        self.sock = sock
        self.on_too_big = on_too_big or (lambda addr, size: None)
        v6 = sock.family == socket.AF_INET6
        self.dont_fragment = False
        if _LINUX:
            # for an IPv4 peer of a dual-stack socket the IPv4 option applies
            ok4 = _set(sock, socket.IPPROTO_IP, _IP_MTU_DISCOVER, _IP_PMTUDISC_PROBE)
            ok6 = v6 and _set(sock, socket.IPPROTO_IPV6, _IPV6_MTU_DISCOVER,
                              _IPV6_PMTUDISC_PROBE)
            if v6:
                _set(sock, socket.IPPROTO_IPV6, _IPV6_DONTFRAG, 1)
            self.dont_fragment = ok6 if v6 else ok4
        self.gso = self.gro = False
        self.configure(offload if offload is not None else NO_OFFLOAD)
        self.stats = dict.fromkeys(("send_calls", "datagrams_sent", "gso_sends",
                                    "recv_calls", "datagrams_received", "gro_buffers"), 0)

    def configure(self, offload: Offload) -> None:
        """Use the offloads of ``offload`` from now on, each only if the kernel accepts
        it (probed here; :attr:`gso` and :attr:`gro` say what is in use)."""
        sock = self.sock
        # UDP_SEGMENT 0 on the socket means "no default segmenting"; it only tests support
        self.gso = _LINUX and offload.gso and _set(sock, SOL_UDP, UDP_SEGMENT, 0)
        if _LINUX and offload.gro and _CMSG_SPACE:
            self.gro = _set(sock, SOL_UDP, UDP_GRO, 1)
        elif self.gro and _set(sock, SOL_UDP, UDP_GRO, 0):
            self.gro = False  # (if the kernel refuses, keep splitting what it coalesces)

    # -- receiving ---------------------------------------------------------------------
    def receive(self, deliver: Deliver, limit: int) -> None:
        """Read what is queued, up to ``limit`` system calls, and ``deliver(data, addr)``
        every datagram (the segments of a GRO buffer one by one, in order). Stops at the
        first would-block; other errors (ICMP errors surfacing) are skipped."""
        sock, stats = self.sock, self.stats
        gro = self.gro
        for _ in range(limit):
            try:
                if gro:
                    data, anc, _flags, addr = sock.recvmsg(RECV_SIZE, _CMSG_SPACE)
                else:
                    data, addr = sock.recvfrom(RECV_SIZE)
                    anc = None
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # ICMP errors surface here (port unreachable...)
                log.debug("udp error: %s", exc)
                continue
            stats["recv_calls"] += 1
            seg = _gro_segment(anc) if anc else 0
            if seg and len(data) > seg:
                stats["gro_buffers"] += 1
                for off in range(0, len(data), seg):
                    stats["datagrams_received"] += 1
                    deliver(data[off:off + seg], addr)
            else:
                stats["datagrams_received"] += 1
                deliver(data, addr)

    # -- sending -------------------------------------------------------------------------
    def send(self, datagrams: Sequence[bytes], addr: tuple) -> None:
        """Send ``datagrams`` in order to ``addr`` (a socket address for this socket's
        family): runs of equal size (the last of a run may be shorter) as one GSO send,
        the rest one by one. A full socket buffer drops the rest of the batch (QUIC
        recovers); EMSGSIZE goes to ``on_too_big``; nothing raises."""
        n = len(datagrams)
        if n == 1 or not self.gso:
            for data in datagrams:
                if not self._send_one(data, addr):
                    return
            return
        i = 0
        while i < n:
            size = len(datagrams[i])
            j = i + 1
            total = size
            limit = min(GSO_MAX_SEGMENTS, GSO_MAX_BYTES // max(size, 1))
            while j < n and j - i < limit and len(datagrams[j]) == size:
                total += size
                j += 1
            if j < n and j - i < limit and len(datagrams[j]) < size:
                total += len(datagrams[j])  # a shorter datagram may end a GSO run
                j += 1
            if j - i == 1:
                ok = self._send_one(datagrams[i], addr)
            else:
                ok = self._send_gso(datagrams[i:j], size, addr)
            if not ok:
                return
            i = j

    def send_one(self, data: bytes, addr: tuple) -> None:
        """Send one datagram (see :meth:`send`)."""
        self._send_one(data, addr)

    def _send_one(self, data: bytes, addr: tuple) -> bool:
        """False if the socket buffer is full (the caller drops the rest)."""
        try:
            self.sock.sendto(data, addr)
        except (BlockingIOError, InterruptedError):
            return False  # socket buffer full: dropped datagrams, QUIC recovers
        except OSError as exc:
            if exc.errno == errno.EMSGSIZE:
                self.on_too_big(addr, len(data))
            else:
                log.debug("sendto %s failed: %s", addr, exc)
            return True
        self.stats["send_calls"] += 1
        self.stats["datagrams_sent"] += 1
        return True

    def _send_gso(self, run: Sequence[bytes], size: int, addr: tuple) -> bool:
        cmsg = [(SOL_UDP, UDP_SEGMENT, size.to_bytes(2, sys.byteorder))]
        try:
            self.sock.sendmsg(run, cmsg, 0, addr)
        except (BlockingIOError, InterruptedError):
            return False
        except OSError as exc:
            if exc.errno in (errno.EIO, errno.EINVAL, errno.ENOPROTOOPT, errno.EOPNOTSUPP):
                # the device or kernel cannot segment (no checksum offload, ...): stop
                # trying on this socket, send this run one by one (errors surface there)
                log.debug("UDP GSO refused (%s): sending datagrams one by one", exc)
                self.gso = False
            elif exc.errno != errno.EMSGSIZE:
                log.debug("sendmsg %s failed: %s", addr, exc)
                return True
            for data in run:
                if not self._send_one(data, addr):
                    return False
            return True
        stats = self.stats
        stats["send_calls"] += 1
        stats["gso_sends"] += 1
        stats["datagrams_sent"] += len(run)
        return True


def _gro_segment(anc: list[tuple[int, int, bytes]]) -> int:
    """The GRO segment size in ``recvmsg`` ancillary data (0: not coalesced)."""
    for level, kind, data in anc:
        if level == SOL_UDP and kind == UDP_GRO and len(data) >= 2:
            return int.from_bytes(data[:4] if len(data) >= 4 else data[:2], sys.byteorder)
    return 0


def route_mtu(addr: tuple[str, int]) -> int | None:
    """The IP MTU the kernel would use toward ``addr`` (interface MTU or a learned path
    MTU), or None where it cannot tell (not Linux, no route). Sends nothing."""
    if not _LINUX:
        return None
    v6 = ":" in addr[0]
    try:
        with socket.socket(socket.AF_INET6 if v6 else socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect((addr[0], addr[1] or 9))
            if v6:
                return int(s.getsockopt(socket.IPPROTO_IPV6, _IPV6_MTU))
            return int(s.getsockopt(socket.IPPROTO_IP, _IP_MTU))
    except OSError:
        return None
