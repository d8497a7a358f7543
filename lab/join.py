"""Join the witnesses into legs and a path.

A redirected client connection becomes several legs: the client's, then one per proxy that
dials again.  The proxies' logs chain them: a line's downstream peer and original
destination are one leg's ends, its upstream connection is the next leg.  Each leg's
first packet (its SYN, or a UDP flow's first datagram) is the only one the nat table
judges, so the rules its TRACE events name are the hops:

  - a hop per rule that matched in raw's own chains, mangle or nat; a built-in chain's
    jump is not one (the chain it jumps to is the next hop, and says more), nor are raw's
    built-in chains (they hold the lab's TRACE rules);
  - a packet sent over lo comes back in through PREROUTING in the same pod: its hops there
    follow `POSTROUTING -> PREROUTING`;
  - a leg a proxy took ends at the proxy; the last leg ends at INPUT (delivered) or
    POSTROUTING (sent on);
  - a leg sent on to a Service VIP that the node's kube-proxy rules DNATed shows that rule
    after POSTROUTING (`KUBE-SEP-REMOTE RULE 2 (node)`), from the node's own TRACE events;
    a pod's own Service comes back into the pod (hairpin, masqueraded: `KUBE-POSTROUTING
    RULE 3 (node)`), and the path goes on there, into the pod's inbound rules;
  - a leg its dialer was refused on ends where its SYN met no listener (`15001: no listener,
    refused` when the sidecar had redirected it, `Local Pod 8080: no listener, refused`
    otherwise), and a leg that was a proxy's own connection sent back to it ends at that
    proxy, `Envoy 15006 (loop)`.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Iterable, Sequence

from . import plan
from . import path as paths
from .addr import Address
from .netfilter import PATH_TABLES, BUILTIN_TARGETS, Layout, RuleRef
from .path import Hop, Packet, Path
from .proxylogs import ProxyLine
from .rules import nftset
from .rules.save import RuleLine
from .trace import TraceEvent


@dataclass(frozen=True)
class Leg:
    """One connection: who dialed what (before any NAT), and the proxy listener that took it."""

    client: Address
    server: Address
    proxy: int | None = None
    error: str | None = None  # what its dialer was told, when it failed (a proxy's "upstream connect ... failed")
    loop: bool = False  # the proxy that took it had dialed it itself: the flow came back (the proxy closed it)


@dataclass(frozen=True)
class Death:
    """Where a refused leg's SYN met no listener: the pod and port it was delivered to, and
    whether the sidecar's rules had redirected it there (to a proxy port)."""

    pod: str
    port: int
    redirected: bool


REFUSED = ("ECONNREFUSED", "Connection refused")


def legs(client: Address, server: Address, lines: Iterable[ProxyLine]) -> list[Leg]:
    """Follow the proxies' logs from the client's connection through every proxy.

    A line belongs to a leg when its downstream peer is the leg's client and its original
    destination the leg's server: the client's address alone is not enough, since the
    kernel may give a proxy's upstream socket the same port as a client's (connect(2)
    shares a local port between different destinations).  A line with no original
    destination (a UDP query) keeps the one the client dialed; a line with no upstream (a
    query the proxy answered, a connection it refused) ends the chain.
    """
    lines = list(lines)
    found, seen, error = [], set(), None
    while (client, server) not in seen:
        seen.add((client, server))
        line = next((l for l in lines if l.downstream_peer == client and l.original_dst in (server, None)), None)
        if line is None:
            found.append(Leg(client, server, error=error))
            break
        found.append(Leg(client, line.original_dst or server, line.listener, loop=line.loop))
        if line.upstream_local is None or line.upstream_peer is None:
            break
        client, server, error = line.upstream_local, line.upstream_peer, line.error
    return found


def first_packet(events: Iterable[TraceEvent], leg: Leg) -> list[TraceEvent]:
    """The events of the leg's first packet, in the order the kernel emitted them.  A later
    datagram of a UDP flow passes the same rules again (all but nat's): of each rule only
    its first event is kept."""
    out, seen = [], set()
    for e in events:
        if e.source != leg.client or not e.opens_flow:
            continue
        if e.proto == "udp":
            key = (e.pod, e.table, e.chain, e.kind, e.rulenum)
            if key in seen:
                continue
            seen.add(key)
        out.append(e)
    return out


def packet(e: TraceEvent) -> Packet:
    return Packet(e.proto, e.source, e.destination)


