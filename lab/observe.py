"""Fire one flow in a lab and keep what the witnesses saw: the Observation, raw evidence that
can be judged again offline.

The witnesses: TRACE events from every pod (a reader per pod for the lab's life, TRACE rules
per flow in the pods it crosses, for its ports only), the sidecar's rule counters before and
after, and the proxies' logs.  Nothing here decides anything; lab.measure does.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno as errno_module
import socket
from dataclasses import dataclass

from . import interrupts, plan, processes, proxylogs, traffic
from .addr import Address
from .backend import Backend, Reader, TracedPorts
from .netfilter import Layout, RuleRef
from .proxylogs import ProxyLine
from .rules import kubeproxy
from .scenario import Traffic
from .trace import TraceEvent
from .traffic import Response
from .world import Lab, ipr


DEATH_GRACE = 0.05  # seconds a failed flow waits to see whether a lab process died under it


def witnessed(ref: RuleRef, layout: Layout = Layout()) -> bool:
    """Is this rule's counter checked against TRACE's events?  nat's and mangle's rules, and
    the raw table's own chains (DNS capture's conntrack zones); raw's built-in chains hold
    legacy's TRACE rules themselves, and see every packet (an nft raw table's base chains
    too).  `layout` says which part an nf_tables table of its own plays."""
    role = layout.role(ref.table)
    return role in ("nat", "mangle") or role == "raw" and layout.hook(ref.table, ref.chain) is None


def exact(ref: RuleRef, layout: Layout = Layout()) -> bool:
    """Must this rule's counter equal its TRACE events, or only cover them?

    nat judges a connection's first packet only, and raw's zone rules see the flow's
    datagrams only, so theirs must be equal.  mangle sees every packet of every connection
    in the pod, and a connection's last ACK may pass after its events were read: its
    counter must have moved by at least as many packets as TRACE reported, never fewer.
    """
    return layout.role(ref.table) != "mangle"


@dataclass(frozen=True)
class TracePlan:
    """Which packets a flow's trace rules mark: in which pods, to or from which ports."""

    pods: tuple[str, ...]  # the pod whose rules decide the path, and the one that shows where it ends
    ports: TracedPorts  # the flow's own, the proxies', a Service's target port; a UDP query's


def trace_plan(flow: Traffic) -> TracePlan:
    ports = {flow.to.port, plan.Port.OUTBOUND, plan.Port.INBOUND}
    service = plan.service_at(flow.to.ip, flow.to.port)
    ports |= {service.target_port} if service else set()
    if flow.protocol == "dns":
        ports.add(plan.Port.DNS_PROXY)
    udp = tuple(sorted({flow.to.port, plan.Port.DNS_PROXY} | ({service.target_port} if service else set()))) \
        if flow.transport == "udp" else ()
    pods = ["sidecar", flow.endpoint_pod]
    pods += [pod for pod, vips in plan.HELD_VIPS.items() if flow.to.ip in vips]  # a VIP a pod holds itself
    if service and service in kubeproxy.dnatted() or plan.pod_at(flow.to.ip) is None and not _loopback(flow.to.ip):
        pods.append(plan.NODE)  # a VIP Envoy does not take is DNATed there; an address no pod holds dies there
    return TracePlan(tuple(dict.fromkeys(pods)), TracedPorts(tuple(sorted(ports)), udp))


def _loopback(ip: str) -> bool:
    return ip == "::1" or ip.startswith("127.")


def routes(ns: str, families: tuple[int, ...]) -> tuple[str, ...]:
    """The namespace's main routing table, as prefixes (what it can forward to)."""
    out = []
    with ipr(ns) as sock:
        for family in families:
            for route in sock.get_routes(family=socket.AF_INET6 if family == 6 else socket.AF_INET, table=254):
                dst = route.get_attr("RTA_DST") or ("::" if family == 6 else "0.0.0.0")
                out.append(f"{dst}/{route['dst_len']}")
    return tuple(out)


