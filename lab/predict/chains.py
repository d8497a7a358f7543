"""Tables, their chains and rules, and one packet's walk through a chain the kernel enters from a hook.

Both syntaxes come here as the same values: an iptables-save table (lab.predict.iptables) and
an nftables table (lab.predict.nft) are a Table of Chains of Rules, each rule a row of
conditions and a target, and a table's base chains say where the kernel enters it (hook,
priority, what kind of chain).  The walk is ipt_do_table's and nft_do_chain's, which agree on
everything a rule set here can say: rules in order from the base chain; the first rule whose
conditions all hold fires its target; a jump keeps a return point, a goto does not; falling
off a regular chain returns, falling off a base chain (or RETURN there) is its policy.

Loading checks what the kernel checks: no chain may jump back into itself, and a match or
target that works only at some hooks or in one table or chain type (owner in OUTPUT and
POSTROUTING, REDIRECT in nat, TPROXY in PREROUTING, ...) must not be reachable from
elsewhere; such a rule set is refused, so predict says so instead of walking rules no
kernel would run.

Long chains are indexed by what a rule needs of the packet (lab.predict.matches: each
condition says how it can be indexed): a packet is tested only against the rules that could
match it, and the rules that need none of these, in order, so 10,000 `-d CIDR -j RETURN`
rules cost a handful of dictionary lookups.
"""

from __future__ import annotations

from bisect import bisect_left
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from ..netfilter import RuleRef
from . import inet, matches as m
from .errors import CannotPredict
from .packet import Packet
from .targets import Target, Verdict

if TYPE_CHECKING:
    from .stack import Namespace

INDEXED = 16  # chains with more rules than this get an index


@dataclass(frozen=True)
class Placement:
    """Where the kernel accepts a match or target (xt_check_match, xt_check_target, nft's
    validate): only at these hooks, only in this table (iptables), only under a base chain
    of this type (nft)."""

    what: str  # as the rule says it: "-m owner", "-j REDIRECT", "redirect"
    hooks: frozenset[str] | None = None
    table: str | None = None
    kind: str | None = None


@dataclass(frozen=True, eq=False)
class Rule:
    """One rule, numbered in its chain from 1 (iptables -L --line-numbers; nft: its position)."""

    ref: RuleRef
    line: str  # as the rule set writes it
    conditions: tuple[m.Match, ...]  # in the order the kernel tests them
    target: Target | None  # None: a rule that only counts, and goes on
    tracks: bool = False  # loading it makes the kernel track connections (nf_ct_netns_get)
    placements: tuple[Placement, ...] = ()

    def test(self, p: Packet, ns) -> bool:
        for c in self.conditions:
            if not c.test(p, ns):
                return False
        return True

    def first_miss(self, p: Packet, ns) -> m.Match | None:
        """The condition that stops this packet, in the order the kernel tests them."""
        return next((c for c in self.conditions if not c.test(p, ns)), None)


@dataclass(frozen=True)
class Base:
    """A chain the kernel enters from a hook: an xtables table's built-in chain, or an nf_tables
    base chain.  `kind`: nat (run by the nat core), route (OUTPUT: routed again after a new mark
    or address, as mangle OUTPUT is) or filter."""

    chain: str
    hook: str  # PREROUTING, INPUT, FORWARD, OUTPUT, POSTROUTING
    priority: int
    kind: str
    policy: str = "ACCEPT"  # or DROP

    @property
    def acts(self) -> bool:
        return self.policy != "ACCEPT"


class Chain:
    __slots__ = ("name", "table", "hook", "rules", "index")

    def __init__(self, name: str, table: "Table", rules: list[Rule], hook: str | None = None):
        self.name, self.table, self.rules, self.hook = name, table, rules, hook  # hook: a base chain's
        self.index = _Index(rules) if len(rules) > INDEXED else None

    def candidates(self, p: Packet):
        """Positions of the rules that could match `p`, in order."""
        return self.index.candidates(p) if self.index else range(len(self.rules))

    def __len__(self) -> int:
        return len(self.rules)


