"""Reading an nftables rule set as nf_tables runs it: the tables IPv4 and IPv6 packets meet
(`ip`, `ip6`, `inet`), their base chains (hook, priority, type, policy), and each rule's
words into conditions and an action (lab.predict.nftexpr).

The vocabulary is what Istio's native rules and the lab's builder write, in Istio's words or
as `nft list ruleset` prints them back (lab.rules.nftlisting): `iifname`/`oifname`, `ip`/`ip6
saddr`/`daddr` (prefixes, sets, `!=`), `meta l4proto`, `meta nfproto`, `ip protocol`, `tcp`/
`udp`/`th` `sport`/`dport` (ranges, sets, `!=`), `meta skuid`/`skgid`, `meta mark` (with a
mask), `ct mark`, `ct state`; `counter`, `comment`, `meta mark set` (a value or `ct mark`), `ct
mark set` (`mark` or a value), `ct zone set`, `meta nftrace set`, `redirect to :PORT`, `tproxy
[ip|ip6] to [ADDR][:PORT]`, `reject`, and the verdicts.  Anything else becomes a condition
that says "cannot predict" when a packet gets that far, which is when the kernel would run it;
so does a match written after a statement that changed the packet.  A rule iptables-nft wrote
through the xt compatibility layer (`xt ...`) is refused as the rule set is read: what it
does is iptables' (give that table as iptables-nft-save prints it).
"""

from __future__ import annotations

from ..netfilter import RuleRef
from ..rules import nftset
from . import inet, matches as m, targets
from . import nftexpr as x
from .chains import Base, Chain, Placement, Rule, Table, check
from .errors import CannotPredict
from .hooks import CONNTRACK
from .targets import Verdict


class Refused(CannotPredict):
    """What nft or the kernel refuses to load, found in a rule's words: the whole rule set is
    refused as it is read, not the rule when a packet reaches it."""


FAMILIES = {**x.FAMILIES, "inet": None}  # the tables IP packets meet, by the IP version they see (None: both)
HOOKS = {"prerouting": "PREROUTING", "input": "INPUT", "forward": "FORWARD", "output": "OUTPUT",
         "postrouting": "POSTROUTING"}
# The hooks each chain type works at in ip, ip6 and inet tables (nft_chain_type's hook_mask);
# a nat chain must also run after conntrack (nft_chain_parse_hook: priority above -200).
CHAIN_TYPES = {"filter": tuple(HOOKS), "nat": ("prerouting", "input", "output", "postrouting"), "route": ("output",)}
BARE_META = frozenset({"mark", "skuid", "skgid", "iifname", "oifname", "iif", "oif", "nftrace"})  # `meta` optional
OPERATORS = {"==": False, "eq": False, "!=": True, "ne": True}
VERDICTS = {"accept": Verdict.ACCEPT, "drop": Verdict.DROP, "return": Verdict.RETURN, "continue": Verdict.CONTINUE,
            "jump": Verdict.JUMP, "goto": Verdict.GOTO}
# Expressions whose loading makes the kernel track connections (nf_ct_netns_get): every `ct`
# expression, the NAT statements, flow offload, synproxy; `notrack`, `tproxy`, `meta` do not.
TRACKING = frozenset({"ct", "redirect", "masquerade", "snat", "dnat", "flow", "synproxy"})
STARTS = frozenset({"counter", "comment", "meta", "ct", "ip", "ip6", "tcp", "udp", "th", "redirect", "tproxy",
                    "reject"}) | BARE_META | set(VERDICTS)  # the words an expression predict reads starts with
# Words after which a word of STARTS is a value, not a new expression (`meta mark set mark or 1`).
TAKES_VALUE = frozenset({"meta", "ct", "set", "or", "and", "xor", "&", "|", "^", "<<", ">>", "lshift", "rshift", "name",
                         "to", "with"}) | set(OPERATORS)
ALL_HOOKS = frozenset(HOOKS.values())
REDIRECT = Placement("redirect", frozenset({"PREROUTING", "OUTPUT"}), kind="nat")
TPROXY = Placement("tproxy", frozenset({"PREROUTING"}))
REJECT = Placement("reject", ALL_HOOKS - {"POSTROUTING"})