class Rules:
    """The sidecar's rules as applied: each one's line (iptables-save's `-A ...`, or nft's rule
    text), how many each chain holds, and where each table and base chain sits (Layout)."""

    def __init__(self, lines: dict[RuleRef, str], layout: Layout = Layout()):
        self.lines = lines
        self.layout = layout
        self.counts = Counter(ref.chain_ref for ref in lines)

    def hook_of(self, e: TraceEvent) -> str | None:
        """The hook an event's chain is attached to (a built-in or base chain), else None."""
        return self.layout.hook(e.table, e.chain)

    def plays(self, e: TraceEvent) -> str:
        """The xtables table the event's table is or plays (nat, mangle, raw, ...)."""
        return self.layout.role(e.table)

    def matched(self, e: TraceEvent) -> bool:
        """Did the event's rule match?  A `rule` event says so; so does a `return` or `policy`
        event numbered within its chain: ip_tables' tracer names an unconditional standard
        rule (`-j RETURN`, ACCEPT or DROP with no match) as it names the chain's own tail,
        and only the tail is numbered one past the chain's last rule."""
        return e.kind == "rule" or e.rulenum <= self.counts.get(e.rule.chain_ref, 0)

    def target(self, ref: RuleRef) -> str | None:
        line = self.lines.get(ref)
        if not line:
            return None
        return RuleLine.parse(line).target if line.startswith("-A ") else nftset.target(line)

    def hop(self, e: TraceEvent) -> Hop | None:
        """The hop a matched rule makes, or None (a built-in chain's jump, a TRACE rule)."""
        role = self.plays(e)
        if not self.matched(e) or role not in PATH_TABLES:
            return None
        if self.hook_of(e) and (role == "raw" or self.target(e.rule) not in BUILTIN_TARGETS):
            return None
        return Hop(paths.CHAIN, e.chain, e.table, e.rulenum, self.counts.get(e.rule.chain_ref, 2) > 1, packet(e),
                   self.lines.get(e.rule, ""), role=role if role != e.table else "",
                   backend=self.layout.backend(e.table))

    def hook(self, name: str, syn: Sequence[TraceEvent], first: TraceEvent, owner: bool = False) -> Hop:
        """A hook the packet passed, with the nat rule of its built-in chain that it matched."""
        jump = next((e for e in syn if self.matched(e) and self.plays(e) == "nat" and self.hook_of(e) == name), None)
        return Hop(paths.HOOK, name, packet=packet(first), entry=jump.rule if jump else None,
                   line=self.lines.get(jump.rule, "") if jump else "",
                   owner=(first.uid, first.gid) if owner and first.uid is not None else None)


def leg_hops(events: Sequence[TraceEvent], leg: Leg, rules: Rules, node: Sequence[Hop] = (),
             died: Death | None = None) -> list[Hop]:
    """Hops of one leg from its first packet's events in the pod that holds the rules; the
    node's rewrites of it (`node`: its DNAT, a hairpin's masquerade), and where it died
    (`died`), if it did."""
    syn = first_packet(events, leg)
    if not syn:
        return []
    entry = next((rules.hook_of(e) for e in syn if rules.hook_of(e) in ("OUTPUT", "PREROUTING")), syn[0].chain)
    hops = [rules.hook(entry, syn, syn[0], owner=entry == "OUTPUT")]
    sent = [i for i, e in enumerate(syn) if rules.hook_of(e) == "POSTROUTING"] if entry == "OUTPUT" else []
    out, back = (syn[:sent[0]], syn[sent[-1] + 1:]) if sent else (syn, [])
    hops += [h for h in map(rules.hop, out) if h]
    back_hops = [h for h in map(rules.hop, back) if h]
    if back_hops:
        hops += [rules.hook("POSTROUTING", syn, syn[sent[0]]), rules.hook("PREROUTING", back, back[0])] + back_hops
    if leg.proxy is not None:
        hops.append(Hop(paths.PROXY, paths.proxy_name(leg.proxy, loop=leg.loop), packet=packet(syn[0])))
        return hops
    if died is not None and died.redirected:  # the redirect's port: nothing behind it
        return hops + [paths.refused(died.port)]
    exit_hook = "INPUT" if entry == "PREROUTING" or back_hops else "POSTROUTING"
    last = next((e for e in reversed(syn) if rules.hook_of(e) == exit_hook), None)
    if last is not None:
        hops.append(rules.hook(exit_hook, (), last))
    hops += node
    if died is not None:
        hops.append(paths.refused(died.port, plan.POD_LABELS.get(died.pod, died.pod)))
    return hops


