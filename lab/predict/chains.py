"""A rule set's tables and chains, and the walk of one packet through one table at one hook.

The walk is ipt_do_table's: rules in order from the built-in chain of the hook; the first
rule whose conditions all hold fires its target; a jump keeps a return point, a goto does
not; falling off a user chain returns, falling off a built-in chain (or RETURN there) is
its policy.

Loading checks what the kernel checks (translate_table): no chain may jump back into
itself, and a match or target that works only at some hooks or in one table (owner in
OUTPUT and POSTROUTING, REDIRECT in nat, TPROXY in mangle PREROUTING, ...) must not be
reachable from elsewhere; such a rule set is refused, so predict says so instead of
walking rules no kernel would run.

Long chains are indexed by what a rule needs of the packet: a destination or source
prefix, a destination port, a socket owner's uid or gid, the packet's whole mark.  A packet is tested only against the rules
that could match it (and the rules that need none of these), in order, so 10,000
`-d CIDR -j RETURN` rules cost a handful of dictionary lookups.
"""

from __future__ import annotations

import functools
from bisect import bisect_left
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..netfilter import BUILTIN_CHAINS
from ..rules.save import Dump
from . import inet, matches as m, rules as r
from .errors import CannotPredict
from .packet import Packet
from .targets import Jump, Verdict

if TYPE_CHECKING:
    from .stack import Namespace

INDEXED = 16  # chains with more rules than this get an index


class Chain:
    __slots__ = ("name", "table", "builtin", "rules", "index")

    def __init__(self, name: str, table: str, rules: list[r.Rule]):
        self.name, self.table, self.rules = name, table, rules
        self.builtin = name in BUILTIN_CHAINS[table]
        self.index = _Index(rules) if len(rules) > INDEXED else None

    def candidates(self, p: Packet) -> list[int]:
        """Positions of the rules that could match `p`, in order."""
        return self.index.candidates(p) if self.index else range(len(self.rules))

    def __len__(self) -> int:
        return len(self.rules)


@dataclass
class Table:
    name: str
    chains: dict[str, Chain]
    policies: dict[str, str]


# What makes the kernel track connections in a namespace (nf_ct_netns_get in a checkentry):
# conntrack is per namespace and family, and only on while some rule needs it.  Without it
# there is no connection, so no nat (an empty nat table is walked by nothing) and no
# SO_ORIGINAL_DST.
CONNTRACK_TARGETS = frozenset({"REDIRECT", "DNAT", "SNAT", "MASQUERADE", "NETMAP", "CT", "NOTRACK", "CONNMARK",
                               "CONNSECMARK"})
CONNTRACK_MATCHES = frozenset({"conntrack", "state", "connmark", "helper", "connbytes", "connlimit"})


@dataclass
class RuleSet:
    """One family's rules (an iptables-save or ip6tables-save dump), ready to walk."""

    family: int
    tables: dict[str, Table]

    @functools.cached_property
    def tracks_connections(self) -> bool:
        """Does any rule make the kernel track connections (a NAT or CT target, a conntrack match)?"""
        return any((rule.target is not None and rule.target.name in CONNTRACK_TARGETS)
                   or rule.modules & CONNTRACK_MATCHES
                   for table in self.tables.values() for chain in table.chains.values() for rule in chain.rules)


def load(dump: Dump) -> RuleSet:
    tables = {}
    for name, saved in dump.tables.items():
        declared = set(BUILTIN_CHAINS[name]) | set(saved.chains)
        numbered: dict[str, list[r.Rule]] = {chain: [] for chain in declared}
        for line in saved.rules:
            rules = numbered[line.chain]
            rules.append(r.read(name, len(rules) + 1, line, dump.family, declared))
        table = Table(name, {chain: Chain(chain, name, rules) for chain, rules in numbered.items()},
                      {chain: saved.policies.get(chain, "ACCEPT") for chain in BUILTIN_CHAINS[name]})
        _check(table)
        tables[name] = table
    return RuleSet(dump.family, tables)