@dataclass(eq=False)
class Table:
    """A table as the lab names it: `nat`, `istio-proxy-nat`, `legacy-nat` (legacy's, in a pod
    whose rules both backends wrote)."""

    name: str
    role: str  # the xtables table it is or plays: nat, mangle, raw, filter, security
    family: int | None  # 4 or 6; None for an nft inet table, which both meet
    backend: str = ""  # legacy or nft, in a pod whose rules both wrote
    chains: dict[str, Chain] = field(default_factory=dict)
    bases: tuple[Base, ...] = ()  # in the order the kernel registered them

    @property
    def qualifier(self) -> str:
        """What a hop of this table says after its rule, as lab.path writes it: nothing for a
        table that plays nat, else its name; in a pod both backends wrote, the backend (and
        the xtables table, if not nat): `(mangle, legacy)`."""
        if self.backend:
            return ", ".join(q for q in ("" if self.role == "nat" else self.role, self.backend) if q)
        return "" if self.role == "nat" else self.name

    def where(self, chain: str, number: int) -> str:
        """`rule 1 of OUTPUT (filter)`: a rule named in a refusal."""
        return f"rule {number} of {chain}" + (f" ({self.qualifier})" if self.qualifier else "")

    @property
    def tracks(self) -> bool:
        """Does any rule make the kernel track connections (a NAT or CT target, a conntrack match)?"""
        return any(rule.tracks for chain in self.chains.values() for rule in chain.rules)


def check(table: Table) -> None:
    """What the kernel refuses when the table is loaded: chains that loop, and matches or
    targets reached from a hook (or in a table, or under a chain type) they do not work in."""
    reached: dict[str, set[tuple[str, str]]] = {name: set() for name in table.chains}  # chain -> {(hook, kind)}

    def visit(chain: Chain, base: Base, path: tuple[str, ...]) -> None:
        if chain.name in path:
            raise CannotPredict(f"the kernel refuses table {table.name}: chain {chain.name} jumps back into itself "
                                f"({' -> '.join(path + (chain.name,))})")
        here = (base.hook, base.kind)
        if here in reached[chain.name] and chain.hook is None:
            return
        reached[chain.name].add(here)
        for rule in chain.rules:
            if rule.target is not None and rule.target.chain in table.chains:
                visit(table.chains[rule.target.chain], base, path + (chain.name,))

    for base in table.bases:
        visit(table.chains[base.chain], base, ())
    for chain in table.chains.values():
        hooks = {hook for hook, _ in reached[chain.name]}
        kinds = {kind for _, kind in reached[chain.name]}
        for rule in chain.rules:
            for place in rule.placements:
                where = table.where(chain.name, rule.ref.number)
                if place.table and place.table != table.role:
                    raise CannotPredict(f"the kernel refuses {where}: {place.what} works only in the {place.table} table")
                if place.kind and kinds - {place.kind}:
                    raise CannotPredict(f"the kernel refuses {where}: {place.what} works only under a base chain of "
                                        f"type {place.kind}, and {chain.name} is reached from one of type "
                                        f"{' and '.join(sorted(kinds - {place.kind}))}")
                wrong = sorted(hooks - place.hooks) if place.hooks else []
                if wrong:
                    raise CannotPredict(f"the kernel refuses {where}: {place.what} works only in "
                                        f"{' and '.join(sorted(place.hooks))}, and {chain.name} is reached from "
                                        f"{' and '.join(wrong)}")


class _Index:
    """Rule positions by what the first indexable condition of each rule needs (a destination or
    source prefix, a destination port or 256-port block, a socket owner's uid or gid, the
    packet's whole mark), and the rules that need none of these."""

    __slots__ = ("always", "by")

    def __init__(self, rules: list[Rule]):
        self.always: list[int] = []
        self.by: dict[tuple, dict[int, list[int]]] = {}  # key -> value -> positions
        for i, rule in enumerate(rules):
            found = _needs(rule)
            if found is None:
                self.always.append(i)
                continue
            key, values = found
            for value in values:
                self.by.setdefault(key, {}).setdefault(value, []).append(i)

    def candidates(self, p: Packet) -> list[int]:
        found = [self.always]
        for key, table in self.by.items():
            values = _values(key, p)
            if values is None:  # not known for this packet: every rule filed under the key tests it
                found.extend(table.values())
                continue
            for value in values:
                hit = table.get(value)
                if hit:
                    found.append(hit)
        return found[0] if len(found) == 1 else sorted(set().union(*found))