def tables(rules: nftset.RuleSet, backend: str = "") -> list[Table]:
    """The rule set's tables that IP packets meet and enter (a table with no base chain is
    never entered), each checked as the kernel checks it.  Two tables one packet meets under
    one name (`ip nat`, `inet nat`) are refused: their rules would share names."""
    for version in (4, 6):
        rules.seen_by(version)
    out = []
    for (family, name), t in rules.tables.items():
        if family not in FAMILIES or not any(c.base for c in t.chains.values()):
            continue
        table = Table(name, nftset.role(t), FAMILIES[family], backend)
        bases = []
        for c in t.chains.values():
            if c.base is not None:
                if c.base.hook not in HOOKS:
                    raise CannotPredict(f"chain {c.name} of table {name} hooks {c.base.hook}, which predict does "
                                        f"not model")
                _check_base(name, c.name, c.base)
                bases.append(Base(c.name, HOOKS[c.base.hook], c.base.priority, c.base.type, c.base.policy.upper()))
        table.bases = tuple(bases)
        table.chains = {c.name: Chain(c.name, table, [read(table, c.name, n, r) for n, r in enumerate(c.rules, 1)],
                                      HOOKS[c.base.hook] if c.base else None) for c in t.chains.values()}
        _check_jumps(table)
        check(table)
        out.append(table)
    return out


def _check_base(table: str, chain: str, base: nftset.BaseChain) -> None:
    """What the kernel refuses of a base chain (EOPNOTSUPP): a type it does not know, or at a hook
    the type does not work at; a nat chain at or before conntrack."""
    refused = f"the kernel refuses chain {chain} of table {table}"
    hooks = CHAIN_TYPES.get(base.type)
    if hooks is None:
        raise CannotPredict(f"{refused}: no chain type {base.type} (filter, nat or route)")
    if base.hook not in hooks:
        said = f"{', '.join(hooks[:-1])} or {hooks[-1]}" if len(hooks) > 1 else f"{hooks[0]} alone"
        raise CannotPredict(f"{refused}: a {base.type} chain hooks {said}, not {base.hook}")
    if base.type == "nat" and base.priority <= CONNTRACK:
        raise CannotPredict(f"{refused}: a nat chain must run after conntrack (priority above {CONNTRACK}), and "
                            f"{chain}'s is {base.priority}")


def _check_jumps(table: Table) -> None:
    """A base chain is entered from its hook alone: the kernel refuses a jump or goto to one."""
    for chain in table.chains.values():
        for rule in chain.rules:
            to = rule.target.chain if rule.target is not None else None
            if to in table.chains and table.chains[to].hook is not None:
                verb = "goto" if rule.target.verdict is Verdict.GOTO else "jump"
                raise CannotPredict(f"the kernel refuses {table.where(chain.name, rule.ref.number)}: {verb} {to}, a "
                                    f"base chain: a base chain is entered from its hook alone")


def read(table: Table, chain: str, number: int, rule: nftset.Rule) -> Rule:
    """Rule `number` of `chain` in `table`, from its words."""
    where = table.where(chain, number)
    if rule.xt:
        raise CannotPredict(f"{where} was written by iptables-nft through the xt compatibility layer "
                            f"({rule.text}): give that table as iptables-nft-save prints it")
    found = _Reader(rule.words, where, table.family)
    found.read()
    target = None
    if found.statements or found.end is not None or found.verdict is not Verdict.CONTINUE:
        target = x.Action(nftset.target(rule.text), tuple(found.statements), found.verdict, found.chain, found.end)
    return Rule(RuleRef(table.name, chain, number), rule.text, tuple(found.conditions), target,
                bool(TRACKING & set(rule.words)), tuple(found.placements))


def _number(text: str) -> int:
    try:
        return int(text, 0)
    except ValueError:
        raise CannotPredict(f"{text!r} is not a number") from None


def _ports(word: str) -> m.PortRanges:
    return m.port_ranges(",".join(nftset.elements(word)), through="-")


def _ids(word: str) -> tuple[int, ...]:
    ids = nftset.elements(word)
    named = next((i for i in ids if not i.isdigit()), None)
    low, dash, high = (named or "").partition("-")
    if dash and low.isdigit() and high.isdigit():
        raise CannotPredict(f"{named!r} is a range of ids, which predict does not read")
    if named is not None:
        raise CannotPredict(f"{named!r} is a name, which means what the machine that wrote it said: give ids as "
                            f"numbers, as nft list ruleset prints them")
    return tuple(int(i) for i in ids)


def _protocols(word: str) -> tuple[int, ...]:
    out = []
    for element in nftset.elements(word):
        number = m.PROTOCOLS.get(element.lower(), element)
        if not str(number).isdigit():
            raise CannotPredict(f"{element!r} is not a protocol")
        out.append(int(number))
    return tuple(out)


