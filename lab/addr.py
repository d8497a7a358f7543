"""An IP address and port, the value every witness reports and every leg joins on.

Text only at the edges: logs and reports write `10.244.0.10:8080`, an IPv6 address in
brackets as in a URL (`[fd00:10:244::10]:8080`); everything between holds an Address.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, order=True)
class Address:
    ip: str
    port: int

    @property
    def family(self) -> int:
        return 6 if ":" in self.ip else 4

    def __str__(self) -> str:
        return f"[{self.ip}]:{self.port}" if ":" in self.ip else f"{self.ip}:{self.port}"

    @classmethod
    def parse(cls, text: str) -> "Address":
        host, sep, port = text.rpartition(":")
        if not sep or not port.isdigit():
            raise ValueError(f"not an address:port: {text!r}")
        if host.startswith("[") and host.endswith("]"):
            host = host[1:-1]
        return cls(host, int(port))

    @classmethod
    def of(cls, sockaddr) -> "Address | None":
        """From a socket address tuple (getsockname, getpeername); None for a socket reset
        before its address could be asked."""
        return cls(sockaddr[0], sockaddr[1]) if sockaddr else None


def text(sockaddr) -> str | None:
    """A socket address tuple as logs write it, None for none."""
    found = Address.of(sockaddr)
    return str(found) if found else None
