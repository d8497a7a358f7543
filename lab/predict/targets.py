"""What a rule's target does to the packet and to the walk through its table.

Verdicts as ipt_do_table acts on them: ACCEPT ends this table's walk (the next table at
the hook still sees the packet), DROP and REJECT end the packet, RETURN goes back to the
calling chain (in a built-in chain: to its policy), a jump pushes a return point and a
goto does not.  MARK, CONNMARK, CT, LOG and TRACE change or note something and let the
walk go on (XT_CONTINUE).  REDIRECT and DNAT rewrite the destination and accept; TPROXY
hands the packet to a transparent socket, or drops it when there is none.
"""

from __future__ import annotations

import enum
from collections.abc import Collection
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .. import plan
from . import inet
from .errors import CannotPredict
from .matches import mark_spec
from .packet import Packet

if TYPE_CHECKING:
    from .stack import Namespace


class Verdict(enum.Enum):
    CONTINUE = "continue"
    ACCEPT = "ACCEPT"
    DROP = "DROP"
    REJECT = "REJECT"
    RETURN = "RETURN"
    JUMP = "jump"
    GOTO = "goto"


@dataclass(frozen=True, slots=True)
class Outcome:
    verdict: Verdict
    packet: Packet
    why: str = ""  # for a packet the target killed without being DROP or REJECT (TPROXY)


class Target:
    """What a rule does when its conditions hold: an iptables rule's -j (or -g), an nft rule's
    statements.  `name` is the xtables target it is (a jump's: the chain), as the lab's
    paths read it; `chain` the chain it jumps or goes to.  TABLE and HOOKS: where the kernel
    accepts it (xt_check_target)."""

    TABLE: str | None = None
    HOOKS: frozenset[str] | None = None
    name = ""
    chain: str | None = None

    def fire(self, p: Packet, ns: "Namespace", hook: str) -> Outcome:
        raise NotImplementedError


class Standard(Target):
    """ACCEPT, DROP, RETURN: the verdicts the kernel acts on itself."""

    def __init__(self, name: str):
        self.name = name
        self.verdict = Verdict(name)

    def fire(self, p, ns, hook):
        return Outcome(self.verdict, p)


class Reject(Target):
    TABLE = "filter"
    HOOKS = frozenset({"INPUT", "FORWARD", "OUTPUT"})
    name = "REJECT"

    def fire(self, p, ns, hook):
        return Outcome(Verdict.REJECT, p)


class Jump(Target):
    """-j CHAIN, or -g CHAIN (goto: no return point is kept, a RETURN leaves the caller too)."""

    def __init__(self, chain: str, goto: bool = False):
        self.name = self.chain = chain
        self.goto = goto

    def fire(self, p, ns, hook):
        return Outcome(Verdict.GOTO if self.goto else Verdict.JUMP, p)


class Note(Target):
    """LOG, NFLOG, TRACE: seen by someone, nothing changes."""

    def __init__(self, name: str):
        self.name = name

    def fire(self, p, ns, hook):
        return Outcome(Verdict.CONTINUE, p)


class SetMark(Target):
    """MARK: mark = (mark & ~mask) ^ value (--set-xmark; --set-mark, --and/or/xor-mark as
    libxt_MARK turns them into xmark)."""

    name = "MARK"

    def __init__(self, value: int, mask: int):
        self.value, self.mask = value, mask

    def fire(self, p, ns, hook):
        return Outcome(Verdict.CONTINUE, p.but(mark=(p.mark & ~self.mask & 0xFFFFFFFF) ^ self.value))


class ConnMark(Target):
    """CONNMARK --set-xmark, --save-mark, --restore-mark (with --nfmask/--ctmask).  A packet with
    no connection is left alone."""

    name = "CONNMARK"

    def __init__(self, mode: str, value: int = 0, ctmask: int = 0xFFFFFFFF, nfmask: int = 0xFFFFFFFF):
        self.mode, self.value, self.ctmask, self.nfmask = mode, value, ctmask, nfmask

    def fire(self, p, ns, hook):
        conn = p.conn
        if conn is None:
            return Outcome(Verdict.CONTINUE, p)
        keep = ~self.ctmask & 0xFFFFFFFF
        if self.mode == "set":
            return Outcome(Verdict.CONTINUE, p.but(conn=conn._replace(mark=(conn.mark & keep) ^ self.value)))
        if self.mode == "save":
            mark = (conn.mark & keep) ^ (p.mark & self.nfmask)
            return Outcome(Verdict.CONTINUE, p.but(conn=conn._replace(mark=mark)))
        mark = (p.mark & ~self.nfmask & 0xFFFFFFFF) ^ (conn.mark & self.ctmask)
        return Outcome(Verdict.CONTINUE, p.but(mark=mark))


