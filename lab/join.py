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
    POSTROUTING (sent on).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Iterable, Sequence

from . import path as paths
from .addr import Address
from .netfilter import HOOKS, PATH_TABLES, BUILTIN_TARGETS, RuleRef
from .path import Hop, Packet, Path
from .proxylogs import ProxyLine
from .rules.save import RuleLine
from .trace import TraceEvent


@dataclass(frozen=True)
class Leg:
    """One connection: who dialed what (before any NAT), and the proxy listener that took it."""

    client: Address
    server: Address
    proxy: int | None = None


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
    found, seen = [], set()
    while (client, server) not in seen:
        seen.add((client, server))
        line = next((l for l in lines if l.downstream_peer == client and l.original_dst in (server, None)), None)
        if line is None:
            found.append(Leg(client, server))
            break
        found.append(Leg(client, line.original_dst or server, line.listener))
        if line.upstream_local is None or line.upstream_peer is None:
            break
        client, server = line.upstream_local, line.upstream_peer
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
    """The sidecar's rules as applied: each one's line, and how many each chain holds."""

    def __init__(self, lines: dict[RuleRef, str]):
        self.lines = lines
        self.counts = Counter(ref.chain_ref for ref in lines)

    def matched(self, e: TraceEvent) -> bool:
        """Did the event's rule match?  A `rule` event says so; so does a `return` or `policy`
        event numbered within its chain: ip_tables' tracer names an unconditional standard
        rule (`-j RETURN`, ACCEPT or DROP with no match) as it names the chain's own tail,
        and only the tail is numbered one past the chain's last rule."""
        return e.kind == "rule" or e.rulenum <= self.counts.get(e.rule.chain_ref, 0)

    def target(self, ref: RuleRef) -> str | None:
        line = self.lines.get(ref)
        return RuleLine.parse(line).target if line else None

    def hop(self, e: TraceEvent) -> Hop | None:
        """The hop a matched rule makes, or None (a built-in chain's jump, a TRACE rule)."""
        if not self.matched(e) or e.table not in PATH_TABLES:
            return None
        if e.chain in HOOKS and (e.table == "raw" or self.target(e.rule) not in BUILTIN_TARGETS):
            return None
        return Hop(paths.CHAIN, e.chain, e.table, e.rulenum, self.counts.get(e.rule.chain_ref, 2) > 1, packet(e),
                   self.lines.get(e.rule, ""))

    def hook(self, name: str, syn: Sequence[TraceEvent], first: TraceEvent, owner: bool = False) -> Hop:
        """A hook the packet passed, with the nat rule of its built-in chain that it matched."""
        jump = next((e for e in syn if self.matched(e) and e.table == "nat" and e.chain == name), None)
        return Hop(paths.HOOK, name, packet=packet(first), entry=jump.rule if jump else None,
                   line=self.lines.get(jump.rule, "") if jump else "",
                   owner=(first.uid, first.gid) if owner and first.uid is not None else None)


def leg_hops(events: Sequence[TraceEvent], leg: Leg, rules: Rules) -> list[Hop]:
    """Hops of one leg from its first packet's events in the pod that holds the rules."""
    syn = first_packet(events, leg)
    if not syn:
        return []
    entry = next((e.chain for e in syn if e.chain in ("OUTPUT", "PREROUTING")), syn[0].chain)
    hops = [rules.hook(entry, syn, syn[0], owner=entry == "OUTPUT")]
    sent = [i for i, e in enumerate(syn) if e.chain == "POSTROUTING"] if entry == "OUTPUT" else []
    out, back = (syn[:sent[0]], syn[sent[-1] + 1:]) if sent else (syn, [])
    hops += [h for h in map(rules.hop, out) if h]
    back_hops = [h for h in map(rules.hop, back) if h]
    if back_hops:
        hops += [rules.hook("POSTROUTING", syn, syn[sent[0]]), rules.hook("PREROUTING", back, back[0])] + back_hops
    if leg.proxy is not None:
        hops.append(Hop(paths.PROXY, paths.proxy_name(leg.proxy), packet=packet(syn[0])))
    else:
        exit_hook = "INPUT" if entry == "PREROUTING" or back_hops else "POSTROUTING"
        last = next((e for e in reversed(syn) if e.chain == exit_hook), None)
        if last is not None:
            hops.append(rules.hook(exit_hook, (), last))
    return hops


def path(source: str, destination: str, found: list[Leg], events: Sequence[TraceEvent], rules: Rules) -> Path:
    """The whole path; when the last leg ends at a proxy that answered itself (a DNS name in
    pilot-agent's table), that proxy is where the path ends."""
    hops = [Hop(paths.ENDPOINT, source)]
    for leg in found:
        hops += leg_hops(events, leg, rules)
    if not (found and found[-1].proxy is not None and hops[-1].kind == paths.PROXY):
        hops.append(Hop(paths.ENDPOINT, destination))
    return paths.of(hops)


def rule_hits(events: Sequence[TraceEvent], found: list[Leg], rules: Rules) -> list[RuleRef]:
    """The nat rules each leg's first packet matched, in order (built-in jumps included)."""
    return [e.rule for leg in found for e in first_packet(events, leg) if e.table == "nat" and rules.matched(e)]


def reached(events: Sequence[TraceEvent], leg: Leg) -> tuple[str, Address] | None:
    """(pod, address) where the leg's first packet was delivered (INPUT), in any pod."""
    for e in first_packet(events, leg):
        if e.chain == "INPUT":
            return e.pod, e.destination
    return None
