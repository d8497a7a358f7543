"""A flow's first packet and what the kernel keeps beside it on its way.

The rules look at more than the headers: the skb's mark, the sending socket's owner
(only locally generated packets have one), the interfaces, and the connection
conntrack files it under.  A Packet holds all of it, immutably: every rule that
changes something (MARK, REDIRECT, TPROXY, ...) makes a new one, so each step of a
walk keeps the packet exactly as that rule saw it, and a miss can be explained later.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

from . import inet


@dataclass(frozen=True, slots=True)
class Owner:
    """The sending socket's file credentials: what `-m owner` compares (fsuid, fsgid, groups)."""

    uid: int
    gid: int
    groups: tuple[int, ...] = ()


class Connection(NamedTuple):
    """The conntrack entry of a first packet: always NEW, its original destination kept for
    SO_ORIGINAL_DST, and which of nat's two manips (destination: PREROUTING/OUTPUT, source:
    INPUT/POSTROUTING) are settled, since nat judges each only once per connection."""

    zone: int
    original_dst: int
    original_dport: int
    mark: int = 0
    dst_nat: bool = False  # IPS_DST_NAT: REDIRECT or DNAT rewrote the destination
    src_nat: bool = False
    dst_manip_done: bool = False
    src_manip_done: bool = False


@dataclass(frozen=True, slots=True)
class Socket:
    """A socket that receives: a TCP listener or a bound UDP socket, and who holds it."""

    proto: str
    family: int
    address: int | None  # None: the wildcard (0.0.0.0 or ::)
    port: int
    process: str
    transparent: bool = False

    def takes(self, proto: str, family: int, address: int, port: int) -> bool:
        return (self.proto, self.family, self.port) == (proto, family, port) and self.address in (None, address)

    def __str__(self) -> str:
        where = "*" if self.address is None else inet.text(self.family, self.address)
        return f"{self.process} on {where}:{self.port}/{self.proto}"


class Packet(NamedTuple):
    """Immutable (a tuple: making the next one is cheap, and a walk makes many)."""

    family: int
    proto: str  # "tcp" | "udp"
    src: int
    sport: int | None  # None: an ephemeral port the kernel picks (ip_local_port_range)
    dst: int
    dport: int
    iif: str = ""  # "" for a locally generated packet
    oif: str = ""  # "" until routed, and on the way in
    mark: int = 0
    owner: Owner | None = None  # None: no local socket (the packet came from elsewhere)
    zone_template: int | None = None  # CT --zone, before conntrack files the packet
    untracked: bool = False  # CT --notrack
    conn: Connection | None = None
    socket: Socket | None = None  # assigned by TPROXY

    @property
    def has_conntrack(self) -> bool:
        """Whether skb->_nfct is set: a template, an entry or "untracked".  CT leaves such a
        packet alone, and conntrack does not look it up again (a packet back over lo)."""
        return self.zone_template is not None or self.untracked or self.conn is not None

    def but(self, **changes) -> "Packet":
        return self._replace(**changes)

    def text(self) -> str:
        kind = "SYN" if self.proto == "tcp" else "UDP"
        return f"{kind} {inet.endpoint(self.family, self.src, self.sport)} > {inet.endpoint(self.family, self.dst, self.dport)}"


EPHEMERAL_PORTS = (32768, 60999)  # net.ipv4.ip_local_port_range's default