class Conntrack(Target):
    """CT --zone N / --notrack (and NOTRACK): sets the template conntrack files the packet by.
    A packet that already has one, or a conntrack entry (back over lo), is left alone
    (xt_ct_target: `if (skb->_nfct != 0) return XT_CONTINUE`): the first CT rule decides."""

    TABLE = "raw"

    def __init__(self, name: str, zone: int | None = None, notrack: bool = False):
        self.name, self.zone, self.notrack = name, zone, notrack

    def fire(self, p, ns, hook):
        if p.has_conntrack:
            return Outcome(Verdict.CONTINUE, p)
        if self.notrack:
            return Outcome(Verdict.CONTINUE, p.but(untracked=True))
        return Outcome(Verdict.CONTINUE, p.but(zone_template=self.zone or 0))


class Redirect(Target):
    """REDIRECT [--to-ports P]: to 127.0.0.1 (::1) in OUTPUT, to the first address of the input
    interface in PREROUTING (none: dropped); the port kept when none is given."""

    TABLE = "nat"
    HOOKS = frozenset({"PREROUTING", "OUTPUT"})
    name = "REDIRECT"

    def __init__(self, port: int | None):
        self.port = port

    def fire(self, p, ns, hook):
        if hook == "OUTPUT":
            dst = inet.parse(plan.LOCALHOST[p.family])[1]
        else:
            dst = ns.first_address(p.family, p.iif)
            if dst is None:
                return Outcome(Verdict.DROP, p, f"REDIRECT: {p.iif} has no address")
        return Outcome(Verdict.ACCEPT, _dnat(p, dst, self.port or p.dport))


class DestinationNat(Target):
    """DNAT --to-destination ADDR[:PORT], one address (kube-proxy writes one per endpoint)."""

    TABLE = "nat"
    HOOKS = frozenset({"PREROUTING", "OUTPUT"})
    name = "DNAT"

    def __init__(self, address: int, port: int | None):
        self.address, self.port = address, port

    def fire(self, p, ns, hook):
        return Outcome(Verdict.ACCEPT, _dnat(p, self.address, self.port or p.dport))


def _dnat(p: Packet, dst: int, port: int) -> Packet:
    return p.but(dst=dst, dport=port, conn=p.conn._replace(dst_nat=True, dst_manip_done=True))


class SourceNat(Target):
    """SNAT --to-source ADDR, or MASQUERADE (the output interface's address)."""

    TABLE = "nat"

    def __init__(self, name: str, address: int | None):
        self.name, self.address = name, address
        self.HOOKS = frozenset({"POSTROUTING"} if name == "MASQUERADE" else {"POSTROUTING", "INPUT"})

    def fire(self, p, ns, hook):
        src = self.address if self.address is not None else ns.first_address(p.family, p.oif)
        if src is None:
            return Outcome(Verdict.DROP, p, f"MASQUERADE: {p.oif} has no address")
        return Outcome(Verdict.ACCEPT, p.but(src=src, conn=p.conn._replace(src_nat=True, src_manip_done=True)))


class Tproxy(Target):
    """TPROXY --on-port P [--on-ip A] [--tproxy-mark V/M]: find a transparent socket for the
    packet (an established one by its own tuple, else a listener on ON-IP, or on the input
    interface's first address when ON-IP is any, at ON-PORT), assign it and set the mark.
    No such socket: NF_DROP."""

    TABLE = "mangle"
    HOOKS = frozenset({"PREROUTING"})
    name = "TPROXY"

    def __init__(self, port: int, address: int, value: int, mask: int):
        self.port, self.address, self.value, self.mask = port, address, value, mask

    def fire(self, p, ns, hook):
        sock = ns.transparent_socket(p, self.address, self.port)
        if sock is None:
            where = f"{self.port or p.dport}"
            return Outcome(Verdict.DROP, p, f"{where}: no transparent listener, dropped")
        mark = (p.mark & ~self.mask & 0xFFFFFFFF) ^ self.value
        return Outcome(Verdict.ACCEPT, p.but(mark=mark, socket=sock))


class Unknown(Target):
    """A target predict does not model (or not with these options): said when a packet
    matches its rule, not before, since only then does the kernel run it."""

    def __init__(self, name: str, problem: str):
        self.name, self.problem = name, problem

    def fire(self, p, ns, hook):
        raise CannotPredict(self.problem)


# --- reading a target's options -----------------------------------------------------------

def build(name: str, options: list[tuple[str, list[str]]], family: int, chains: Collection[str], where: str) -> Target:
    """The target of `-j NAME OPTIONS...` (options as (--flag, values) pairs)."""
    opts = {flag: values for flag, values in options}
    if name in chains:
        return Jump(name)
    if name in ("ACCEPT", "DROP", "RETURN"):
        return Standard(name)
    if name == "REJECT":
        return Reject()
    if name in ("LOG", "NFLOG", "TRACE"):
        return Note(name)
    if name not in _MAKERS:
        return Unknown(name, f"{where} uses -j {name}")
    extra = [flag for flag in opts if flag not in _OPTIONS[name]]
    if extra:
        return Unknown(name, f"{where} uses -j {name} {extra[0]}")
    try:
        return _MAKERS[name](opts, family)
    except CannotPredict as e:
        return Unknown(name, f"{where}: {e.problem}")


