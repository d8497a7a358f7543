"""One network namespace's IP stack, as a flow's first packet meets it.

Each hook runs what the namespace's rule sets registered there, in the kernel's order
(lab.predict.hooks: base chains by priority, conntrack at -200, the nat core at -100 and
100); with the xtables tables alone that is

    sent:      OUTPUT (raw, conntrack, mangle, nat, filter, security) -> POSTROUTING (mangle, nat)
    received:  PREROUTING (raw, conntrack, mangle, nat) -> routing -> INPUT (mangle, filter, security, nat)
               or FORWARD (mangle, filter, security) -> POSTROUTING

What the kernel does between the tables, and predict with it:
  - a local socket's packet is routed before OUTPUT (the route gives -o and the source
    address); a route chain (mangle OUTPUT, nft's `type route`) routes it again if it changed
    the mark or an address, the nat core if it changed the destination (ip_route_me_harder):
    REDIRECT to 127.0.0.1 turns -o eth0 into -o lo for filter and POSTROUTING;
  - nat judges a connection once per direction of manip: a packet whose connection
    already had its destination (or source) settled skips every nat chain for it.  So a
    packet that comes back in over lo, carrying the connection it was sent with, never
    sees nat PREROUTING or nat INPUT, and conntrack does not look it up again;
  - over lo the packet keeps its mark and its connection and loses its socket (no owner
    on the way in); across a veth it loses all three;
  - connections are tracked only in a namespace with a rule that needs it (a NAT or CT
    target, a conntrack match: nf_ct_netns_get); without one, nat is walked by nothing;
  - a packet for this namespace goes to the socket TPROXY assigned, else to the socket
    bound to its destination address and port, else to the wildcard one; none: refused
    (a TCP RST or an ICMP port unreachable).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .. import plan
from . import inet
from .chains import Hit, Policy, TableWalk, walk
from .hooks import DESTINATION_HOOKS, Conntrack, Entry, Hooks, NatCore
from .packet import Connection, Packet, Socket
from .targets import Verdict


@dataclass(frozen=True)
class InterfaceAddress:
    """`ip addr add 10.244.0.10/24 dev eth0`: the address, and the prefix it is on."""

    device: str
    family: int
    address: int
    prefix: int

    @classmethod
    def of(cls, device: str, spec: str) -> "InterfaceAddress":
        address, _, prefix = spec.partition("/")
        family, value = inet.parse(address)
        return cls(device, family, value, int(prefix) if prefix else inet.BITS[family])

    @property
    def network(self) -> inet.Network:
        mask = inet.Network(self.family, 0, self.prefix).mask
        return inet.Network(self.family, self.address & mask, self.prefix)


@dataclass(frozen=True)
class Route:
    network: inet.Network
    device: str
    gateway: int | None = None
    local: bool = False  # a route of type local: delivered here, over lo


@dataclass(frozen=True)
class HookPass:
    """The packet through one hook of one namespace: each table's walk, in order."""

    namespace: str
    hook: str
    packet: Packet  # as it came to the hook
    walks: tuple[TableWalk, ...]  # each base chain it was walked from, in order


@dataclass(frozen=True)
class Death:
    """Where and why a packet ended before a socket took it."""

    kind: str  # "DROP" | "REJECT" | "refused" | "unreachable"
    namespace: str
    packet: Packet
    cause: Hit | Policy | None = None  # the rule or policy that dropped or rejected it
    why: str = ""  # in words: "15006: no transparent listener, dropped", "no route to 10.96.0.90"


@dataclass(frozen=True)
class Delivered:
    namespace: str
    socket: Socket
    packet: Packet


@dataclass(frozen=True)
class OnWire:
    """Out of an interface to a neighbour's address (the next hop)."""

    packet: Packet
    next_hop: int


Arrival = Delivered | Death | OnWire