def _needs(rule: Rule) -> tuple[tuple, tuple[int, ...]] | None:
    """The first indexable thing a rule needs, provided nothing tested before it could refuse
    (Match.may_refuse): a packet the index skipped would have been refused there."""
    for c in rule.conditions:
        found = None if c.negated else c.index()
        if found is not None:
            return found
        if c.may_refuse():
            return None
    return None


def _values(key: tuple, p: Packet) -> tuple[int, ...] | None:
    """The packet's values for an index key (lab.predict.matches: Match.index); None where the
    index cannot say (a socket TPROXY assigned, whose owner predict does not know)."""
    kind = key[0]
    if kind == "prefix":
        _, which, family, prefix = key
        if family != p.family:
            return ()
        return ((p.dst if which == "dst" else p.src) & inet.Network(family, 0, prefix).mask,)
    if kind == "port":
        return (p.dport,)
    if kind == "block":
        return (p.dport >> m.PORT_BLOCK,)
    if kind == "mark":
        return (p.mark,)
    if p.owner is None:
        return None if p.socket is not None else ()
    return (p.owner.uid,) if kind == "uid" else (p.owner.gid, *p.owner.groups)


# --- the walk ---------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Hit:
    """A rule whose conditions all held: its target fired on `packet`."""

    chain: Chain
    rule: Rule
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
    """The walk fell off a base chain (or RETURNed from it): its policy decided."""

    table: str
    chain: str
    verdict: str
    packet: Packet


@dataclass(frozen=True, slots=True)
class TableWalk:
    table: Table
    verdict: Verdict  # ACCEPT, DROP or REJECT
    packet: Packet  # as it leaves the table
    steps: tuple
    killer: Hit | Policy | None = None  # what dropped or rejected it
    why: str = ""  # a target's own reason for dropping (TPROXY with no socket)


def walk(table: Table, base: Base, p: Packet, ns: "Namespace") -> TableWalk:
    """The packet through `table` from its base chain `base`, as ipt_do_table (nft_do_chain) walks it."""
    steps: list = []
    chain = table.chains[base.chain]
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
            return _policy(table, base, p, steps)
        if found > pos:
            steps.append(Passed(chain, pos, found, p))
        rule = rules[found]
        hit = Hit(chain, rule, p)
        steps.append(hit)
        if rule.target is None:
            pos = found + 1
            continue
        outcome = rule.target.fire(p, ns, base.hook)
        p, verdict = outcome.packet, outcome.verdict
        if verdict is Verdict.CONTINUE:
            pos = found + 1
        elif verdict is Verdict.JUMP or verdict is Verdict.GOTO:
            if verdict is Verdict.JUMP:
                callers.append((chain, found + 1))
            chain, pos = table.chains[rule.target.chain], 0
        elif verdict is Verdict.RETURN:
            if not callers:
                return _policy(table, base, p, steps)
            chain, pos = callers.pop()
        elif verdict is Verdict.ACCEPT:
            return TableWalk(table, Verdict.ACCEPT, p, tuple(steps))
        else:
            return TableWalk(table, verdict, p, tuple(steps), hit, outcome.why)


def _policy(table: Table, base: Base, p: Packet, steps: list) -> TableWalk:
    policy = Policy(table.name, base.chain, base.policy, p)
    steps.append(policy)
    if base.policy == "DROP":
        return TableWalk(table, Verdict.DROP, p, tuple(steps), policy)
    return TableWalk(table, Verdict.ACCEPT, p, tuple(steps))