def _one(opts: dict, flag: str, default: str | None = None) -> str | None:
    values = opts.get(flag)
    return values[0] if values else default


def _port(text: str | None) -> int | None:
    if text is None:
        return None
    low, _, high = text.partition("-")
    if high and high != low:
        raise CannotPredict(f"a port range ({text}) lets the kernel pick the port")
    return int(low)


def _address_port(text: str, family: int) -> tuple[int, int | None]:
    if family == 6 and text.startswith("["):
        host, _, port = text[1:].partition("]")
        port = port.lstrip(":") or None
    elif family == 4 and ":" in text:
        host, port = text.split(":", 1)
    else:
        host, port = text, None
    if "-" in host:
        raise CannotPredict(f"an address range ({text}) lets the kernel pick the address")
    return inet.parse(host)[1], _port(port)


def _redirect(opts, family):
    return Redirect(_port(_one(opts, "--to-ports")))  # lab.predict.iptables reads --to-port as --to-ports


def _dnat_target(opts, family):
    to = _one(opts, "--to-destination")
    if to is None:
        raise CannotPredict("DNAT without --to-destination")
    return DestinationNat(*_address_port(to, family))


def _snat(opts, family):
    to = _one(opts, "--to-source")
    if to is None:
        raise CannotPredict("SNAT without --to-source")
    return SourceNat("SNAT", _address_port(to, family)[0])


def _masquerade(opts, family):
    return SourceNat("MASQUERADE", None)


def _tproxy(opts, family):
    value, mask = mark_spec(_one(opts, "--tproxy-mark", "0x0/0x0"))
    on_ip = _one(opts, "--on-ip")
    return Tproxy(_port(_one(opts, "--on-port")) or 0, inet.parse(on_ip)[1] if on_ip else 0, value, mask)


def _mark(opts, family):
    flag = next(iter(opts), None)
    if flag is None or len(opts) > 1:
        raise CannotPredict("MARK needs exactly one of --set-xmark, --set-mark, --and-mark, --or-mark, --xor-mark")
    value, mask = mark_spec(opts[flag][0])
    if flag == "--set-xmark":
        return SetMark(value, mask)
    if flag == "--set-mark":
        return SetMark(value, (mask | value) & 0xFFFFFFFF)
    if flag == "--and-mark":
        return SetMark(0, ~value & 0xFFFFFFFF)
    if flag == "--or-mark":
        return SetMark(value, value)
    return SetMark(value, 0)  # --xor-mark


def _connmark(opts, family):
    masks = mark_spec(_one(opts, "--mask", "0xffffffff"))[0]
    nfmask = mark_spec(_one(opts, "--nfmask", hex(masks)))[0]
    ctmask = mark_spec(_one(opts, "--ctmask", hex(masks)))[0]
    if "--save-mark" in opts:
        return ConnMark("save", ctmask=ctmask, nfmask=nfmask)
    if "--restore-mark" in opts:
        return ConnMark("restore", ctmask=ctmask, nfmask=nfmask)
    flag = "--set-xmark" if "--set-xmark" in opts else "--set-mark"
    value, mask = mark_spec(_one(opts, flag, "0"))
    return ConnMark("set", value, mask if flag == "--set-xmark" else (mask | value) & 0xFFFFFFFF)


def _ct(opts, family):
    zone = _one(opts, "--zone")
    return Conntrack("CT", int(zone) if zone is not None else None, "--notrack" in opts)


def _notrack(opts, family):
    return Conntrack("NOTRACK", notrack=True)


_MAKERS = {"REDIRECT": _redirect, "DNAT": _dnat_target, "SNAT": _snat, "MASQUERADE": _masquerade,
           "TPROXY": _tproxy, "MARK": _mark, "CONNMARK": _connmark, "CT": _ct, "NOTRACK": _notrack}
# The options each target is modelled with; a rule giving another is not predicted.
_OPTIONS = {
    "REDIRECT": {"--to-ports"}, "DNAT": {"--to-destination"}, "SNAT": {"--to-source"},
    "MASQUERADE": set(), "TPROXY": {"--on-port", "--on-ip", "--tproxy-mark"},
    "MARK": {"--set-xmark", "--set-mark", "--and-mark", "--or-mark", "--xor-mark"},
    "CONNMARK": {"--set-xmark", "--set-mark", "--save-mark", "--restore-mark", "--nfmask", "--ctmask", "--mask"},
    "CT": {"--zone", "--notrack"}, "NOTRACK": set(),
}
ARITY = {"--save-mark": 0, "--restore-mark": 0, "--notrack": 0, "--random": 0, "--persistent": 0,
         "--random-fully": 0}  # target options that take no value; every other takes one