def _check(table: Table) -> None:
    """What the kernel refuses when the table is loaded: chains that loop, and matches or
    targets reached from a hook (or in a table) they do not work in."""
    hooks: dict[str, set[str]] = {name: set() for name in table.chains}

    def visit(chain: Chain, hook: str, path: tuple[str, ...]) -> None:
        if chain.name in path:
            raise CannotPredict(f"the kernel refuses table {table.name}: chain {chain.name} jumps back into itself "
                                f"({' -> '.join(path + (chain.name,))})")
        if hook in hooks[chain.name] and not chain.builtin:
            return
        hooks[chain.name].add(hook)
        for rule in chain.rules:
            if isinstance(rule.target, Jump) and rule.target.chain in table.chains:
                visit(table.chains[rule.target.chain], hook, path + (chain.name,))

    for hook in BUILTIN_CHAINS[table.name]:
        visit(table.chains[hook], hook, ())
    for chain in table.chains.values():
        for rule in chain.rules:
            for module, allowed in r.MATCH_HOOKS.items():
                if module in rule.modules:
                    _allowed(rule, f"-m {module}", allowed, hooks[chain.name])
            t = rule.target
            if t is None:
                continue
            if t.TABLE and t.TABLE != table.name:
                raise CannotPredict(f"the kernel refuses {_where(rule)}: -j {t.name} works only in the "
                                    f"{t.TABLE} table")
            if t.HOOKS:
                _allowed(rule, f"-j {t.name}", t.HOOKS, hooks[chain.name])


def _allowed(rule: r.Rule, what: str, allowed: frozenset[str], reached: set[str]) -> None:
    wrong = sorted(reached - allowed)
    if wrong:
        raise CannotPredict(f"the kernel refuses {_where(rule)}: {what} works only in {' and '.join(sorted(allowed))}, "
                            f"and {rule.ref.chain} is reached from {' and '.join(wrong)}")


def _where(rule: r.Rule) -> str:
    ref = rule.ref
    return f"rule {ref.number} of {ref.chain}" + ("" if ref.table == "nat" else f" ({ref.table})")


class _Index:
    """Rule positions by the destination or source prefix (-d, -s), destination ports (--dport,
    --dports) or owner (--uid-owner, --gid-owner) a rule needs, and the rules that need none."""

    __slots__ = ("always", "by_prefix", "by_port", "by_block", "by_uid", "by_gid", "by_mark")
    BLOCK = 8  # a port range is filed under each 256-port block it touches

    def __init__(self, rules: list[r.Rule]):
        self.always: list[int] = []
        # (address, family, prefix) -> network -> positions; address is "dst" or "src"
        self.by_prefix: dict[tuple[str, int, int], dict[int, list[int]]] = {}
        self.by_port: dict[int, list[int]] = {}
        self.by_block: dict[int, list[int]] = {}
        self.by_uid: dict[int, list[int]] = {}
        self.by_gid: dict[int, list[int]] = {}
        self.by_mark: dict[int, list[int]] = {}  # the packet's own mark, matched whole (mask 0xffffffff)
        for i, rule in enumerate(rules):
            net = next((c for c in rule.conditions if type(c) in (m.Destination, m.Source) and not c.negated
                        and c.net.prefix), None)
            if net is not None:
                key = ("dst" if type(net) is m.Destination else "src", net.net.family, net.net.prefix)
                self.by_prefix.setdefault(key, {}).setdefault(net.net.net, []).append(i)
                continue
            kind, values = _needs(rule)
            for value in values:
                getattr(self, f"by_{kind}").setdefault(value, []).append(i)
            if not values:
                self.always.append(i)

    def candidates(self, p: Packet) -> list[int]:
        found = [self.always]
        for (address, family, prefix), nets in self.by_prefix.items():
            if family == p.family:
                hit = nets.get((p.dst if address == "dst" else p.src) & inet.Network(family, 0, prefix).mask)
                if hit:
                    found.append(hit)
        keys = [(self.by_port, p.dport), (self.by_block, p.dport >> self.BLOCK)]
        if p.owner is not None:
            keys += [(self.by_uid, p.owner.uid)] + [(self.by_gid, gid) for gid in (p.owner.gid, *p.owner.groups)]
        if self.by_mark:
            keys.append((self.by_mark, p.mark))
        for table, key in keys:
            hit = table.get(key)
            if hit:
                found.append(hit)
        return found[0] if len(found) == 1 else sorted(set().union(*found))