class Witnesses:
    """Trace readers on every pod for the lab's life, trace rules per flow, the sidecar's
    rules and their counters, through the lab's backend.

    In a dual-stack lab the same for IPv6: IPv6 tables made to exist in every pod, the
    sidecar's IPv6 rules read, and an IPv6 flow's trace rules for IPv6.
    """

    def __init__(self, lab: Lab, backend: Backend):
        self.lab, self.backend = lab, backend
        self.readers: list[Reader] = []
        families = (4, 6) if lab.ipv6 else (4,)
        sidecar = lab.pod("sidecar").ns
        # Every table's rules (filter's too: a rule there may drop a flow) and where each table
        # sits, and the built-in chains' policies other than ACCEPT.
        self.rules: dict[int, dict[RuleRef, str]] = {}
        self.layouts: dict[int, Layout] = {}
        for f in families:
            self.rules[f], self.layouts[f] = backend.rules(sidecar, f)
        self.policies = {f: backend.policies(sidecar, f) for f in families}
        # Only tables holding a witnessed rule are read per flow: a table read costs a
        # handle, and the default profile has rules in nat alone.
        self.counted_tables = {f: tuple(dict.fromkeys(r.table for r in rules if witnessed(r, self.layouts[f])))
                               for f, rules in self.rules.items()}
        # The node's kube-proxy rules: a VIP's DNAT there is a hop of the path (read, not counted).
        self.node_rules = {f: {r.ref: r.line for r in backend.listing(lab.node, "nat", f)} for f in families}
        self.node_routes = routes(lab.node, families)  # a flow the node cannot route dies there
        try:
            for pod in lab.pods.values():
                for family in families:
                    backend.prepare(pod.ns, family)
                self.readers.append(backend.reader(pod.ns, pod.name))
            for family in families:
                backend.prepare(lab.node, family)
            self.readers.append(backend.reader(lab.node, plan.NODE))
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        for reader in self.readers:
            reader.close()
        self.readers = []

    def counters(self, family: int) -> dict[RuleRef, int]:
        sidecar = self.lab.pod("sidecar").ns
        return {ref: n for ref, n in self.backend.counters(sidecar, self.counted_tables[family], family).items()
                if witnessed(ref, self.layouts[family])}

    @contextlib.contextmanager
    def tracing(self, chosen: TracePlan, family: int):
        """Trace rules for the flow's ports in the plan's pods (and the node); removed after."""
        with self.backend.tracing([self.lab.namespace(pod) for pod in chosen.pods], chosen.ports, family):
            for reader in self.readers:
                reader.drain(settle=0)  # whatever came before belongs to no flow
            yield

    def events(self) -> dict[str, list[TraceEvent]]:
        """Everything queued now.  No settle window is needed: every leg's first packet has
        been through every hook before the client gets its answer, and only those make
        hops; a straggling final ACK is discarded by the next flow's tracing()."""
        return {reader.pod: reader.drain(settle=0) for reader in self.readers}


@dataclass
class Observation:
    """What the witnesses saw of one flow: enough to judge it again offline."""

    response: Response  # the client's answer; its local address is the first leg's client
    events: dict[str, list[TraceEvent]]  # pod -> TRACE events
    counters_before: dict[RuleRef, int]
    counters_after: dict[RuleRef, int]
    rules: dict[RuleRef, str]  # the sidecar's rules as applied, in iptables-save form
    proxy_lines: list[ProxyLine]  # this flow's lines of Envoy's access log and pilot-agent's DNS log
    sender: plan.Identity  # who the flow was sent as
    sidecar: plan.Identity  # who Envoy and pilot-agent run as
    error: str | None = None  # what the client was told when the flow died ("ECONNREFUSED: ..."), else None
    node_rules: dict[RuleRef, str] = dataclasses.field(default_factory=dict)  # the node's nat rules
    layout: Layout = Layout()  # where the sidecar's nf_tables tables sit (none for xtables' own names)
    policies: dict[tuple[str, str], str] = dataclasses.field(default_factory=dict)  # the sidecar's, not ACCEPT
    node_routes: tuple[str, ...] | None = None  # the node's main routing table (None: not read)

    def as_json(self) -> dict:
        """The recorded form (tests/data): rule references and addresses as text."""
        return {
            "response": {"status": self.response.status, "body": self.response.body,
                         "local": str(self.response.local), "peer": str(self.response.peer)},
            "events": {pod: [dataclasses.asdict(e) for e in events] for pod, events in self.events.items()},
            "counters_before": {str(ref): n for ref, n in self.counters_before.items()},
            "counters_after": {str(ref): n for ref, n in self.counters_after.items()},
            "rules": {str(ref): line for ref, line in self.rules.items()},
            "proxy_lines": [line.as_json() for line in self.proxy_lines],
            "sender": [self.sender.uid, self.sender.gid, list(self.sender.capabilities)],
            "sidecar": [self.sidecar.uid, self.sidecar.gid, list(self.sidecar.capabilities)],
            **({"error": self.error} if self.error else {}),
            **({"node_rules": {str(ref): line for ref, line in self.node_rules.items()}} if self.node_rules else {}),
            **({"layout": self.layout.as_json()} if self.layout != Layout() else {}),
            **({"policies": {f"{t}:{c}": p for (t, c), p in self.policies.items()}} if self.policies else {}),
            **({"node_routes": list(self.node_routes)} if self.node_routes is not None else {}),
        }

    @classmethod
    def from_json(cls, data: dict) -> "Observation":
        response = data["response"]
        return cls(
            Response(response["status"], response["body"], Address.parse(response["local"]),
                     Address.parse(response["peer"])),
            {pod: [TraceEvent(**e) for e in events] for pod, events in data["events"].items()},
            {RuleRef.parse(ref): n for ref, n in data["counters_before"].items()},
            {RuleRef.parse(ref): n for ref, n in data["counters_after"].items()},
            {RuleRef.parse(ref): line for ref, line in data["rules"].items()},
            [ProxyLine.from_json(line) for line in data["proxy_lines"]],
            plan.Identity(data["sender"][0], data["sender"][1], tuple(data["sender"][2])),
            plan.Identity(data["sidecar"][0], data["sidecar"][1], tuple(data["sidecar"][2])),
            data.get("error"),
            {RuleRef.parse(ref): line for ref, line in data.get("node_rules", {}).items()},
            Layout.from_json(data.get("layout", {})),
            {tuple(k.split(":", 1)): p for k, p in data.get("policies", {}).items()},
            tuple(data["node_routes"]) if "node_routes" in data else None,
        )