def path(source: str, destination: str, found: list[Leg], events: Sequence[TraceEvent], rules: Rules,
         node: Sequence[Hop] = (), died: Death | None = None, delivered: Packet | None = None,
         again: Sequence[Leg] = ()) -> Path:
    """The whole path; when the last leg ends at a proxy that answered itself (a DNS name in
    pilot-agent's table) or that the flow looped back into, that proxy is where the path
    ends; when the last leg died, the place it died is.  `node`: the node's rewrites of the
    last leg (node_hops), `delivered` the packet the node sent on after them (node_exit);
    `again`: the legs of a flow the node sent back into the sidecar pod (a pod's own
    Service, hairpinned), which go on after the node's hops."""
    hops = [Hop(paths.ENDPOINT, source)]
    every = [*found, *again]
    for i, leg in enumerate(every):
        hops += leg_hops(events, leg, rules, node if leg is found[-1] else (), died if i == len(every) - 1 else None)
    last = every[-1] if every else None
    ended = hops[-1].kind == paths.END or (last is not None and last.proxy is not None and hops[-1].kind == paths.PROXY)
    if not ended:  # after the node's DNAT, the packet the endpoint got is the rewritten one
        hops.append(Hop(paths.ENDPOINT, destination, packet=delivered if node and not again else None))
    return paths.of(hops)


REWRITES = ("DNAT", "MASQUERADE")  # what the node's kube-proxy rules do to a packet


def node_hops(events: Sequence[TraceEvent], leg: Leg, rules: Rules) -> list[Hop]:
    """The node's rules that rewrote the leg's first packet: its DNAT (kube-proxy's KUBE-SEP
    rule) and, for a pod calling its own Service, the masquerade; from the node's TRACE
    events and rules.  Empty when the node rewrote nothing."""
    return [Hop(paths.CHAIN, e.chain, "nat", e.rulenum, rules.counts.get(e.rule.chain_ref, 2) > 1, packet(e),
                rules.lines.get(e.rule, ""), where=plan.NODE)
            for e in first_packet(events, leg)
            if rules.matched(e) and e.table == "nat" and rules.target(e.rule) in REWRITES]


def node_exit(events: Sequence[TraceEvent], leg: Leg) -> Packet | None:
    """The leg's first packet as it left the node (after its DNAT): its POSTROUTING event there."""
    return next((packet(e) for e in first_packet(events, leg) if e.chain == "POSTROUTING"), None)


def masqueraded(events: Sequence[TraceEvent], leg: Leg, rules: Rules) -> Address | None:
    """The leg's client as its endpoint sees it when the node masqueraded it (a pod calling its
    own Service: hairpin): the node's bridge address, with the client's port (MASQUERADE
    keeps a port it can)."""
    for e in first_packet(events, leg):
        if rules.matched(e) and e.table == "nat" and rules.target(e.rule) == "MASQUERADE":
            return Address(plan.GATEWAY6 if leg.client.family == 6 else plan.GATEWAY, leg.client.port)
    return None


def death(events: Sequence[TraceEvent], leg: Leg, rules: Rules, error: str | None) -> Death | None:
    """Where the leg died, when its dialer was refused (`error`: the client's, or the proxy's
    that dialed it): the pod and port its SYN was delivered to with no listener there.  None
    when it was not refused, or its SYN reached INPUT nowhere (then nothing explains it)."""
    if not error or not any(word in error for word in REFUSED):
        return None
    delivered = reached(events, leg)
    if delivered is None:
        return None
    pod, address = delivered
    redirected = pod == "sidecar" and any(
        rules.target(e.rule) in ("REDIRECT", "TPROXY") for e in first_packet(events, leg)
        if e.pod == "sidecar" and rules.matched(e) and rules.plays(e) in PATH_TABLES)
    return Death(pod, address.port, redirected)


def rule_hits(events: Sequence[TraceEvent], found: list[Leg], rules: Rules) -> list[RuleRef]:
    """The nat rules each leg's first packet matched, in order (built-in jumps included)."""
    return [e.rule for leg in found for e in first_packet(events, leg) if rules.plays(e) == "nat" and rules.matched(e)]


def reached(events: Sequence[TraceEvent], leg: Leg, alias: Address | None = None) -> tuple[str, Address] | None:
    """(pod, address) where the leg's first packet was delivered (INPUT), in any pod; `alias`:
    the client's address as a masquerading node rewrote it (masqueraded)."""
    legs = [leg] + ([Leg(alias, leg.server)] if alias else [])
    for e in (e for one in legs for e in first_packet(events, one)):
        if e.chain == "INPUT":
            return e.pod, e.destination
    return None
