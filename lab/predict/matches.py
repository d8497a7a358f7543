"""What each match of a rule tests, as the kernel tests it on a flow's first packet.

One class per condition.  Each answers three questions: does this packet match
(`test`), what the rule asks for, written as the rule writes it (`needs`), and what
the packet has instead (`has`), so a rule the packet passed can say why in words.

The IP header part of a rule (-s, -d, -i, -o, -p, -f) is tested first, in that order
(ip_packet_match); then the -m matches in the order the rule lists them, the first
that fails ending the rule.  A module that holds several options (-m owner --uid-owner
1337 --gid-owner 1337) is their AND; each option is a condition here, which is the
kernel's answer too, including for a packet with no socket: xt_owner then matches only
if every option is negated ((match ^ invert) == 0).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from . import inet
from .errors import CannotPredict
from .packet import EPHEMERAL_PORTS, Packet

if TYPE_CHECKING:
    from .stack import Namespace

PROTOCOLS = {"tcp": 6, "udp": 17, "icmp": 1, "ipv6-icmp": 58, "icmpv6": 58, "sctp": 132, "udplite": 136,
             "dccp": 33, "gre": 47, "esp": 50, "ah": 51}


class Match:
    """One condition of a rule."""

    __slots__ = ("negated", "option")

    def __init__(self, option: str, negated: bool = False):
        self.option = option  # as the rule writes it, without the "!"
        self.negated = negated

    def test(self, p: Packet, ns: "Namespace") -> bool:
        return self.holds(p, ns) != self.negated

    def holds(self, p: Packet, ns: "Namespace") -> bool:
        raise NotImplementedError

    def needs(self) -> str:
        return f"! {self.option}" if self.negated else self.option

    def has(self, p: Packet, ns: "Namespace") -> str:
        raise NotImplementedError

    def index(self) -> tuple[tuple, tuple[int, ...]] | None:
        """(key, values) a chain's index files the rule under, when this condition holds only for
        packets with one of these values (lab.predict.chains reads a packet's value per key)."""
        return None

    def may_refuse(self) -> bool:
        """Could testing it say CannotPredict for some packet?  A chain's index never files a rule
        by a condition after such a one: the packets it skipped would have been refused."""
        return False


def prefix_index(which: str, nets) -> tuple[tuple, tuple[int, ...]] | None:
    """A destination ("dst") or source prefix's key, for networks of one family and length."""
    kinds = {(n.family, n.prefix) for n in nets}
    if len(kinds) != 1 or not next(iter(kinds))[1]:
        return None
    family, prefix = next(iter(kinds))
    return ("prefix", which, family, prefix), tuple(n.net for n in nets)


def ports_index(ranges: "PortRanges") -> tuple[tuple, tuple[int, ...]] | None:
    """Destination ports, or the 256-port blocks their ranges touch (16 at most)."""
    if all(low == high for low, high in ranges):
        return ("port",), tuple(low for low, _ in ranges)
    blocks = {b for low, high in ranges for b in range(low >> PORT_BLOCK, (high >> PORT_BLOCK) + 1)}
    return (("block",), tuple(sorted(blocks))) if len(blocks) <= 16 else None


PORT_BLOCK = 8  # a port range is indexed under each 256-port block it touches


# --- the IP header part ---------------------------------------------------------------

class Address(Match):
    """-s 127.0.0.6/32 (flag "-s": the source) or -d 10.96.0.0/16 ("-d": the destination)."""

    __slots__ = ("source", "net")

    def __init__(self, flag: str, net: inet.Network, negated: bool = False):
        super().__init__(f"{flag} {net}", negated)
        self.source = flag == "-s"
        self.net = net

    def address(self, p: Packet) -> int:
        return p.src if self.source else p.dst

    def holds(self, p, ns):
        return self.address(p) in self.net

    def has(self, p, ns):
        return f"the {'source' if self.source else 'destination'} is {inet.text(p.family, self.address(p))}"

    def index(self):
        return prefix_index("src" if self.source else "dst", (self.net,))


class Interface(Match):
    """-i/-o: a name, or a prefix ending in "+" (eth+).  A locally generated packet has no input
    interface and an incoming one no output interface: the kernel compares "" then."""

    __slots__ = ("flag", "name", "prefix")

    def __init__(self, flag: str, name: str, negated: bool = False):
        super().__init__(f"{flag} {name}", negated)
        self.flag = flag
        self.prefix = name.endswith("+")
        self.name = name[:-1] if self.prefix else name

    def device(self, p: Packet) -> str:
        return p.iif if self.flag == "-i" else p.oif

    def holds(self, p, ns):
        dev = self.device(p)
        return dev.startswith(self.name) if self.prefix else dev == self.name

    def has(self, p, ns):
        dev = self.device(p)
        if self.flag == "-i":
            return f"this packet came in on {dev}" if dev else "a locally generated packet has no input interface"
        return f"this packet leaves by {dev}" if dev else "an incoming packet has no output interface here"


class Protocol(Match):
    __slots__ = ("number",)

    def __init__(self, name: str, negated: bool = False):
        super().__init__(f"-p {name}", negated)
        number = PROTOCOLS.get(name.lower(), name)
        try:
            self.number = int(number)
        except ValueError:
            raise CannotPredict(f"-p {name} is not a protocol iptables knows") from None

    def holds(self, p, ns):
        return PROTOCOLS[p.proto] == self.number

    def has(self, p, ns):
        return f"this packet is {p.proto.upper()}"


class Fragment(Match):
    """-f: a second or later fragment.  A first packet is never one."""

    __slots__ = ()

    def __init__(self, negated: bool = False):
        super().__init__("-f", negated)

    def holds(self, p, ns):
        return False

    def has(self, p, ns):
        return "a connection's first packet is not a later fragment"


# --- ports: tcp, udp, multiport -----------------------------------------------------------

PortRanges = tuple[tuple[int, int], ...]


def port_ranges(text: str, through: str = ":") -> PortRanges:
    """"53", "1024:65535", ":1023", "53,15008,1000:2000" as (low, high) pairs (nft writes a
    range 1000-2000: `through` "-")."""
    out = []
    for part in text.split(","):
        low, colon, high = part.partition(through)
        try:
            out.append((int(low or 0), int(high or 65535)) if colon else (int(low),) * 2)
        except ValueError:
            raise CannotPredict(f"{text!r} is not a port, a range or a list of them") from None
    return tuple(out)


def _in(port: int, ranges: PortRanges) -> bool:
    return any(low <= port <= high for low, high in ranges)


def splits_ephemeral(ranges: PortRanges) -> bool:
    """Do the ranges hold part of ip_local_port_range, neither all of it nor none?"""
    low, high = EPHEMERAL_PORTS
    return not any(a <= low and high <= b for a, b in ranges) and not all(b < low or a > high for a, b in ranges)


def ephemeral_in(ranges: PortRanges, option: str) -> bool:
    """Whether a source port the kernel picks from ip_local_port_range falls in `ranges`:
    known only when the ranges hold all of that range or none of it."""
    low, high = EPHEMERAL_PORTS
    if splits_ephemeral(ranges):
        raise CannotPredict(f"{option} depends on the ephemeral source port the kernel picks "
                            f"({low}-{high}); give the flow a source port")
    return any(a <= low and high <= b for a, b in ranges)


def _ports_text(ranges: PortRanges) -> str:
    return ",".join(str(a) if a == b else f"{a}:{b}" for a, b in ranges)


class Port(Match):
    """tcp/udp --sport/--dport, and multiport --sports/--dports/--ports (either port)."""

    __slots__ = ("which", "ranges")

    def __init__(self, option: str, which: str, ranges: PortRanges, negated: bool = False):
        super().__init__(f"{option} {_ports_text(ranges)}", negated)
        self.which = which  # "sport" | "dport" | "either"
        self.ranges = ranges

    def holds(self, p, ns):
        if self.which != "sport" and _in(p.dport, self.ranges):
            return True
        if self.which == "dport":
            return False
        if p.sport is None:
            return ephemeral_in(self.ranges, self.needs())
        return _in(p.sport, self.ranges)

    def has(self, p, ns):
        sport = "an ephemeral port" if p.sport is None else str(p.sport)
        return {"sport": f"the source port is {sport}", "dport": f"the destination port is {p.dport}",
                "either": f"the ports are {sport} and {p.dport}"}[self.which]

    def index(self):
        return ports_index(self.ranges) if self.which == "dport" else None

    def may_refuse(self):
        return self.which != "dport" and splits_ephemeral(self.ranges)


TCP_FLAGS = {"FIN": 0x01, "SYN": 0x02, "RST": 0x04, "PSH": 0x08, "ACK": 0x10, "URG": 0x20,
             "ALL": 0x3F, "NONE": 0}
SYN_ONLY = TCP_FLAGS["SYN"]  # a connection's first segment


def tcp_flags(text: str) -> int:
    try:
        return sum(TCP_FLAGS[name] for name in text.upper().split(","))
    except KeyError:
        raise CannotPredict(f"--tcp-flags {text}: not a TCP flag") from None


class TcpFlags(Match):
    """--tcp-flags MASK COMP (--syn is SYN,RST,ACK,FIN SYN): tested on a SYN."""

    __slots__ = ("mask", "comp")

    def __init__(self, option: str, mask: int, comp: int, negated: bool = False):
        super().__init__(option, negated)
        self.mask, self.comp = mask, comp

    def holds(self, p, ns):
        return p.proto == "tcp" and SYN_ONLY & self.mask == self.comp

    def has(self, p, ns):
        return "a connection's first segment carries SYN alone"


# --- owner, mark, connmark --------------------------------------------------------------

class OwnerId(Match):
    """--uid-owner / --gid-owner (a number or a range): the socket's fsuid or fsgid (and, with
    --suppl-groups, its supplementary groups)."""

    __slots__ = ("kind", "low", "high", "groups")

    def __init__(self, kind: str, text: str, negated: bool = False, groups: bool = False):
        super().__init__(f"--{kind}-owner {text}" + (" --suppl-groups" if groups else ""), negated)
        self.kind = kind
        low, _, high = text.partition("-")
        try:
            self.low, self.high = int(low), int(high or low)
        except ValueError:
            raise CannotPredict(f"--{kind}-owner {text}: give ids as numbers, as iptables-save prints them") from None
        self.groups = groups

    def test(self, p, ns):
        if p.owner is None:
            return self.negated
        return self.holds(p, ns) != self.negated

    def holds(self, p, ns):
        if self.kind == "uid":
            return self.low <= p.owner.uid <= self.high
        ids = (p.owner.gid, *p.owner.groups) if self.groups else (p.owner.gid,)
        return any(self.low <= i <= self.high for i in ids)

    def has(self, p, ns):
        if p.owner is None:
            return "this packet has no local socket (it was not sent from this pod)"
        return f"the socket's owner is {self.kind} {p.owner.uid if self.kind == 'uid' else p.owner.gid}"

    def index(self):
        return ((self.kind,), (self.low,)) if self.low == self.high and not self.groups else None


class SocketExists(Match):
    __slots__ = ()

    def __init__(self, negated: bool = False):
        super().__init__("--socket-exists", negated)

    def holds(self, p, ns):
        return p.owner is not None

    def has(self, p, ns):
        return "it has a local socket" if p.owner else "it has no local socket"


def mark_spec(text: str) -> tuple[int, int]:
    """"0x539", "0x539/0xffffffff", "1337": (value, mask)."""
    value, _, mask = text.partition("/")
    try:
        return int(value, 0), int(mask, 0) if mask else 0xFFFFFFFF
    except ValueError:
        raise CannotPredict(f"{text!r} is not a mark") from None


def mark_text(value: int, mask: int) -> str:
    return f"{value:#x}" if mask == 0xFFFFFFFF else f"{value:#x}/{mask:#x}"


class Mark(Match):
    """-m mark --mark (the packet's) and -m connmark --mark (its connection's)."""

    __slots__ = ("of_connection", "value", "mask")

    def __init__(self, text: str, of_connection: bool = False, negated: bool = False):
        self.value, self.mask = mark_spec(text)
        super().__init__(f"-m {'connmark' if of_connection else 'mark'} --mark {mark_text(self.value, self.mask)}",
                         negated)
        self.of_connection = of_connection

    def current(self, p: Packet) -> int:
        return (p.conn.mark if p.conn else 0) if self.of_connection else p.mark

    def holds(self, p, ns):
        if self.of_connection and p.conn is None:
            return False  # xt_connmark: no conntrack, no match (negated or not)
        return self.current(p) & self.mask == self.value

    def test(self, p, ns):
        if self.of_connection and p.conn is None:
            return False
        return self.holds(p, ns) != self.negated

    def has(self, p, ns):
        if self.of_connection:
            return f"the connection's mark is {self.current(p):#x}" if p.conn else "the packet is untracked"
        return f"the packet's mark is {p.mark:#x}"

    def index(self):
        return (("mark",), (self.value,)) if not self.of_connection and self.mask == 0xFFFFFFFF else None


# --- conntrack --------------------------------------------------------------------------

CT_STATES = ("NEW", "ESTABLISHED", "RELATED", "INVALID", "UNTRACKED", "SNAT", "DNAT")


class ConnState(Match):
    """--ctstate (or -m state --state): a first packet is NEW (or UNTRACKED after CT --notrack);
    SNAT/DNAT say whether nat already rewrote its connection."""

    __slots__ = ("states",)

    def __init__(self, option: str, states: str, negated: bool = False):
        super().__init__(f"{option} {states}", negated)
        self.states = frozenset(states.upper().split(","))
        unknown = self.states - set(CT_STATES)
        if unknown:
            raise CannotPredict(f"{option} {states}: no state {sorted(unknown)[0]}")

    def of(self, p: Packet) -> set[str]:
        if p.untracked:
            return {"UNTRACKED"}
        if p.conn is None:  # in raw, before conntrack: a CT template reads as NEW, nothing as INVALID
            return {"NEW"} if p.zone_template is not None else {"INVALID"}
        return {"NEW"} | ({"DNAT"} if p.conn.dst_nat else set()) | ({"SNAT"} if p.conn.src_nat else set())

    def holds(self, p, ns):
        return bool(self.states & self.of(p))

    def has(self, p, ns):
        return f"the connection is {','.join(sorted(self.of(p)))}"


# --- addrtype, socket -------------------------------------------------------------------

ADDRESS_TYPES = ("UNSPEC", "UNICAST", "LOCAL", "BROADCAST", "ANYCAST", "MULTICAST", "BLACKHOLE",
                 "UNREACHABLE", "PROHIBIT", "THROW", "NAT", "XRESOLVE")


class AddressType(Match):
    """--src-type/--dst-type: the address's type in this namespace's local table (LOCAL,
    BROADCAST), MULTICAST by its prefix, UNICAST otherwise; --limit-iface-in/-out look only
    at that interface's addresses."""

    __slots__ = ("which", "types", "device")

    def __init__(self, which: str, types: str, device: str | None = None, negated: bool = False):
        option = f"-m addrtype --{which}-type {types}"
        super().__init__(option if device is None else f"{option} (on {device})", negated)
        self.which = which
        self.types = frozenset(types.upper().split(","))
        if self.types - set(ADDRESS_TYPES):
            raise CannotPredict(f"--{which}-type {types}: not an address type")
        self.device = device  # "in" | "out" with --limit-iface-in/out: the packet's own interface

    def address(self, p: Packet) -> int:
        return p.src if self.which == "src" else p.dst

    def kind(self, p: Packet, ns: "Namespace") -> str:
        device = None if self.device is None else (p.iif if self.device == "in" else p.oif)
        return ns.address_type(p.family, self.address(p), device)

    def holds(self, p, ns):
        return self.kind(p, ns) in self.types

    def has(self, p, ns):
        return f"{inet.text(p.family, self.address(p))} is {self.kind(p, ns)} here"


class SocketMatch(Match):
    """-m socket: a socket of this namespace takes the packet's tuple.  Listeners bound to the
    wildcard address are ignored unless --nowildcard; --transparent wants IP_TRANSPARENT."""

    __slots__ = ("transparent", "wildcard")

    def __init__(self, transparent: bool, wildcard: bool):
        words = ["-m socket"] + (["--transparent"] if transparent else []) + (["--nowildcard"] if wildcard else [])
        super().__init__(" ".join(words))
        self.transparent, self.wildcard = transparent, wildcard

    def holds(self, p, ns):
        sock = ns.socket_for(p.proto, p.family, p.dst, p.dport)
        if sock is None or (sock.address is None and not self.wildcard):
            return False
        return sock.transparent or not self.transparent

    def has(self, p, ns):
        sock = ns.socket_for(p.proto, p.family, p.dst, p.dport)
        if sock is None:
            return f"no socket here takes {inet.endpoint(p.family, p.dst, p.dport)}"
        if sock.address is None and not self.wildcard:
            return f"{sock} is bound to the wildcard address"
        return f"{sock} is not transparent"


class Always(Match):
    """-m comment, a bare -m tcp: nothing to test."""

    __slots__ = ()

    def holds(self, p, ns):
        return True

    def has(self, p, ns):
        return ""


class Unknown(Match):
    """A match predict does not model.  The kernel evaluates it only when everything before it
    in the rule matched; so does predict, and says so then instead of guessing."""

    __slots__ = ("where",)

    def __init__(self, option: str, where: str):
        super().__init__(option)
        self.where = where

    def holds(self, p, ns):
        raise CannotPredict(f"{self.where} uses {self.option}")

    def has(self, p, ns):
        raise CannotPredict(f"{self.where} uses {self.option}")

    def may_refuse(self):
        return True