def fire(lab: Lab, flow: Traffic) -> Response:
    """Send the flow: as its source's identity from its pod, or by making the real
    pilot-agent re-dial istiod."""
    if flow.trigger == "pilot-agent-redial":
        return Response(0, "", traffic.redial_istiod(lab, family=flow.family), flow.to)
    who = flow.source.identity(lab.record.inbound_mode, lab.sidecar_identity)
    ns = lab.pod(flow.source.pod).ns
    if flow.protocol == "dns":
        return traffic.dns_query(ns, flow.to.ip, flow.to.port, flow.query, transport=flow.transport,
                                 uid=who.uid, gid=who.gid, timeout=flow.timeout)
    if flow.protocol == "udp":
        return traffic.datagram(ns, flow.to.ip, flow.to.port, uid=who.uid, gid=who.gid, timeout=flow.timeout)
    send = traffic.request if flow.protocol == "http" else traffic.stream
    return send(ns, flow.to.ip, flow.to.port, uid=who.uid, gid=who.gid, timeout=flow.timeout)


def observe(lab: Lab, witnesses: Witnesses, flow: Traffic) -> Observation:
    """Fire the flow with TRACE on for it; raises LabError (a RequestError, or ProcessDied
    when a lab process died) when it could not be measured."""
    interrupts.check()
    processes.check_alive(lab)
    with witnesses.tracing(trace_plan(flow), flow.family):
        before = witnesses.counters(flow.family)
        # This flow's lines only: legs are joined by address, and a port used again (another
        # flow's connection, earlier) would join a stale leg.
        logged = proxylogs.marks(lab.run_dir)
        error = None
        try:
            response = fire(lab, flow)
        except traffic.RequestError as e:
            processes.check_alive(lab, grace=DEATH_GRACE)  # a dead proxy is the better answer than "refused"
            if e.local is None:  # nothing was sent: nothing to measure
                raise
            response, error = Response(0, "", e.local, e.peer), died(e)  # sent, and it died: measured all the same
        events = witnesses.events()
        after = witnesses.counters(flow.family)
    processes.check_alive(lab)
    return Observation(response, events, before, after, witnesses.rules[flow.family],
                       proxylogs.proxy_lines(lab.run_dir, since=logged),
                       flow.source.identity(lab.record.inbound_mode, lab.sidecar_identity), lab.sidecar_identity,
                       error, witnesses.node_rules[flow.family], witnesses.layouts[flow.family],
                       witnesses.policies[flow.family], witnesses.node_routes)


def died(e: traffic.RequestError) -> str:
    """What the client was told, as `ECONNREFUSED: <the message>` (the errno's name first)."""
    name = errno_module.errorcode.get(e.errno, "") if e.errno else ""
    return f"{name}: {e}" if name else str(e)