def _needs(rule: r.Rule) -> tuple[str, tuple[int, ...]]:
    """("port" | "block" | "uid" | "gid" | "mark", values): the first indexable thing a rule needs,
    provided nothing the kernel tests before it could raise (an Unknown condition must stay
    reachable); ("", ()) when there is none."""
    for c in rule.conditions:
        if isinstance(c, m.Unknown):
            return "", ()
        if c.negated:
            continue
        if type(c) is m.Port and c.which == "dport":
            if all(low == high for low, high in c.ranges):
                return "port", tuple(low for low, _ in c.ranges)
            blocks = {b for low, high in c.ranges for b in range(low >> _Index.BLOCK, (high >> _Index.BLOCK) + 1)}
            if len(blocks) <= 16:
                return "block", tuple(sorted(blocks))
        if type(c) is m.OwnerId and c.low == c.high and not c.groups:
            return c.kind, (c.low,)
        if type(c) is m.Mark and not c.of_connection and c.mask == 0xFFFFFFFF:
            return "mark", (c.value,)
    return "", ()


# --- the walk ---------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Hit:
    """A rule whose conditions all held: its target fired on `packet`."""

    chain: Chain
    rule: r.Rule
    packet: Packet


@dataclass(frozen=True, slots=True)
class Passed:
    """Rules [start, stop) of a chain that the packet passed without matching."""

    chain: Chain
    start: int
    stop: int
    packet: Packet


@dataclass(frozen=True, slots=True)
class Policy:
    """The walk fell off a built-in chain (or RETURNed from it): its policy decided."""

    table: str
    chain: str
    verdict: str
    packet: Packet


@dataclass(frozen=True, slots=True)
class TableWalk:
    verdict: Verdict  # ACCEPT, DROP or REJECT
    packet: Packet  # as it leaves the table
    steps: tuple
    killer: Hit | Policy | None = None  # what dropped or rejected it
    why: str = ""  # a target's own reason for dropping (TPROXY with no socket)


def walk(table: Table, hook: str, p: Packet, ns: "Namespace") -> TableWalk:
    """The packet through `table`'s built-in chain for `hook`, as ipt_do_table walks it."""
    steps: list = []
    chain = table.chains[hook]
    pos = 0
    callers: list[tuple[Chain, int]] = []
    while True:
        rules = chain.rules
        candidates = chain.candidates(p)
        found = -1
        for k in range(bisect_left(candidates, pos), len(candidates)):
            i = candidates[k]
            if rules[i].test(p, ns):
                found = i
                break
        if found < 0:
            if pos < len(rules):
                steps.append(Passed(chain, pos, len(rules), p))
            if callers:
                chain, pos = callers.pop()
                continue
            return _policy(table, hook, p, steps)
        if found > pos:
            steps.append(Passed(chain, pos, found, p))
        rule = rules[found]
        hit = Hit(chain, rule, p)
        steps.append(hit)
        if rule.target is None:
            pos = found + 1
            continue
        outcome = rule.target.fire(p, ns, hook)
        p, verdict = outcome.packet, outcome.verdict
        if verdict is Verdict.CONTINUE:
            pos = found + 1
        elif verdict is Verdict.JUMP or verdict is Verdict.GOTO:
            if verdict is Verdict.JUMP:
                callers.append((chain, found + 1))
            chain, pos = table.chains[rule.target.chain], 0
        elif verdict is Verdict.RETURN:
            if not callers:
                return _policy(table, hook, p, steps)
            chain, pos = callers.pop()
        elif verdict is Verdict.ACCEPT:
            return TableWalk(Verdict.ACCEPT, p, tuple(steps))
        else:
            return TableWalk(verdict, p, tuple(steps), hit, outcome.why)


def _policy(table: Table, hook: str, p: Packet, steps: list) -> TableWalk:
    verdict = table.policies[hook]
    policy = Policy(table.name, hook, verdict, p)
    steps.append(policy)
    if verdict == "DROP":
        return TableWalk(Verdict.DROP, p, tuple(steps), policy)
    return TableWalk(Verdict.ACCEPT, p, tuple(steps))
