"""A path in the article's notation: the hops one flow takes, and how they read as text.

    Local Pod -> OUTPUT -> ISTIO_OUTPUT RULE 9 -> ISTIO_REDIRECT -> Envoy 15001 (Outbound) -> ...

A rule number is printed for chains with more than one rule; a chain of one rule
(ISTIO_REDIRECT) needs none.  The article's chains are all nat; a hop in another table says
so, `ISTIO_INBOUND RULE 8 (mangle)`.  A proxy that answered itself ends a path
(`pilot-agent 15053 (DNS)`).  This module is the notation only: the joiner builds paths
from the witnesses, the scenario files and the article give them as text.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Iterable

from . import plan
from .addr import Address
from .netfilter import HOOKS, TABLES, RuleRef

ENDPOINT, HOOK, CHAIN, PROXY = "endpoint", "hook", "chain", "proxy"
PROXIES = {plan.Port.OUTBOUND: "Outbound", plan.Port.INBOUND: "Inbound"}  # Envoy's listeners
AGENT_PROXIES = {plan.Port.DNS_PROXY: "DNS"}  # pilot-agent's listeners that traffic is redirected to


@dataclass(frozen=True)
class Packet:
    """The packet a hop was seen on: a connection's SYN, or a UDP flow's first datagram."""

    proto: str  # "tcp" | "udp"
    src: Address
    dst: Address

    def __str__(self) -> str:
        return f"{'UDP' if self.proto == 'udp' else 'SYN'} {self.src} > {self.dst}"


@dataclass(frozen=True)
class Hop:
    kind: str  # ENDPOINT | HOOK | CHAIN | PROXY
    name: str  # "Local Pod", "OUTPUT", "ISTIO_OUTPUT", "Envoy 15001 (Outbound)"
    table: str = "nat"  # chains: the table the rule is in
    number: int | None = None  # chains: the rule that matched (None: a claim that names no rule)
    numbered: bool = True  # print the number (False for one-rule chains)
    packet: Packet | None = None
    line: str = ""  # the rule this hop names, in iptables-save form (a hook: its jump into Istio's chains)
    entry: RuleRef | None = None  # a hook: the built-in chain's rule the packet matched, if any
    owner: tuple[int, int] | None = None  # a hook where a local socket sent it: (uid, gid) as the kernel saw it

    @property
    def rule(self) -> RuleRef | None:
        """The rule a chain hop names."""
        return RuleRef(self.table, self.name, self.number) if self.kind == CHAIN and self.number else None

    def __str__(self) -> str:
        text = self.name
        if self.kind == CHAIN and self.number is not None and self.numbered:
            text = f"{self.name} RULE {self.number}"
        if self.kind == CHAIN and self.table != "nat":
            text += f" ({self.table})"
        return text


@dataclass(frozen=True)
class Path:
    hops: tuple[Hop, ...] = ()

    def __str__(self) -> str:
        return " -> ".join(str(h) for h in self.hops)

    @property
    def chains(self) -> list[Hop]:
        return [h for h in self.hops if h.kind == CHAIN]

    @property
    def proxies(self) -> list[str]:
        return [h.name for h in self.hops if h.kind == PROXY]

    def short(self) -> str:
        """The rules and proxies it passes, e.g. `ISTIO_OUTPUT 9 › 15001 › ISTIO_OUTPUT 4`.

        The REDIRECT chains are left out: the proxy port after them says the same.  A hop of
        another table than nat keeps its table: `ISTIO_INBOUND 8 (mangle)`.
        """
        parts = []
        for hop in self.hops:
            if hop.kind == PROXY:
                parts.append(hop.name.split()[1])
            elif hop.kind == CHAIN and not hop.name.endswith("REDIRECT"):
                name = f"{hop.name} {hop.number}" if hop.number and hop.numbered else hop.name
                parts.append(name if hop.table == "nat" else f"{name} ({hop.table})")
        return " › ".join(parts)


def proxy_name(port: int) -> str:
    if port in AGENT_PROXIES:
        return f"pilot-agent {port} ({AGENT_PROXIES[port]})"
    return f"Envoy {port} ({PROXIES.get(port, 'Listener')})"


def of(hops: Iterable[Hop]) -> Path:
    return Path(tuple(hops))


# --- the notation, read back -------------------------------------------------------

_TYPOS = {"RREROUTING": "PREROUTING"}  # the article's spelling slips, read as meant
_PROXY_RE = re.compile(r"^envoy\s*(\d+)\s*\((outbound|inbound)[^)]*\)$", re.I)
_AGENT_RE = re.compile(r"^pilot-agent\s+(\d+)\s*\((dns)\)$", re.I)
_CHAIN_RE = re.compile(r"^([A-Za-z_]+)(?:\s+RULE\s+(\d+))?(?:\s*\((.*)\))?$", re.I)


def parse(text: str) -> Path:
    """Read a path written in the notation (tolerant of the article's typography); raises
    ValueError naming the hop it cannot read."""
    tokens = [" ".join(t.split()) for t in text.split("->")]
    tokens = [t for t in tokens if t]
    hops = []
    for i, token in enumerate(tokens):
        agent = _AGENT_RE.match(token)
        if agent and i == len(tokens) - 1:  # a proxy that answered ends the path
            hops.append(Hop(PROXY, proxy_name(int(agent.group(1)))))
            continue
        if i in (0, len(tokens) - 1):
            hops.append(Hop(ENDPOINT, token))
            continue
        proxy = _PROXY_RE.match(token)
        chain = _CHAIN_RE.match(token)
        if proxy:
            hops.append(Hop(PROXY, f"Envoy {proxy.group(1)} ({proxy.group(2).capitalize()})"))
        elif agent:
            hops.append(Hop(PROXY, proxy_name(int(agent.group(1)))))
        elif chain:
            name = _TYPOS.get(chain.group(1).upper(), chain.group(1).upper())
            number = int(chain.group(2)) if chain.group(2) else None
            table = chain.group(3) if chain.group(3) in TABLES else "nat"  # else the article's aside
            hops.append(Hop(HOOK, name) if name in HOOKS and number is None else Hop(CHAIN, name, table, number))
        else:
            raise ValueError(f"cannot read hop {token!r}")
    return of(hops)


def notes(text: str) -> list[str]:
    """What reading the article's path had to assume."""
    return [f"the article writes {typo}, read as {meant}" for typo, meant in _TYPOS.items() if typo in text]
