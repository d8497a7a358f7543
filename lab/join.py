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
  - a leg that died ends where TRACE saw its first packet die (death): at the rule that
    dropped or rejected it, a hop whatever its table, then `DROP` or `REJECT`; where it met
    no listener (`15001: no listener, refused` when the sidecar had redirected it, `Local
    Pod 8080: no listener, refused` otherwise); at the node that had no route for it
    (`node: no route to 10.96.0.99, unreachable`).  A leg that was a proxy's own connection
    sent back to it ends at that proxy, `Envoy 15006 (loop)`; one the proxy closed without
    dialling ends `Envoy 15001 (Outbound) -> blackhole, closed`.
"""

from __future__ import annotations

import dataclasses
import ipaddress
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
    closed: str | None = None  # the proxy closed it without dialling, and why: "blackhole, closed"
    role: str | None = None  # the side of Envoy that took it, where the log says (one listener for both)


@dataclass(frozen=True)
class Death:
    """Where a leg's first packet died, as TRACE saw it.

    kind "refused": delivered to `pod`:`port` with no listener there (`redirected`: the
    sidecar's rules had sent it to a proxy port); "DROP" or "REJECT": `killer` is the rule
    (or a chain's policy) that did it, in `pod`; "unreachable": `pod` (the node) had no
    route to `to`; "dropped": a TPROXY rule found no transparent socket."""

    pod: str
    port: int
    redirected: bool = False
    kind: str = "refused"
    killer: TraceEvent | None = None
    to: str = ""  # unreachable: the address there was no route to
    rules: "Rules | None" = dataclasses.field(default=None, compare=False)  # the killer's namespace's rules

    def text(self) -> str:
        """The end hop's words (lab.path's notation)."""
        if self.kind == "refused":
            return f"{self.port}: {paths.REFUSED}" if self.redirected else \
                f"{plan.POD_LABELS.get(self.pod, self.pod)} {self.port}: {paths.REFUSED}"
        if self.kind == "unreachable":
            return f"{paths.NODE}: no route to {self.to}, unreachable" if self.pod == plan.NODE else \
                f"no route to {self.to}, unreachable"
        if self.kind == "dropped":
            return f"{self.port}: no transparent listener, dropped"
        return self.kind


REFUSED = ("ECONNREFUSED", "Connection refused")
# What the proxy's log says when it closed a connection without dialling, and how the path ends then.
CLOSED = {"blackhole": "blackhole, closed", "no original destination": "no original destination, closed"}


def closed_why(error: str | None) -> str | None:
    return next((words for start, words in CLOSED.items() if error and error.startswith(start)), None)


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
        stopped = line.upstream_local is None or line.upstream_peer is None
        closed = closed_why(line.error) if stopped and not line.loop else None
        found.append(Leg(client, line.original_dst or server, line.listener, loop=line.loop, closed=closed,
                         role=line.role))
        if stopped:
            break
        client, server, error = line.upstream_local, line.upstream_peer, line.error
    return found


def first_packet(events: Iterable[TraceEvent], leg: Leg) -> list[TraceEvent]:
    """The events of the leg's first packet, in the order the kernel emitted them.  A later
    datagram of a UDP flow passes the same rules again (all but nat's), and so does a SYN
    sent again after the first was dropped (its connection was never confirmed, so nat
    judges it again): of each rule only its first event is kept."""
    out, seen = [], set()
    for e in events:
        if e.source != leg.client or not e.opens_flow:
            continue
        key = (e.pod, e.table, e.chain, e.kind, e.rulenum)
        if key in seen:
            continue
        seen.add(key)
        out.append(e)
    return out


def packet(e: TraceEvent) -> Packet:
    return Packet(e.proto, e.source, e.destination)


class Rules:
    """A namespace's rules as applied: each one's line (iptables-save's `-A ...`, or nft's
    rule text), how many each chain holds, where each table and base chain sits (Layout),
    and the built-in chains' policies other than ACCEPT (`policies`: (table, chain) -> DROP)."""

    def __init__(self, lines: dict[RuleRef, str], layout: Layout = Layout(),
                 policies: dict[tuple[str, str], str] | None = None):
        self.lines = lines
        self.layout = layout
        self.counts = Counter(ref.chain_ref for ref in lines)
        self.policies = policies or {}

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

    def tproxy_port(self, ref: RuleRef) -> int:
        """The port a TPROXY rule hands the packet to (`--on-port`, nft's `tproxy to :PORT`), 0 if none."""
        line = self.lines.get(ref, "")
        port = (RuleLine.parse(line).option("--on-port") if line.startswith("-A ")
                else str(nftset.port_to(nftset.words(line), "tproxy") or ""))
        return int(port) if port and port.isdigit() else 0

    def kills(self, e: TraceEvent) -> str | None:
        """"DROP" or "REJECT" when the event's rule (or its chain's policy) ended the packet."""
        if e.kind == "policy" and e.rulenum > self.counts.get(e.rule.chain_ref, 0):
            return "DROP" if self.policies.get(e.rule.chain_ref) == "DROP" else None
        if not self.matched(e):
            return None
        target = self.target(e.rule)
        return target if target in ("DROP", "REJECT") else None

    def hop(self, e: TraceEvent, killer: bool = False) -> Hop | None:
        """The hop a matched rule makes, or None (a built-in chain's jump, a TRACE rule);
        the rule that killed the packet (`killer`) is a hop whatever its table, and a
        policy that did is `OUTPUT POLICY (filter)`."""
        if killer and e.rulenum > self.counts.get(e.rule.chain_ref, 0):
            return Hop(paths.CHAIN, f"{e.chain} POLICY", e.table, None, False, packet(e))
        role = self.plays(e)
        if not self.matched(e) or (role not in PATH_TABLES and not killer):
            return None
        if not killer and self.hook_of(e) and (role == "raw" or self.target(e.rule) not in BUILTIN_TARGETS):
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
             died: Death | None = None, node_first: bool = False) -> list[Hop]:
    """Hops of one leg from its first packet's events in the pod that holds the rules; the
    node's rewrites of it (`node`: its DNAT, a hairpin's masquerade: after the sidecar's
    POSTROUTING, or first when the node saw the packet before the sidecar did,
    `node_first`), and where it died (`died`), if it did: the rule that killed it is a hop
    where it fired (after the exit hook when that was POSTROUTING, prefixed with its
    namespace when not the sidecar's)."""
    syn = first_packet(events, leg)
    killer = died.killer if died is not None else None
    if not syn:  # the sidecar never saw it
        hops = list(node)
        if died is not None and (died.kind != "refused" or died.pod != "sidecar"):
            hops += _death_hops(died, rules, [], killer)
        return hops
    hops = list(node) if node_first else []
    entry = next((rules.hook_of(e) for e in syn if rules.hook_of(e) in ("OUTPUT", "PREROUTING")), syn[0].chain)
    hops.append(rules.hook(entry, syn, syn[0], owner=entry == "OUTPUT"))
    sent = [i for i, e in enumerate(syn) if rules.hook_of(e) == "POSTROUTING"] if entry == "OUTPUT" else []
    out, back = (syn[:sent[0]], syn[sent[-1] + 1:]) if sent else (syn, [])
    hops += [h for e in out if (h := rules.hop(e, killer=e == killer))]
    back_hops = [h for e in back if (h := rules.hop(e, killer=e == killer))]
    if back_hops:
        hops += [rules.hook("POSTROUTING", syn, syn[sent[0]]), rules.hook("PREROUTING", back, back[0])] + back_hops
    if leg.proxy is not None:
        hops.append(Hop(paths.PROXY, paths.proxy_name(leg.proxy, loop=leg.loop, role=leg.role), packet=packet(syn[0])))
        if leg.closed:
            hops.append(Hop(paths.END, leg.closed))
        return hops
    if died is not None and died.kind == "refused" and died.redirected:  # the redirect's port: nothing behind it
        return hops + [Hop(paths.END, died.text())]
    exit_hook = "INPUT" if entry == "PREROUTING" or back_hops else "POSTROUTING"
    last = next((e for e in reversed(syn) if rules.hook_of(e) == exit_hook), None)
    if last is not None:
        hops.append(rules.hook(exit_hook, (), last))
    if not node_first:
        hops += node
    if died is not None:
        hops += _death_hops(died, rules, syn, killer)
    return hops


def _death_hops(died: Death, rules: Rules, syn: Sequence[TraceEvent], killer: TraceEvent | None) -> list[Hop]:
    """The killing rule, where the sidecar's hops did not show it already, then the end."""
    hops = []
    shown = killer is not None and killer.pod == "sidecar" and killer.chain != "POSTROUTING" and killer in syn
    if killer is not None and not shown:
        hop = died_rules(died, rules).hop(killer, killer=True)
        if killer.pod != "sidecar":  # another namespace's rule: say whose
            label = paths.NODE if killer.pod == plan.NODE else plan.POD_LABELS.get(killer.pod, killer.pod)
            hop = dataclasses.replace(hop, name=f"{label}: {hop.name}")
        hops.append(hop)
    return hops + [Hop(paths.END, died.text())]


def died_rules(died: Death, rules: Rules) -> Rules:
    """The rules of the namespace the killer fired in (the sidecar's unless the Death says)."""
    return died.rules if died.rules is not None else rules


def path(source: str, destination: str, found: list[Leg], events: Sequence[TraceEvent], rules: Rules,
         node: Sequence[Hop] = (), died: Death | None = None, delivered: Packet | None = None,
         again: Sequence[Leg] = (), node_before: Sequence[Hop] = ()) -> Path:
    """The whole path; when the last leg ends at a proxy that answered itself (a DNS name in
    pilot-agent's table), that closed it, or that the flow looped back into, that proxy is
    where the path ends; when the last leg died, the place it died is.  `node`: the node's
    rewrites of the last leg sent out of the sidecar (node_hops), `delivered` the packet the
    node sent on after them (node_exit); `node_before`: its rewrites of the first leg before
    the sidecar saw it (a flow from another pod to a VIP); `again`: the legs of a flow the
    node sent back into the sidecar pod (a pod's own Service, hairpinned), which go on after
    the node's hops."""
    hops = [Hop(paths.ENDPOINT, source)]
    every = [*found, *again]
    for i, leg in enumerate(every):
        first = bool(node_before) and i == 0
        rewrites = node_before if first else node if leg is found[-1] else ()
        hops += leg_hops(events, leg, rules, rewrites, died if i == len(every) - 1 else None, node_first=first)
    last = every[-1] if every else None
    ended = hops[-1].kind == paths.END or (last is not None and last.proxy is not None and hops[-1].kind == paths.PROXY)
    if not ended:  # after the node's DNAT, the packet the endpoint got is the rewritten one
        hops.append(Hop(paths.ENDPOINT, destination, packet=delivered if node and not again else None))
    return paths.of(hops)


def node_hops(events: Sequence[TraceEvent], leg: Leg, rules: Rules) -> list[Hop]:
    """The node's rules that rewrote the leg's first packet: its DNAT (kube-proxy's KUBE-SEP
    rule) and, for a pod calling its own Service, the masquerade; from the node's TRACE
    events and rules.  Empty when the node rewrote nothing."""
    return [Hop(paths.CHAIN, e.chain, "nat", e.rulenum, rules.counts.get(e.rule.chain_ref, 2) > 1, packet(e),
                rules.lines.get(e.rule, ""), where=plan.NODE)
            for e in first_packet(events, leg)
            if rules.matched(e) and e.table == "nat" and rules.target(e.rule) in paths.NODE_REWRITES]


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


class Routes:
    """A namespace's routes (its main table, as prefixes): whether it could route an address."""

    def __init__(self, prefixes: Iterable[str]):
        self.networks = [ipaddress.ip_network(p, strict=False) for p in prefixes]

    def route(self, address: str) -> bool:
        ip = ipaddress.ip_address(address)
        return any(ip.version == n.version and ip in n for n in self.networks)


def death(events: Sequence[TraceEvent], leg: Leg, rules: dict[str, Rules], error: str | None,
          node_routes: Routes | None = None) -> Death | None:
    """Where the leg died, when its dialer failed (`error`: the client's, or the proxy's that
    dialed it), from its first packet's TRACE events in every pod (`rules`: each pod's rules
    that TRACE names, the sidecar's and the node's):
      - a rule (or a built-in chain's policy) that dropped or rejected it;
      - a TPROXY rule after which it went nowhere: no transparent socket took it;
      - delivered to a pod's port with no listener (the dialer was refused, or TRACE saw the
        kernel's reset, or no SYN-ACK: a dialer using another's address may hear nothing);
      - seen by the node, which forwarded it nowhere and has no route to its destination.
    None when none of these explains the failure."""
    if not error:
        return None
    syn = first_packet(events, leg)
    for e in syn:
        own = rules.get(e.pod)
        kind = own.kills(e) if own is not None else None
        if kind:
            return Death(e.pod, e.dport or 0, kind=kind, killer=e, rules=own)
    delivered = reached(events, leg)
    sidecar = rules.get("sidecar", Rules({}))
    if delivered is None:
        mine = [e for e in syn if e.pod == "sidecar"]
        if mine and sidecar.matched(mine[-1]) and sidecar.target(mine[-1].rule) == "TPROXY":
            return Death("sidecar", sidecar.tproxy_port(mine[-1].rule), kind="dropped", killer=mine[-1])
    if delivered is not None:
        if not any(word in error for word in REFUSED) and not _no_socket(events, leg, delivered[1]):
            return None
        pod, address = delivered
        redirected = pod == "sidecar" and any(
            sidecar.target(e.rule) in ("REDIRECT", "TPROXY") for e in syn
            if e.pod == "sidecar" and sidecar.matched(e) and sidecar.plays(e) in PATH_TABLES)
        return Death(pod, address.port, redirected)
    at_node = [e for e in syn if e.pod == plan.NODE]
    if at_node and node_routes is not None and not any(e.chain in ("INPUT", "FORWARD", "POSTROUTING") for e in at_node):
        node = rules.get(plan.NODE, Rules({}))
        to = at_node[-1].dst
        for e in at_node:  # the node's DNAT rewrote it before its routing decision
            if node.matched(e) and node.target(e.rule) == "DNAT":
                to = _dnat_address(node.lines[e.rule]) or to
        if not node_routes.route(to):
            return Death(plan.NODE, at_node[-1].dport or 0, kind="unreachable", to=to)
    return None


def _no_socket(events: Sequence[TraceEvent], leg: Leg, at: Address) -> bool:
    """Did no socket take the leg's SYN where it was delivered?  The kernel answered it with a
    reset, or with nothing at all: no SYN-ACK ever left that address for the dialer.  (A
    dialer may never hear the reset: one to a source address it borrowed, TPROXY's
    original_src, is routed to that address's owner, or nowhere.)"""
    back = [e.tcp_flags or "" for e in events if e.source == at and e.destination == leg.client]
    return any("R" in flags for flags in back) or (leg.client.port != 0 and not any(
        "S" in flags and "A" in flags for flags in back) and any(e.proto == "tcp" for e in first_packet(events, leg)))


def _dnat_address(line: str) -> str | None:
    """The address of a DNAT rule's --to-destination (`10.244.0.20:9080`, `[fd00::20]:9080`)."""
    target = RuleLine.parse(line).option("--to-destination")
    if not target:
        return None
    if target.startswith("["):
        return target[1:target.index("]")]
    return target.rsplit(":", 1)[0] if target.count(":") == 1 else target


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
