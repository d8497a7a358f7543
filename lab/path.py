"""A path in the article's notation: the hops one flow takes, and how they read as text.

    Local Pod -> OUTPUT -> ISTIO_OUTPUT RULE 9 -> ISTIO_REDIRECT -> Envoy 15001 (Outbound) -> ...

A rule number is printed for chains with more than one rule; a chain of one rule
(ISTIO_REDIRECT) needs none.  The article's chains are all nat; a hop in another table says
so, `ISTIO_INBOUND RULE 8 (mangle)`.  A proxy that answered itself ends a path
(`pilot-agent 15053 (DNS)`).  This module is the notation only: the joiner builds paths
from the witnesses, the scenario files and the article give them as text.

Hops are the sidecar pod's, where Istio's rules are, with two additions:
  - a rule of the node's (the namespace playing the node, kube-proxy's Service DNAT) says
    where it is: `... -> POSTROUTING -> KUBE-SEP-REMOTE RULE 2 (node) -> Remote Pod`;
  - a flow that dies ends where it died, in an end hop instead of the destination: after
    the rule that dropped or rejected it (a hop whatever its table; a policy is
    `OUTPUT POLICY (filter)`), `DROP` or `REJECT`; a SYN redirected to a port nobody
    listens on, `... -> ISTIO_REDIRECT -> 15001: no listener, refused`; one delivered to a
    pod's port nobody listens on, `... -> POSTROUTING -> Local Pod 8080: no listener,
    refused`; one the node cannot route, `node: no route to 10.96.0.99, unreachable`; one
    a proxy closed without dialling, `... -> Envoy 15006 (Inbound) -> blackhole, closed`;
  - a flow that a proxy's own connection brings back into a side of it the flow passed
    ends at that second pass, `... -> Envoy 15006 (loop)`: the loop is stopped there.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Iterable

from . import plan
from .addr import Address
from .netfilter import HOOKS, TABLES, RuleRef

ENDPOINT, HOOK, CHAIN, PROXY, END = "endpoint", "hook", "chain", "proxy", "end"
LOOP = "loop"  # a proxy hop's role when the flow came back into it: `Envoy 15006 (loop)`
REFUSED = "no listener, refused"
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
    kind: str  # ENDPOINT | HOOK | CHAIN | PROXY | END
    name: str  # "Local Pod", "OUTPUT", "ISTIO_OUTPUT", "Envoy 15001 (Outbound)", "15001: no listener, refused"
    table: str = "nat"  # chains: the table the rule is in
    number: int | None = None  # chains: the rule that matched (None: a claim that names no rule)
    numbered: bool = True  # print the number (False for one-rule chains)
    packet: Packet | None = None
    line: str = ""  # the rule this hop names, in iptables-save form (a hook: its jump into Istio's chains)
    entry: RuleRef | None = None  # a hook: the built-in chain's rule the packet matched, if any
    owner: tuple[int, int] | None = None  # a hook where a local socket sent it: (uid, gid) as the kernel saw it
    where: str = ""  # a chain hop's namespace when not the sidecar pod's: plan.NODE
    role: str = ""  # chains: the xtables table an nf_tables table plays (istio-proxy-nat: nat); "" for xtables
    backend: str = ""  # chains: legacy or nft, in a pod whose rules both backends wrote; "" otherwise

    @property
    def rule(self) -> RuleRef | None:
        """The rule a chain hop names (in the sidecar's rules; a node hop's is the node's)."""
        return RuleRef(self.table, self.name, self.number) if self.kind == CHAIN and self.number else None

    @property
    def plays(self) -> str:
        """The xtables table the hop's table is or plays: `nat` for Istio's `istio-proxy-nat`."""
        return self.role or self.table

    @property
    def qualifier(self) -> str:
        """What a chain hop says after its rule: its table if it plays no nat table's part, its
        namespace if not the sidecar's; in a pod whose rules both backends wrote, the backend
        that holds the rule (and the xtables table it is, if not nat: `(mangle, legacy)`)."""
        if self.backend:
            return ", ".join(q for q in (self.where, "" if self.plays == "nat" else self.plays, self.backend) if q)
        return ", ".join(q for q in (self.where, "" if self.plays == "nat" else self.table) if q)

    def __str__(self) -> str:
        text = self.name
        if self.kind == CHAIN and self.number is not None and self.numbered:
            text = f"{self.name} RULE {self.number}"
        if self.kind == CHAIN and self.qualifier:
            text += f" ({self.qualifier})"
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

    @property
    def ending(self) -> str:
        """How the path ends: "reached" (an endpoint, or a proxy that answered), "loop", "closed"
        (a proxy closed it), or "died"."""
        last = self.hops[-1] if self.hops else None
        if last is not None and last.kind == END:
            return "closed" if last.name.endswith(", closed") else "died"
        if last is not None and last.kind == PROXY and last.name.endswith(f"({LOOP})"):
            return LOOP
        return "reached"

    def short(self) -> str:
        """The rules and proxies it passes, e.g. `ISTIO_OUTPUT 9 › 15001 › ISTIO_OUTPUT 4`.

        The REDIRECT chains (nft's istio-redirect, istio-in-redirect) are left out: the proxy
        port after them says the same.  A hop of another table than nat keeps its table:
        `ISTIO_INBOUND 8 (mangle)`.
        """
        parts = []
        for hop in self.hops:
            if hop.kind == PROXY:
                port = hop.name.split()[1]
                parts.append(f"{port} ({LOOP})" if hop.name.endswith(f"({LOOP})") else port)
            elif hop.kind == CHAIN and not hop.name.upper().endswith("REDIRECT"):
                name = f"{hop.name} {hop.number}" if hop.number and hop.numbered else hop.name
                parts.append(f"{name} ({hop.qualifier})" if hop.qualifier else name)
            elif hop.kind == END:
                parts.append(hop.name)
        return " › ".join(parts)


def proxy_name(port: int, loop: bool = False, role: str | None = None) -> str:
    """`Envoy 15001 (Outbound)`; a proxy the flow came back into, `Envoy 15006 (loop)`; `role`:
    the side of Envoy that took it where one listener serves both (`Envoy 15001 (Inbound)`)."""
    if port in AGENT_PROXIES:
        return f"pilot-agent {port} ({LOOP if loop else AGENT_PROXIES[port]})"
    return f"Envoy {port} ({LOOP if loop else role or PROXIES.get(port, 'Listener')})"


def refused(port: int, label: str = "") -> Hop:
    """Where a SYN met no listener: at a redirect's port (`15001: ...`), or at a pod's port
    (`Local Pod 8080: ...`)."""
    return Hop(END, f"{label} {port}: {REFUSED}" if label else f"{port}: {REFUSED}")


def of(hops: Iterable[Hop]) -> Path:
    return Path(tuple(hops))


# --- the notation, read back -------------------------------------------------------

_TYPOS = {"RREROUTING": "PREROUTING"}  # the article's spelling slips, read as meant
_PROXY_RE = re.compile(r"^envoy\s*(\d+)\s*\((outbound|inbound|loop)[^)]*\)$", re.I)
_AGENT_RE = re.compile(r"^pilot-agent\s+(\d+)\s*\((dns|loop)\)$", re.I)
_CHAIN_RE = re.compile(r"^([A-Za-z_][A-Za-z0-9_-]*)(?:\s+RULE\s+(\d+))?(?:\s*\((.*)\))?$", re.I)
_END_RE = re.compile(r"^(?:(.+?)\s+)?(\d+):\s*no listener, refused$", re.I)
_ENDING_RE = re.compile(r"^(DROP|REJECT|.+,\s*(unreachable|closed|dropped|refused))$")  # how a path that died ends
_POLICY_RE = re.compile(r"^([A-Za-z_][A-Za-z0-9_-]*) POLICY(?:\s*\((.*)\))?$")
_WHOSE_RE = re.compile(r"^([A-Za-z][A-Za-z -]*?):\s+(.+)$")  # `Remote Pod: INPUT RULE 1 (filter)`
NODE = plan.NODE  # the qualifier of a node's rule
NODE_REWRITES = ("DNAT", "MASQUERADE")  # the node's kube-proxy rules that rewrite a packet: each is a hop
BACKENDS = ("legacy", "nft")  # the qualifier of a rule in a pod whose rules both backends wrote
_NFT_TABLE = re.compile(r"[a-z][a-z0-9_]*-[a-z0-9_-]+")  # an nf_tables table of its own: istio-proxy-mangle


def parse(text: str) -> Path:
    """Read a path written in the notation (tolerant of the article's typography); raises
    ValueError naming the hop it cannot read."""
    tokens = [" ".join(t.split()) for t in text.split("->")]
    tokens = [t for t in tokens if t]
    hops = []
    for i, token in enumerate(tokens):
        last = i == len(tokens) - 1
        agent = _AGENT_RE.match(token)
        proxy = _PROXY_RE.match(token)
        end = _END_RE.match(token)
        if agent and last:  # a proxy that answered ends the path
            hops.append(Hop(PROXY, proxy_name(int(agent.group(1)), agent.group(2).lower() == LOOP)))
            continue
        if proxy and last and proxy.group(2).lower() == LOOP:  # the loop, stopped at its second pass
            hops.append(Hop(PROXY, proxy_name(int(proxy.group(1)), loop=True)))
            continue
        if end and last and i:  # where the flow died
            hops.append(refused(int(end.group(2)), end.group(1) or ""))
            continue
        if last and i and _ENDING_RE.match(token):
            hops.append(Hop(END, token))
            continue
        if i in (0, len(tokens) - 1):
            hops.append(Hop(ENDPOINT, token))
            continue
        whose = _WHOSE_RE.match(token)
        label = ""
        if whose and not proxy and not agent:  # a rule of another namespace than the sidecar's
            label, token = f"{whose.group(1)}: ", whose.group(2)
        chain = _CHAIN_RE.match(token)
        policy = _POLICY_RE.match(token)
        if policy:  # a built-in chain's policy that killed it
            aside = [q.strip() for q in (policy.group(2) or "").split(",")]
            table = next((q for q in aside if q in TABLES), "filter")
            hops.append(Hop(CHAIN, f"{label}{policy.group(1).upper()} POLICY", table, None, False))
        elif proxy and proxy.group(2).lower() != LOOP:
            hops.append(Hop(PROXY, f"Envoy {proxy.group(1)} ({proxy.group(2).capitalize()})"))
        elif agent and agent.group(2).lower() != LOOP:
            hops.append(Hop(PROXY, proxy_name(int(agent.group(1)))))
        elif chain:
            written = chain.group(1)
            # nft's chains keep their own lower-case names (istio-output, output); iptables' are upper case
            name = written if written.islower() else _TYPOS.get(written.upper(), written.upper())
            number = int(chain.group(2)) if chain.group(2) else None
            aside = [q.strip() for q in (chain.group(3) or "").split(",")]
            table = next((q for q in aside if q in TABLES or _NFT_TABLE.fullmatch(q)), "nat")  # else the article's aside
            where = NODE if NODE in aside else ""
            backend = next((q for q in aside if q in BACKENDS), "")
            if name in HOOKS and number is None and not where and not label and not any(q in TABLES for q in aside):
                hops.append(Hop(HOOK, name))
            else:
                hops.append(Hop(CHAIN, label + name, table, number, where=where, backend=backend))
        else:
            raise ValueError(f"cannot read hop {token!r}")
    return of(hops)


def notes(text: str) -> list[str]:
    """What reading the article's path had to assume."""
    return [f"the article writes {typo}, read as {meant}" for typo, meant in _TYPOS.items() if typo in text]