class _Reader:
    """One rule's words, expression by expression."""

    def __init__(self, words: list[str], where: str, family: int | None):
        self.w, self.where, self.family = words, where, family
        self.i = 0
        self.conditions: list[m.Match] = []
        self.statements: list[x.Statement] = []
        self.placements: list[Placement] = []
        self.verdict, self.chain, self.end = Verdict.CONTINUE, None, None

    def word(self, k: int = 0) -> str:
        return self.w[self.i + k] if self.i + k < len(self.w) else ""

    def read(self) -> None:
        while self.i < len(self.w) and self.end is None and self.verdict is Verdict.CONTINUE:
            start = self.i
            try:
                if not self.expression():
                    return self.unknown(start, "")
            except Refused:
                raise
            except CannotPredict as e:
                return self.unknown(start, e.problem)

    def unknown(self, start: int, problem: str) -> None:
        """Words predict does not read, up to the next expression it does: a condition that says so."""
        end = next((k for k in range(start + 1, len(self.w)) if self.w[k] in STARTS and self.w[k - 1] not in TAKES_VALUE),
                   len(self.w))
        said = " ".join(self.w[start:end]) + (f" ({problem})" if problem else "")
        self.conditions.append(m.Unknown(said, self.where))

    def condition(self, c: m.Match) -> None:
        """A match in its place: before any statement that changed the packet, or not predicted."""
        if self.statements:
            raise CannotPredict("a match after a statement that changed the packet")
        self.conditions.append(c)

    def expression(self) -> bool:
        """Read the expression at self.i; False for one predict does not read."""
        word = self.word()
        if word == "counter":
            if self.word(1) == "name":  # a named counter object: not read
                return False
            self.i += 1
        elif word == "comment":
            self.i += 2
        elif word in VERDICTS:
            self.verdict = VERDICTS[word]
            if word in ("jump", "goto"):
                self.chain = self.word(1)
                self.i += 1
            self.i += 1
        elif word == "meta" and self.word(1) in ("l4proto", "nfproto") or word in ("ip", "ip6") and self.word(1) in (
                "protocol", "nexthdr"):
            return self.protocol()
        elif word == "meta" or word in BARE_META:
            return self.meta()
        elif word in ("ip", "ip6"):
            return self.address()
        elif word in ("tcp", "udp", "th"):
            return self.port()
        elif word == "ct":
            return self.conntrack()
        elif word == "redirect":
            return self.redirect()
        elif word == "tproxy":
            return self.tproxy()
        elif word == "reject":
            self.i += 1
            if self.word() == "with":  # with tcp reset, with icmp[x] [type] port-unreachable ...
                self.i = next((k for k in range(self.i + 1, len(self.w)) if self.w[k] in STARTS), len(self.w))
            self.end = targets.Reject()
            self.placements.append(REJECT)
        else:
            return False
        return True

    def value(self, start: int) -> tuple[bool, str, str]:
        """After a match's key: (negated, value, the whole match in the rule's words)."""
        negated = OPERATORS.get(self.word(), None)
        if negated is not None:
            self.i += 1
        elif self.word() in ("<", ">", "<=", ">=", "lt", "gt", "le", "ge"):
            raise CannotPredict(f"the comparison {self.word()}")
        value = self.word()
        if not value:
            raise CannotPredict("a match with no value")
        self.i += 1
        return bool(negated), value, " ".join(self.w[start:self.i])

    def protocol(self) -> bool:
        start, family, key = self.i, x.FAMILIES.get(self.word()), self.word(1)
        self.i += 2
        negated, value, said = self.value(start)
        if key == "nfproto":
            families = tuple({"ipv4": 4, "ipv6": 6}.get(v) for v in nftset.elements(value))
            if None in families:
                raise CannotPredict(f"{value!r} is not ipv4 or ipv6")
            self.condition(x.Protocol(said, families, negated, nfproto=True))
        else:
            self.condition(x.Protocol(said, _protocols(value), negated, family=family))
        return True

    def meta(self) -> bool:
        start = self.i
        if self.word() == "meta":
            self.i += 1
        key = self.word()
        if key not in BARE_META:
            return False
        self.i += 1
        if self.word() == "set":
            self.i += 1
            return self.set_meta(key)
        mask = 0xFFFFFFFF
        if key == "mark" and self.word() in ("&", "and"):
            mask = _number(self.word(1))
            self.i += 2
        negated, value, said = self.value(start)
        if key in ("skuid", "skgid"):
            self.condition(x.Owner(said, key[2:], _ids(value), negated, self.where))
        elif key == "mark":
            self.condition(x.Mark(said, tuple(_number(v) for v in nftset.elements(value)), mask, negated=negated))
        elif key in ("iifname", "oifname", "iif", "oif"):
            self.condition(x.Interface(said, key, tuple(nftset.elements(value)), negated))
        else:
            return False
        return True

    def set_meta(self, key: str) -> bool:
        value = self.word()
        if key == "nftrace" and value.isdigit():
            self.i += 1  # marks the packet for nftrace: nothing the walk changes
        elif key == "mark" and (value, self.word(1)) == ("ct", "mark"):
            self.condition(x.Tracked("meta mark set ct mark"))
            self.statements.append(x.SetMark(None))
            self.i += 2
        elif key == "mark" and value not in STARTS:
            self.statements.append(x.SetMark(_number(value)))
            self.i += 1
        else:
            return False
        return True

    def address(self) -> bool:
        start, family, which = self.i, x.FAMILIES[self.word()], self.word(1)
        if which not in ("saddr", "daddr"):
            return False
        self.i += 2
        negated, value, said = self.value(start)
        try:
            nets = tuple(inet.network(e, family) for e in nftset.elements(value))
        except ValueError as e:
            raise CannotPredict(str(e)) from None
        self.condition(x.Address(said, which, nets, negated))
        return True

    def port(self) -> bool:
        start, proto, which = self.i, self.word(), self.word(1)
        if which not in ("sport", "dport"):
            return False
        self.i += 2
        negated, value, said = self.value(start)
        self.condition(x.Port(said, proto, which, _ports(value), negated))
        return True

    def conntrack(self) -> bool:
        start, key = self.i, self.word(1)
        self.i += 2
        if self.word() == "set":
            value = self.word(1)
            self.i += 2
            if key == "mark" and value in ("mark", "meta"):
                self.i += 1 if value == "meta" and self.word() == "mark" else 0
                self.statements.append(x.SetConnectionMark(None))
            elif key == "mark" and value not in STARTS:
                self.statements.append(x.SetConnectionMark(_number(value)))
            elif key == "zone" and value.isdigit():
                self.statements.append(x.SetZone(int(value)))
            else:
                return False
            return True
        if key == "state":
            negated, value, said = self.value(start)
            states = frozenset(s.strip() for e in nftset.elements(value) for s in e.split(","))
            if states - set(x.CT_STATES):
                raise CannotPredict(f"no ct state {sorted(states - set(x.CT_STATES))[0]}")
            self.condition(x.State(said, states, negated))
        elif key == "mark":
            mask = 0xFFFFFFFF
            if self.word() in ("&", "and"):
                mask = _number(self.word(1))
                self.i += 2
            negated, value, said = self.value(start)
            self.condition(x.Mark(said, tuple(_number(v) for v in nftset.elements(value)), mask, True, negated))
        else:
            return False
        return True

    def redirect(self) -> bool:
        self.i += 1
        port = None
        if self.word() == "to":
            spec = self.word(1).lstrip(":")
            if not spec.isdigit():
                raise CannotPredict(f"redirect to {self.word(1)}: a port range lets the kernel pick the port"
                                    if "-" in spec else f"redirect to {self.word(1)}")
            port = int(spec)
            self.i += 2
        if self.i < len(self.w) and self.word() not in STARTS:  # flags: random, persistent, ...
            return False
        self.end = targets.Redirect(port)
        self.placements.append(REDIRECT)
        return True

    def tproxy(self) -> bool:
        start = self.i
        self.i += 1
        family, named = self.family, ""
        if self.word() in x.FAMILIES:
            named, family = self.word(), x.FAMILIES[self.word()]
            if self.family not in (None, family):
                raise Refused(f"nft refuses {self.where}: tproxy {named} in an {'ip6' if self.family == 6 else 'ip'} "
                              f"table")
            self.i += 1
        if self.word() != "to":
            return False
        spec = self.word(1)
        self.i += 2
        address, port = _endpoint(spec, family, f"{named} to {spec}".strip(), self.where)
        found = x.TransparentSocket(" ".join(self.w[start:self.i]), family, address, port)
        self.condition(found)
        self.statements.append(x.AssignSocket(found))
        self.placements.append(TPROXY)
        return True


def _endpoint(spec: str, family: int | None, said: str, where: str) -> tuple[int, int]:
    """`:15006`, `127.0.0.1`, `127.0.0.1:15006`, `[::1]:15006`: (address or 0, port or 0).  An
    address must be of the statement's family, which an inet table's must name (nft says so)."""
    if spec.startswith(":"):
        host, port = "", spec[1:]
    elif spec.startswith("["):
        host, _, port = spec[1:].partition("]")
        port = port.lstrip(":")
    elif spec.count(":") == 1:  # an IPv4 address and a port (an IPv6 address has two colons or more)
        host, port = spec.split(":")
    else:
        host, port = spec, ""
    if port and not port.isdigit():
        raise CannotPredict(f"tproxy {said}: give one port")
    if not host:
        return 0, int(port) if port else 0
    if family is None:
        raise Refused(f"nft refuses {where}: tproxy to an address in an inet table needs ip or ip6")
    try:
        found, address = inet.parse(host)
    except ValueError:
        raise CannotPredict(f"tproxy {said}: not an address") from None
    if found != family:
        raise Refused(f"nft refuses {where}: tproxy {said}: not an IPv{family} address")
    return address, int(port) if port else 0
