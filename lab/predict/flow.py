"""A flow, leg by leg: the client's connection, then one per proxy the rules send it through.

Each leg is a new connection with its own first packet, so each is judged by nat afresh.
Its packet is routed by its namespace, walked through the hooks, looped back over lo or
handed to the neighbour on the bridge, until a socket takes it or something ends it.  A
proxy's socket opens the next leg as the lab's stub would; a proxy reached a second time
is a loop, and the walk stops there.
"""

from __future__ import annotations

from dataclasses import dataclass

from .. import plan
from . import inet
from .errors import CannotPredict
from .packet import Owner, Packet
from .proxies import Client, Dial, Stop, closes, relay
from .stack import Death, Delivered, HookPass, OnWire
from .topology import LABELS, Proxy, Topology

MAX_HOPS = 64  # an IPv4 TTL's worth of namespaces
MAX_LEGS = 16


@dataclass(frozen=True)
class Flow:
    """One connection (or a UDP flow's first datagram) to predict, as the lab would fire it."""

    source: str  # the pod it starts in
    address: str  # where it dials, as dialled (a pod IP, a Service VIP, 127.0.0.1, ...)
    port: int
    uid: int = plan.APP_UID
    gid: int = plan.APP_GID
    transport: str = "tcp"  # "tcp" | "udp"
    query: str | None = None  # the DNS name asked, for a flow pilot-agent's DNS proxy may answer
    source_label: str | None = None  # how the path names its ends; by default as traced_request does
    destination_label: str | None = None

    def __post_init__(self) -> None:
        if self.source not in plan.PODS and self.source != plan.VM:
            raise ValueError(f"no pod {self.source!r} (pods: {', '.join(plan.PODS)})")
        if self.transport not in ("tcp", "udp"):
            raise ValueError(f"transport {self.transport!r} is not tcp or udp")
        inet.parse(self.address)  # a ValueError names a bad address

    @property
    def family(self) -> int:
        return inet.family_of(self.address)

    @property
    def labels(self) -> tuple[str, str]:
        """(source, destination): a Service's pod, the pod holding the address, or, for
        anything else (loopback), the source pod itself."""
        service = plan.service_at(self.address, self.port)
        to = service.pod if service else plan.pod_at(self.address) or self.source
        return self.source_label or LABELS[self.source], self.destination_label or LABELS[to]


@dataclass(frozen=True)
class Leg:
    packet: Packet  # its first packet as the client sent it
    passes: tuple[HookPass, ...]  # every hook it crossed, in every namespace, in order
    end: Delivered | Death
    proxy: Proxy | None = None  # the proxy whose socket took it


@dataclass(frozen=True)
class Ending:
    """How the flow ended: "reached" a socket that is no proxy, "answered" or "closed" by a
    proxy, "loop" (sent back into a proxy it had passed), or "died" (the last leg's end)."""

    kind: str
    why: str = ""


@dataclass(frozen=True)
class Walk:
    flow: Flow
    legs: tuple[Leg, ...]
    ending: Ending


def walk(topology: Topology, flow: Flow) -> Walk:
    client = Client(flow.source, Owner(flow.uid, flow.gid))
    dial = Dial(client, flow.family, flow.transport, inet.parse(flow.address)[1], flow.port)
    legs: list[Leg] = []
    passed: set[tuple[str, str]] = set()  # the proxies' sides the flow passed: (process, role)
    while len(legs) < MAX_LEGS:
        leg = _connect(topology, dial)
        legs.append(leg)
        if isinstance(leg.end, Death):
            return Walk(flow, tuple(legs), Ending("died"))
        if leg.proxy is None:
            return Walk(flow, tuple(legs), Ending("reached"))
        side = (leg.proxy.process, leg.proxy.role)
        if side in passed and closes(leg.proxy, leg.end) is None:
            return Walk(flow, tuple(legs), Ending("loop"))
        passed.add(side)
        following = relay(topology, leg.proxy, leg.end, flow.query)
        if isinstance(following, Stop):
            return Walk(flow, tuple(legs), Ending("answered" if following.answered else "closed", following.why))
        dial = following
    raise CannotPredict(f"the flow opened more than {MAX_LEGS} connections")


def _connect(topology: Topology, dial: Dial) -> Leg:
    """One leg: route the client's first packet, then follow it until it is delivered or dies."""
    ns = topology.namespaces[dial.client.namespace]
    c = dial.client
    # the source port is the kernel's to pick (None): no client binds one
    packet = Packet(dial.family, dial.proto, c.address or 0, None, dial.address, dial.port, mark=c.mark, owner=c.owner)
    passes: list[HookPass] = []
    route = ns.route(dial.family, dial.address, c.mark)
    if route is None:
        return Leg(packet, (), Death("unreachable", ns.name, packet,
                                     why=f"no route to {inet.text(dial.family, dial.address)}"))
    source = c.address if c.address is not None else ns.source_for(dial.family, route, dial.address)
    packet = packet.but(src=source)
    if inet.is_loopback(dial.family, source) and not route.local:
        return Leg(packet, (), Death("unreachable", ns.name, packet,
                                     why=f"no route from {inet.text(dial.family, source)} to "
                                         f"{inet.text(dial.family, dial.address)}"))
    arrival = ns.send(packet, route, passes)
    for _ in range(MAX_HOPS):
        if not isinstance(arrival, OnWire):
            break
        p = arrival.packet
        if p.oif == "lo":  # back in, in the same namespace: same mark, same connection, no socket
            arrival = ns.receive(p.but(iif="lo", oif="", owner=None, socket=None), passes)
            continue
        found = topology.neighbour(p.family, arrival.next_hop)
        if found is None:
            arrival = Death("unreachable", ns.name, p, why=f"no host at {inet.text(p.family, arrival.next_hop)}")
            break
        ns, device = found
        fresh = Packet(p.family, p.proto, p.src, p.sport, p.dst, p.dport, iif=device)  # a veth scrubs the rest
        arrival = ns.receive(fresh, passes)
    else:
        raise CannotPredict("the packet went round more than 64 namespaces")
    proxy = topology.proxy(arrival.namespace, arrival.socket, arrival.packet) if isinstance(arrival, Delivered) \
        else None
    return Leg(packet, tuple(passes), arrival, proxy)
