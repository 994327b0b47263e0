"""Bytes a node puts on the wire, counted where they leave it: the kernel's TCP counters.

All of a node's network traffic (DHT, matchmaking, the masked all-reduce, state sharing) goes
through its one libp2p daemon (p2pd; every hivemind component of the node is a client of it), so
the bytes sent on that daemon's TCP sockets are every byte the node puts on the wire, framing,
encryption and retransmissions included. The kernel keeps them per socket (``tcpi_bytes_sent``
in ``tcp_info``); ``WireMeter`` reads them through the sock_diag netlink interface (what ``ss -ti``
reads) and keeps the last value of every socket it has seen, so closed connections still count
(up to one poll period of traffic just before a close is missed: a slight undercount).

Linux only; elsewhere ``bytes_sent`` reports -1 (unknown).
"""

from __future__ import annotations

import logging
import os
import socket
import struct
import threading

import hivemind
import psutil

logger = logging.getLogger(__name__)

NETLINK_SOCK_DIAG = 4
SOCK_DIAG_BY_FAMILY = 20
NLMSG_ERROR, NLMSG_DONE = 2, 3
NLM_F_REQUEST, NLM_F_DUMP = 0x1, 0x300
INET_DIAG_INFO = 2
HEADER = struct.Struct("=IHHII")  # nlmsghdr: length, type, flags, sequence, port id
DIAG_MSG_BYTES = 72  # struct inet_diag_msg; the socket cookie is at 44, the inode at 68
TCPI_BYTES_SENT, TCPI_BYTES_ACKED = 200, 120  # offsets in struct tcp_info (bytes_sent: Linux >= 4.19)


def tcp_bytes_sent() -> dict[int, tuple[int, int]]:
    """``{inode: (cookie, bytes sent)}`` for every TCP socket of this network namespace."""
    found: dict[int, tuple[int, int]] = {}
    with socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, NETLINK_SOCK_DIAG) as link:
        for sequence, family in enumerate((socket.AF_INET, socket.AF_INET6), start=1):
            request = struct.pack("=BBBBI", family, socket.IPPROTO_TCP, 1 << (INET_DIAG_INFO - 1), 0, 0xFFFFFFFF)
            request += bytes(48)  # any socket id
            flags = NLM_F_REQUEST | NLM_F_DUMP
            link.send(HEADER.pack(HEADER.size + len(request), SOCK_DIAG_BY_FAMILY, flags, sequence, 0) + request)
            while _read_batch(link.recv(1 << 16), found):
                pass
    return found


def _read_batch(data: bytes, found: dict[int, tuple[int, int]]) -> bool:
    """Parse one netlink datagram into ``found``; False once the dump is done."""
    offset = 0
    while offset + HEADER.size <= len(data):
        length, kind, _, _, _ = HEADER.unpack_from(data, offset)
        if kind == NLMSG_DONE:
            return False
        if kind == NLMSG_ERROR or length < HEADER.size + DIAG_MSG_BYTES:
            raise OSError("sock_diag refused the request")
        body = offset + HEADER.size
        (cookie,) = struct.unpack_from("=Q", data, body + 44)
        (inode,) = struct.unpack_from("=I", data, body + 68)
        attribute, end = body + DIAG_MSG_BYTES, offset + length
        while attribute + 4 <= end:
            size, kind = struct.unpack_from("=HH", data, attribute)
            if size < 4:
                break
            if kind == INET_DIAG_INFO:
                info = data[attribute + 4 : attribute + size]
                where = TCPI_BYTES_SENT if len(info) >= TCPI_BYTES_SENT + 8 else TCPI_BYTES_ACKED
                if len(info) >= where + 8:
                    found[inode] = (cookie, struct.unpack_from("=Q", info, where)[0])
            attribute += (size + 3) & ~3
        offset += (length + 3) & ~3
    return True


def socket_inodes(pid: int) -> set[int]:
    """Inodes of the sockets process ``pid`` holds open."""
    inodes = set()
    folder = f"/proc/{pid}/fd"
    for fd in os.listdir(folder):
        try:
            target = os.readlink(f"{folder}/{fd}")
        except OSError:
            continue  # closed meanwhile
        if target.startswith("socket:["):
            inodes.add(int(target[8:-1]))
    return inodes


class WireMeter:
    """Counts the bytes one process (a node's p2pd) sends over TCP, polling every ``period`` seconds.

    Args:
        pid: the process whose sockets are counted.
        period: seconds between polls (a closing connection's last ``period`` of traffic may be missed).
    """

    def __init__(self, pid: int, period: float = 0.5):
        self.pid, self.period = pid, period
        self._sockets: dict[int, int] = {}  # socket cookie -> bytes sent when last seen
        self._lock = threading.Lock()
        self._stopped = threading.Event()
        self.available = True
        self._thread = threading.Thread(target=self._poll_forever, name="wire-meter", daemon=True)
        self._thread.start()

    @classmethod
    def for_dht(cls, dht: hivemind.DHT, period: float = 0.5) -> WireMeter | None:
        """The meter of the libp2p daemon serving ``dht`` (None if it cannot be found)."""
        try:
            daemons = [p for p in psutil.Process(dht.pid).children(recursive=True) if p.name() == "p2pd"]
        except (psutil.Error, ValueError):
            daemons = []
        if len(daemons) != 1:
            logger.info("could not find this node's libp2p daemon: bytes on the wire are not counted")
            return None
        return cls(daemons[0].pid, period)

    def poll(self) -> None:
        try:
            mine = socket_inodes(self.pid)
        except FileNotFoundError:
            return  # the daemon has exited: its counts stand
        try:
            counts = tcp_bytes_sent()
        except (OSError, ValueError) as e:
            if self.available:
                logger.info(f"bytes on the wire cannot be counted here ({e})")
            self.available = False
            return
        with self._lock:
            for inode in mine & counts.keys():
                cookie, sent = counts[inode]
                self._sockets[cookie] = max(sent, self._sockets.get(cookie, 0))

    def bytes_sent(self) -> int:
        """Bytes sent so far (a fresh reading); -1 where the kernel's counters cannot be read."""
        self.poll()
        with self._lock:
            return sum(self._sockets.values()) if self.available else -1

    def _poll_forever(self) -> None:
        while not self._stopped.wait(self.period):
            self.poll()

    def stop(self) -> None:
        self._stopped.set()
        self._thread.join(timeout=2 * self.period + 1)
