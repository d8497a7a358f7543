"""IP addresses as the kernel compares them: integers under a mask.

A rule's `-d 10.96.0.0/16` is `(daddr & mask) == net`; keeping addresses as integers
makes every address match one AND and one compare, and text is made only when a
reason or a path is written.
"""

from __future__ import annotations

import functools
import ipaddress
from dataclasses import dataclass

BITS = {4: 32, 6: 128}


@dataclass(frozen=True, slots=True)
class Network:
    """An address with a prefix: `-s 127.0.0.6/32`, a route's destination, an interface address."""

    family: int
    net: int
    prefix: int

    @property
    def mask(self) -> int:
        bits = BITS[self.family]
        return ((1 << bits) - 1) ^ ((1 << (bits - self.prefix)) - 1)

    def __contains__(self, address: int) -> bool:
        return address & self.mask == self.net

    def __str__(self) -> str:
        return f"{text(self.family, self.net)}/{self.prefix}"


def family_of(address: str) -> int:
    return 6 if ":" in address else 4


def parse(address: str) -> tuple[int, int]:
    """(family, address as an integer) of "10.244.0.10" or "fd00:10:244::10"."""
    ip = ipaddress.ip_address(address)
    return ip.version, int(ip)


def network(spec: str, family: int | None = None) -> Network:
    """`10.0.0.0/8`, `10.0.0.0/255.0.0.0`, `::1/128` or a bare address (a host): as iptables reads
    `-s`/`-d`, host bits cleared (iptables-save prints the network address anyway)."""
    net = ipaddress.ip_network(spec, strict=False)
    if family is not None and net.version != family:
        raise ValueError(f"{spec} is not an IPv{family} address")
    return Network(net.version, int(net.network_address), net.prefixlen)


@functools.lru_cache(maxsize=4096)
def text(family: int, address: int) -> str:
    return str(ipaddress.IPv4Address(address) if family == 4 else ipaddress.IPv6Address(address))


def endpoint(family: int, address: int, port: int | None) -> str:
    """`10.244.0.10:8080`, `[fd00:10:244::10]:8080`; an ephemeral port the kernel picks is `*`."""
    host = text(family, address)
    where = f"[{host}]" if family == 6 else host
    return f"{where}:{'*' if port is None else port}"


def is_loopback(family: int, address: int) -> bool:
    """127/8 or ::1: addresses the kernel refuses to send from over any device but lo."""
    return address >> 24 == 127 if family == 4 else address == 1
