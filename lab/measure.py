"""From an Observation to a Measurement: what the kernel did with one flow, as typed facts.

The path comes from the TRACE events and the proxies' logs (lab.join); the counters are
the second witness: every rule TRACE saw must have moved its counter by as many packets
(nat, raw) or at least as many (mangle: lab.observe.exact), and no witnessed counter may
move without TRACE seeing it.  A pure function, so recorded runs are measured again offline.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

from . import join, plan
from .addr import Address
from .join import Leg
from .netfilter import Layout, RuleRef
from .observe import Observation, exact, witnessed
from .path import Path
from .proxylogs import ProxyLine
from .scenario import Traffic
from .trace import TraceEvent
from .traffic import Response


@dataclass(frozen=True)
class Reached:
    """Where the flow's last leg was delivered: the pod, and the address it arrived at."""

    pod: str
    address: Address


@dataclass(frozen=True)
class Measurement:
    legs: tuple[Leg, ...]
    path: Path
    rule_hits: tuple[RuleRef, ...]  # the nat rules each leg's first packet matched, in order
    counters: dict[RuleRef, int]  # packets each witnessed rule's counter moved during the flow (moved only)
    trace_counts: dict[RuleRef, int]  # TRACE `rule` events of each witnessed rule in the sidecar
    rules: dict[RuleRef, str]  # the sidecar's rules as applied
    reached: Reached | None  # None: the last leg's first packet reached INPUT in no pod
    response: Response
    events: tuple[TraceEvent, ...]  # every pod's
    proxy_lines: tuple[ProxyLine, ...]  # the proxies' log lines the legs were joined from
    sender: plan.Identity
    sidecar: plan.Identity
    ending: str = "reached"  # "reached", or how the path ends otherwise: "died", "closed" (by a proxy), "loop"
    error: str | None = None  # what the client was told when the flow failed
    layout: Layout = Layout()  # where the sidecar's nf_tables tables sit (netfilter.Layout)
    transport: str = "tcp"  # "udp": a datagram delivered to a socket is a path, answered or not

    @property
    def disagreements(self) -> list[RuleRef]:
        """Rules whose counter and TRACE events do not tell the same story."""
        out = []
        for ref in dict.fromkeys([*self.counters, *self.trace_counts]):
            moved, seen = self.counters.get(ref, 0), self.trace_counts.get(ref, 0)
            if moved != seen if exact(ref, self.layout) else moved < seen:
                out.append(ref)
        return out

    @property
    def counters_agree(self) -> bool:
        return not self.disagreements


# The sidecar pod's own addresses: a leg from any other left another pod.
SIDECAR_ADDRESSES = {plan.PODS["sidecar"], plan.PODS6["sidecar"], plan.LOCALHOST[6], plan.INBOUND_PASSTHROUGH_SOURCE6}


def _client(local: Address, events: list[TraceEvent]) -> Address:
    """The client's address: a connect that failed may leave only the wildcard it was bound to,
    and then its SYN's events tell the address it was sent from."""
    if local.ip not in plan.WILDCARD.values():
        return local
    return next((e.source for e in events if e.opens_flow and e.sport == local.port and e.source), local)


def measure(flow: Traffic, seen: Observation) -> Measurement:
    before, after = seen.counters_before, seen.counters_after
    moved = {ref: n - before.get(ref, 0) for ref, n in after.items() if n != before.get(ref, 0)}
    sidecar = seen.events.get("sidecar", [])
    rules = join.Rules(seen.rules, seen.layout, seen.policies)
    traced = Counter(e.rule for e in sidecar if rules.matched(e) and witnessed(e.rule, seen.layout))
    everywhere = [e for events in seen.events.values() for e in events]
    client = _client(seen.response.local, everywhere)
    node_rules, node_events = join.Rules(seen.node_rules), seen.events.get(plan.NODE, [])
    # A flow from another pod to a VIP is rewritten by the node before the sidecar sees it: the
    # proxies' logs name the address the node sent it on to.
    outside = client.ip not in SIDECAR_ADDRESSES and not client.ip.startswith("127.")
    node_before = join.node_hops(node_events, join.Leg(client, flow.to), node_rules) if outside else []
    rewritten = join.node_exit(node_events, join.Leg(client, flow.to)) if node_before else None
    legs = join.legs(client, rewritten.dst if rewritten else flow.to, seen.proxy_lines)
    sent = legs[-1]
    node = join.node_hops(node_events, sent, node_rules) if sent.proxy is None and not (outside and sent is legs[0]) \
        else []
    delivered = join.node_exit(node_events, sent) if node else None
    again = []  # the node sent it back into the sidecar pod (hairpin): its legs go on there
    if delivered is not None and plan.pod_at(delivered.dst.ip) == "sidecar":
        alias = join.masqueraded(node_events, sent, node_rules) or sent.client
        again = join.legs(alias, delivered.dst, seen.proxy_lines)
    every = legs + again
    last = every[-1]
    found = join.reached(everywhere, last, None if again else join.masqueraded(node_events, last, node_rules))
    # The last leg's dialer: the client, or the proxy that opened it (its log says how it failed,
    # whatever the client was told after: a stream the proxy closed ends cleanly).
    failed = seen.error if last is legs[0] or again and last is again[0] else last.error
    routes = join.Routes(seen.node_routes) if seen.node_routes is not None else None
    died = join.death(everywhere, last, {"sidecar": rules, plan.NODE: node_rules}, failed, routes) \
        if last.proxy is None else None
    ending = "loop" if last.proxy is not None and last.loop else "closed" if last.proxy is not None and last.closed \
        else "died" if died else "reached"
    return Measurement(
        legs=tuple(every),
        path=join.path(flow.source.label, flow.label, legs, sidecar, rules, node, died, delivered, again, node_before),
        rule_hits=tuple(join.rule_hits(sidecar, every, rules)),
        counters=moved,
        trace_counts=dict(traced),
        rules=seen.rules,
        reached=Reached(*found) if found else None,
        response=seen.response,
        events=tuple(everywhere),
        proxy_lines=tuple(seen.proxy_lines),
        sender=seen.sender,
        sidecar=seen.sidecar,
        ending=ending,
        error=seen.error,
        layout=seen.layout,
        transport=flow.transport,
    )