@dataclass
class Namespace:
    name: str
    addresses: list[InterfaceAddress]
    routes: list[Route]  # the main table
    marked_routes: dict[int, list[Route]] = field(default_factory=dict)  # ip rule fwmark M lookup T
    sockets: list[Socket] = field(default_factory=list)
    hooks: dict[int, Hooks] = field(default_factory=dict)  # family -> what its rule sets registered
    forwarding: bool = False

    # --- addresses and sockets ------------------------------------------------------------

    def is_local(self, family: int, address: int) -> bool:
        """In the local table: an address of ours, or loopback (all of 127/8 over IPv4)."""
        if family == 4 and inet.is_loopback(family, address):
            return True
        return any(a.family == family and a.address == address for a in self.addresses)

    def address_type(self, family: int, address: int, device: str | None = None) -> str:
        if family == 4:
            if address in (0, 0xFFFFFFFF):
                return "BROADCAST"
            if address >> 28 == 0xE:
                return "MULTICAST"
        elif address >> 120 == 0xFF:
            return "MULTICAST"
        mine = [a for a in self.addresses if a.family == family and (device is None or a.device == device)]
        if any(a.address == address for a in mine):
            return "LOCAL"
        if family == 4 and inet.is_loopback(family, address) and device in (None, "lo"):
            return "LOCAL"
        if family == 4 and any(a.prefix < 31 and address == a.address | ~a.network.mask & 0xFFFFFFFF
                               for a in mine):
            return "BROADCAST"
        return "UNICAST"

    def first_address(self, family: int, device: str) -> int | None:
        """The device's primary address (REDIRECT's and TPROXY's choice for an incoming packet)."""
        return next((a.address for a in self.addresses if a.device == device and a.family == family), None)

    def socket_for(self, proto: str, family: int, address: int, port: int) -> Socket | None:
        """The socket a packet to address:port reaches: one bound to that address before a
        wildcard one (the kernel's lookup scores the exact match higher)."""
        fitting = [s for s in self.sockets if s.takes(proto, family, address, port)]
        return min(fitting, key=lambda s: s.address is None, default=None)

    def transparent_socket(self, p: Packet, address: int, port: int) -> Socket | None:
        """The transparent socket TPROXY (iptables' target, nft's `tproxy`) gives the packet: a
        listener on `address`, or on the input device's first address when it is 0 (any), or
        on the packet's destination, at `port` (0: the packet's own); None when there is none
        or it is not transparent."""
        laddr = address or self.first_address(p.family, p.iif) or p.dst
        sock = self.socket_for(p.proto, p.family, laddr, port or p.dport)
        return sock if sock is not None and sock.transparent else None

    # --- routing ---------------------------------------------------------------------------

    def route(self, family: int, dst: int, mark: int = 0) -> Route | None:
        """ip route get: the local table first, then the fwmark rules' tables, then main."""
        if self.is_local(family, dst):
            return Route(inet.Network(family, dst, inet.BITS[family]), "lo", local=True)
        for routes in (self.marked_routes.get(mark, ()), self.routes):
            best = max((rt for rt in routes if rt.network.family == family and dst in rt.network),
                       key=lambda rt: rt.network.prefix, default=None)
            if best is not None:
                return best
        return None

    def source_for(self, family: int, route: Route, dst: int) -> int:
        """The source address a socket that did not bind gets: a local route's own address
        (127.0.0.1 for the rest of 127/8, the destination for a route with no preferred
        source), else the output device's address."""
        if route.local:
            if inet.is_loopback(family, dst):
                return inet.parse(plan.LOCALHOST[family])[1]
            return dst
        return self.first_address(family, route.device) or dst

    # --- the hooks -------------------------------------------------------------------------

    def send(self, p: Packet, route: Route, passes: list[HookPass]) -> Arrival:
        """A locally generated packet, already routed (`route`), from OUTPUT out of the namespace."""
        p = p.but(oif=route.device)
        p, route, death = self._hook("OUTPUT", p, passes, route)
        if death:
            return death
        return self._post(p, route, passes)

    def receive(self, p: Packet, passes: list[HookPass]) -> Arrival:
        """A packet come in on p.iif: PREROUTING, the routing decision, then INPUT or FORWARD."""
        p, _, death = self._hook("PREROUTING", p, passes)
        if death:
            return death
        if self.is_local(p.family, p.dst) or self._marked_local(p):
            p, _, death = self._hook("INPUT", p, passes)
            if death:
                return death
            sock = p.socket or self.socket_for(p.proto, p.family, p.dst, p.dport)
            if sock is None:
                return Death("refused", self.name, p, why="no listener")
            return Delivered(self.name, sock, p)
        if not self.forwarding:
            return Death("DROP", self.name, p, why="not addressed here, and not forwarded")
        route = self.route(p.family, p.dst, p.mark)
        if route is None:
            return Death("unreachable", self.name, p, why=f"no route to {inet.text(p.family, p.dst)}")
        p = p.but(oif=route.device)
        p, _, death = self._hook("FORWARD", p, passes)
        if death:
            return death
        return self._post(p, route, passes)

    def _marked_local(self, p: Packet) -> bool:
        return any(rt.local for rt in self.marked_routes.get(p.mark, ()))

    def _post(self, p: Packet, route: Route, passes: list[HookPass]) -> Arrival:
        p, _, death = self._hook("POSTROUTING", p, passes)
        if death:
            return death
        return OnWire(p, route.gateway if route.gateway is not None else p.dst)

    def _hook(self, hook: str, p: Packet, passes: list[HookPass], route: Route | None = None):
        """Every chain registered at the hook, in the kernel's order; (packet, route, death)."""
        entering, walks = p, []
        registered = self.hooks.get(p.family)
        for step in registered.at(hook) if registered else ():
            if isinstance(step, Conntrack):
                p = self._track(p)
                continue
            before = p
            if isinstance(step, NatCore):
                if self._nat_settled(p, hook):
                    continue
                for entry in step.entries:
                    p, death = self._walk(entry, p, walks)
                    if death:
                        passes.append(HookPass(self.name, hook, entering, tuple(walks)))
                        return p, route, death
                    if self._nat_settled(p, hook):
                        break  # translated: no other nat chain judges this connection
                p = self._settle(p, hook)
                moved = p.dst != before.dst
            else:
                p, death = self._walk(step, p, walks)
                if death:
                    passes.append(HookPass(self.name, hook, entering, tuple(walks)))
                    return p, route, death
                moved = step.base.kind == "route" and (p.mark, p.dst, p.src) != (before.mark, before.dst, before.src)
            if hook == "OUTPUT" and moved:
                route = self.route(p.family, p.dst, p.mark)
                if route is None:
                    passes.append(HookPass(self.name, hook, entering, tuple(walks)))
                    return p, None, Death("unreachable", self.name, p, why=f"no route to {inet.text(p.family, p.dst)}")
                p = p.but(oif=route.device)
        passes.append(HookPass(self.name, hook, entering, tuple(walks)))
        return p, route, None

    def _walk(self, entry: Entry, p: Packet, walks: list[TableWalk]) -> tuple[Packet, "Death | None"]:
        result = walk(entry.table, entry.base, p, self)
        walks.append(result)
        if result.verdict is Verdict.ACCEPT:
            return result.packet, None
        kind = "REJECT" if result.verdict is Verdict.REJECT else "DROP"
        return result.packet, Death(kind, self.name, result.packet, result.killer, result.why)

    def _track(self, p: Packet) -> Packet:
        """conntrack: a packet that already has its entry (back over lo) or is untracked keeps
        that; any other is a new connection, in the zone of its CT template, where some rule
        of the namespace makes the kernel track connections (else none is tracked)."""
        if p.conn is not None or p.untracked:
            return p
        registered = self.hooks.get(p.family)
        if registered is None or not registered.tracks_connections:
            return p
        zone = p.zone_template or 0
        return p.but(conn=Connection(zone, p.dst, p.dport), zone_template=None)

    @staticmethod
    def _nat_settled(p: Packet, hook: str) -> bool:
        if p.conn is None:
            return True  # untracked: nat never sees it
        return p.conn.dst_manip_done if hook in DESTINATION_HOOKS else p.conn.src_manip_done

    @staticmethod
    def _settle(p: Packet, hook: str) -> Packet:
        """After nat's chains the manip is settled, by a rule or as a null binding."""
        if hook in DESTINATION_HOOKS:
            return p.but(conn=p.conn._replace(dst_manip_done=True))
        return p.but(conn=p.conn._replace(src_manip_done=True))
