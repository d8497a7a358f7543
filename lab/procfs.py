"""What /proc says about a process: whether it still runs, when it started, the sockets it
holds.  One reader for the lab's records (who made a lab, is it alive) and for readiness
(is a server listening yet), so procfs' formats are parsed in one place.
"""

from __future__ import annotations

import os
import socket
import struct
from dataclasses import dataclass

from .addr import Address

TCP_LISTEN = "0A"  # include/net/tcp_states.h, as /proc/net/tcp writes them


@dataclass(frozen=True)
class Stat:
    """Fields of /proc/PID/stat: the state letter ("Z": a zombie) and the start time in
    clock ticks (a pid and its start time name one process, whatever reuses the pid)."""

    state: str
    start_time: str


def stat(pid: int) -> Stat | None:
    """None when the process is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()  # the name, in parentheses, may hold spaces
    except (OSError, IndexError):
        return None
    return Stat(fields[0], fields[19])


def running(pid: int) -> bool:
    """Alive and not a zombie waiting to be reaped."""
    found = stat(pid)
    return found is not None and found.state != "Z"


def net_inode(pid: int | str) -> int | None:
    """The inode of the process's network namespace (`self`, `thread-self` and `1` too)."""
    try:
        return os.stat(f"/proc/{pid}/ns/net").st_ino
    except OSError:
        return None


@dataclass(frozen=True)
class Socket:
    local: Address
    remote: Address
    state: str  # TCP_LISTEN "0A", established "01", ... ("07" for an unconnected UDP socket)


def socket_inodes(pid: int) -> set[int]:
    """The inodes of the sockets the process holds open (/proc/PID/fd).  Raises OSError when
    the process is gone."""
    owned = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            link = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:  # closed meanwhile
            continue
        if link.startswith("socket:["):
            owned.add(int(link[8:-1]))
    return owned


def sockets(pid: int, kind: str, ipv6: bool = False) -> list[Socket]:
    """The process's own sockets of `kind` ("tcp" or "udp"), from its namespace's tables
    (/proc/PID/net/tcp, tcp6, udp, ...) joined with the socket inodes of /proc/PID/fd.
    Raises OSError when the process or its namespace is gone.  (Reading tcp walks the
    host's whole established hash: lab.sockdiag reads a namespace's TCP sockets faster.)"""
    owned = {str(inode) for inode in socket_inodes(pid)}
    out = []
    for table in (kind, kind + "6") if ipv6 else (kind,):
        with open(f"/proc/{pid}/net/{table}") as f:
            for row in (line.split() for line in f.readlines()[1:]):
                if row[9] in owned:
                    out.append(Socket(hexaddr(row[1]), hexaddr(row[2]), row[3]))
    return out


def hexaddr(text: str) -> Address:
    """/proc/net/tcp's "0A00F40A:1F90" (the address in host byte order) -> 10.244.0.10:8080;
    tcp6's address is four such 32-bit words."""
    ip, port = text.split(":")
    words = b"".join(struct.pack("=I", int(ip[i:i + 8], 16)) for i in range(0, len(ip), 8))
    host = socket.inet_ntoa(words) if len(words) == 4 else socket.inet_ntop(socket.AF_INET6, words)
    return Address(host, int(port, 16))
