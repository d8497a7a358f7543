"""What each nftables expression of a rule does, as nf_tables evaluates it on a flow's first packet.

An nft rule is a row of expressions run in order: a match that fails ends the rule there
(NFT_BREAK: the next rule is tried), a statement changes the packet, a verdict ends the
walk of the chain or moves it.  Where nft differs from iptables, predict follows nft:

  - a match has its dependency: `ip daddr` holds only for IPv4 packets and `tcp dport` only
    for TCP ones, `!=` or not (nft puts `meta nfproto ipv4`, `meta l4proto tcp` before
    them), so `tcp dport != 15008` fails on a UDP datagram where iptables' `-p tcp ! --dport`
    never got that far;
  - `meta skuid`/`skgid` on a packet with no socket fail, `!=` or not (xt_owner's negations
    match then); `skgid` is the socket's fsgid alone, no supplementary group;
  - `ct mark` fails on a packet conntrack does not track; `ct state` does not (invalid,
    untracked);
  - `tproxy` that finds no transparent socket ends the rule as a failed match does: the chain
    goes on (iptables' TPROXY drops the packet); it changes no mark, the `meta mark set` after
    it does;
  - `ct zone set` leaves a packet that has a template or an entry alone, as CT does.

Each condition answers as lab.predict.matches' do: `test`, what the rule `needs` (its own
words), what the packet `has` instead.  Statements are effects on the packet, and the rule's
Action runs them, then its verdict.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from . import inet, matches as m, targets
from .errors import CannotPredict
from .packet import Packet
from .targets import Outcome, Verdict

if TYPE_CHECKING:
    from .stack import Namespace

FAMILIES = {"ip": 4, "ip6": 6}
CT_STATES = ("new", "established", "related", "invalid", "untracked")


class Condition(m.Match):
    """A match of an nft rule: `needs` says it in the rule's own words.  `family`/`proto` are its
    dependency (ip, ip6; tcp, udp): a packet of another fails it, negated or not."""

    __slots__ = ("family", "proto")

    def __init__(self, words: str, negated: bool = False, family: int | None = None, proto: str | None = None):
        super().__init__(words, negated)
        self.family, self.proto = family, proto

    def test(self, p, ns):
        if not self.applies(p, ns):
            return False
        return self.holds(p, ns) != self.negated

    def applies(self, p: Packet, ns: "Namespace") -> bool:
        return (self.family is None or p.family == self.family) and (self.proto is None or p.proto == self.proto)

    def needs(self) -> str:
        return self.option

    def has(self, p, ns):
        if self.family is not None and p.family != self.family:
            return f"this packet is IPv{p.family}"
        if self.proto is not None and p.proto != self.proto:
            return f"this packet is {p.proto.upper()}"
        return self.value(p, ns)

    def value(self, p: Packet, ns: "Namespace") -> str:
        raise NotImplementedError


class Address(Condition):
    """`ip saddr 127.0.0.6/32`, `ip6 daddr != ::1`, `ip daddr { 10.0.0.0/8, 1.2.3.4 }`."""

    __slots__ = ("which", "nets")

    def __init__(self, words, which: str, nets: tuple[inet.Network, ...], negated=False):
        super().__init__(words, negated, family=nets[0].family)
        self.which, self.nets = which, nets

    def address(self, p: Packet) -> int:
        return p.src if self.which == "saddr" else p.dst

    def holds(self, p, ns):
        address = self.address(p)
        return any(address in net for net in self.nets)

    def value(self, p, ns):
        return f"the {'source' if self.which == 'saddr' else 'destination'} is {inet.text(p.family, self.address(p))}"

    def index(self):
        return m.prefix_index("dst" if self.which == "daddr" else "src", self.nets)


class Port(Condition):
    """`tcp dport 15008`, `udp sport 53`, `tcp dport != { 53, 15008 }`, `th dport 1000-2000`
    (th: either transport)."""

    __slots__ = ("which", "ranges")

    def __init__(self, words, proto: str, which: str, ranges: m.PortRanges, negated=False):
        super().__init__(words, negated, proto=None if proto == "th" else proto)
        self.which, self.ranges = which, ranges

    def holds(self, p, ns):
        if self.which == "dport":
            return any(low <= p.dport <= high for low, high in self.ranges)
        if p.sport is None:
            return m.ephemeral_in(self.ranges, self.option)
        return any(low <= p.sport <= high for low, high in self.ranges)

    def value(self, p, ns):
        if self.which == "dport":
            return f"the destination port is {p.dport}"
        return f"the source port is {'an ephemeral port' if p.sport is None else p.sport}"

    def index(self):
        return m.ports_index(self.ranges) if self.which == "dport" else None

    def may_refuse(self):
        return self.which == "sport" and m.splits_ephemeral(self.ranges)


class Interface(Condition):
    """`iifname lo`, `oifname != "eth0"`, `oifname "eth*"` (a trailing * is a prefix), a set of
    names.  A locally generated packet's input interface is "", an incoming one's output too."""

    __slots__ = ("flag", "names")

    def __init__(self, words, flag: str, names: tuple[str, ...], negated=False):
        super().__init__(words, negated)
        self.flag, self.names = flag, names

    def device(self, p: Packet) -> str:
        return p.iif if self.flag.startswith("i") else p.oif

    def holds(self, p, ns):
        dev = self.device(p)
        return any(dev.startswith(n[:-1]) if n.endswith("*") else dev == n for n in self.names)

    def value(self, p, ns):
        dev = self.device(p)
        if self.flag.startswith("i"):
            return f"this packet came in on {dev}" if dev else "a locally generated packet has no input interface"
        return f"this packet leaves by {dev}" if dev else "an incoming packet has no output interface here"


class Owner(Condition):
    """`skuid 1337`, `meta skgid != 1337`: the socket's fsuid or fsgid.  No socket: the rule
    fails whatever the operator (nft_meta_get_eval_skugid breaks)."""

    __slots__ = ("kind", "ids", "where")

    def __init__(self, words, kind: str, ids: tuple[int, ...], negated=False, where: str = ""):
        super().__init__(words, negated)
        self.kind, self.ids, self.where = kind, ids, where

    def applies(self, p, ns):
        if p.owner is None and p.socket is not None:  # the socket TPROXY assigned: a listener's owner
            raise CannotPredict(f"{self.where} uses {self.option} on a packet TPROXY gave a socket to")
        return p.owner is not None

    def holds(self, p, ns):
        return (p.owner.uid if self.kind == "uid" else p.owner.gid) in self.ids

    def has(self, p, ns):
        if p.owner is None:
            return "this packet has no local socket (it was not sent from this pod)"
        return f"the socket's owner is {self.kind} {p.owner.uid if self.kind == 'uid' else p.owner.gid}"

    def index(self):
        return ((self.kind,), self.ids)

    def may_refuse(self):
        return True  # on TPROXY's socket


class Mark(Condition):
    """`mark 1337`, `meta mark != 0x53a`, `meta mark & 0xff == 0x1`; `ct mark 1337` (the
    connection's: a packet conntrack does not track fails it; a template's mark is 0)."""

    __slots__ = ("of_connection", "mask", "values")

    def __init__(self, words, values: tuple[int, ...], mask: int = 0xFFFFFFFF, of_connection=False, negated=False):
        super().__init__(words, negated)
        self.values, self.mask, self.of_connection = values, mask, of_connection

    def applies(self, p, ns):
        return not self.of_connection or p.conn is not None or p.zone_template is not None

    def current(self, p: Packet) -> int:
        if self.of_connection:
            return p.conn.mark if p.conn else 0
        return p.mark

    def holds(self, p, ns):
        return self.current(p) & self.mask in self.values

    def has(self, p, ns):
        if not self.applies(p, ns):
            return "the packet is untracked"
        return f"the {'connection' if self.of_connection else 'packet'}'s mark is {self.current(p):#x}"

    def index(self):
        return (("mark",), self.values) if not self.of_connection and self.mask == 0xFFFFFFFF else None


class State(Condition):
    """`ct state new`, `ct state related,established`: a first packet is new (a CT template
    reads as new too), untracked, or invalid where nothing tracks it."""

    __slots__ = ("states",)

    def __init__(self, words, states: frozenset[str], negated=False):
        super().__init__(words, negated)
        self.states = states

    @staticmethod
    def of(p: Packet) -> str:
        if p.untracked:
            return "untracked"
        return "new" if p.conn is not None or p.zone_template is not None else "invalid"

    def holds(self, p, ns):
        return self.of(p) in self.states

    def value(self, p, ns):
        return f"the connection is {self.of(p)}"


class Protocol(Condition):
    """`meta l4proto tcp` (either family), `ip protocol tcp` (IPv4), `ip6 nexthdr tcp` (IPv6),
    `meta nfproto ipv6`."""

    __slots__ = ("numbers", "nfproto")

    def __init__(self, words, numbers: tuple[int, ...], negated=False, family: int | None = None, nfproto=False):
        super().__init__(words, negated, family=None if nfproto else family)
        self.numbers, self.nfproto = numbers, nfproto

    def holds(self, p, ns):
        return (p.family if self.nfproto else m.PROTOCOLS[p.proto]) in self.numbers

    def value(self, p, ns):
        return f"this packet is IPv{p.family}" if self.nfproto else f"this packet is {p.proto.upper()}"


class TransparentSocket(Condition):
    """The first half of `tproxy ip to :15006`: a transparent socket for the packet (a listener
    on the given address, or on the input device's first address, at the given port, or the
    packet's own).  None: the rule ends here, as a failed match does."""

    __slots__ = ("address", "port")

    def __init__(self, words, family: int | None, address: int, port: int):
        super().__init__(words, family=family)
        self.address, self.port = address, port

    def socket(self, p: Packet, ns: "Namespace"):
        return ns.transparent_socket(p, self.address, self.port)

    def holds(self, p, ns):
        return self.socket(p, ns) is not None

    def value(self, p, ns):
        return f"no transparent socket takes port {self.port or p.dport} here"


class Tracked(Condition):
    """What `meta mark set ct mark` needs: a conntrack entry (or template) to read."""

    __slots__ = ()

    def holds(self, p, ns):
        return p.conn is not None or p.zone_template is not None

    def value(self, p, ns):
        return "the packet is untracked"


# --- statements -----------------------------------------------------------------------------

class Statement:
    """An effect on the packet; the rule goes on after it."""

    def apply(self, p: Packet, ns: "Namespace") -> Packet:
        raise NotImplementedError


class SetMark(Statement):
    """`meta mark set 1337`, `meta mark set ct mark` (value None: the connection's mark)."""

    def __init__(self, value: int | None):
        self.value = value

    def apply(self, p, ns):
        if self.value is None:
            return p.but(mark=p.conn.mark if p.conn else 0)
        return p.but(mark=self.value)


class SetConnectionMark(Statement):
    """`ct mark set mark` (value None: the packet's mark), `ct mark set 1`: nothing for a packet
    with no entry, or only a template (nft_ct_set_eval)."""

    def __init__(self, value: int | None):
        self.value = value

    def apply(self, p, ns):
        if p.conn is None:
            return p
        return p.but(conn=p.conn._replace(mark=p.mark if self.value is None else self.value))


class SetZone(Statement):
    """`ct zone set 1`: the template conntrack files the packet by, unless it has one or an entry."""

    def __init__(self, zone: int):
        self.zone = zone

    def apply(self, p, ns):
        if p.conn is not None or p.zone_template is not None:
            return p
        return p.but(zone_template=self.zone, untracked=False)


class AssignSocket(Statement):
    """The second half of `tproxy`: the transparent socket the condition found is the packet's."""

    def __init__(self, found: TransparentSocket):
        self.found = found

    def apply(self, p, ns):
        return p.but(socket=self.found.socket(p, ns))


class Action(targets.Target):
    """What an nft rule does once its matches held: its statements in order, then its end (a
    verdict, or a statement that ends the rule: redirect, reject).  `name`: the xtables target
    the lab's paths read the rule as (lab.rules.nftset.target)."""

    def __init__(self, name: str | None, statements: tuple[Statement, ...], verdict: Verdict = Verdict.CONTINUE,
                 chain: str | None = None, end: targets.Target | None = None):
        self.name, self.statements, self.verdict, self.chain, self.end = name, statements, verdict, chain, end

    def fire(self, p, ns, hook):
        for statement in self.statements:
            p = statement.apply(p, ns)
        if self.end is not None:
            return self.end.fire(p, ns, hook)
        return Outcome(self.verdict, p)
