"""A rule set as nf_tables lists it (libnftables' JSON), in the lab's words.

Pure data work, no kernel.  nf_tables names a rule by its handle (what trace events
carry), unique within its table and never reused while the table lives; the lab names
it by its position in its chain, counted from 1 as `iptables -L --line-numbers` counts:
`RuleRef(table, chain, position)`.  The listing gives rules in chain order, so a rule's
position is its rank among its chain's rules.

A RuleRef's table is the nf_tables table's name: iptables-nft's `ip nat` is "nat", so
its rules read `ISTIO_OUTPUT#9` exactly as on legacy; Istio's native `inet
istio-proxy-nat` is "istio-proxy-nat".  A packet of one IP version meets the tables of
one family (`ip` or `ip6`) and the `inet` ones, so a Ruleset holds those only; two of
them with one name (`ip nat` and `inet nat`) would make two rules one RuleRef, and are
refused.
"""

from __future__ import annotations

from dataclasses import dataclass

from ...netfilter import RuleRef

FAMILIES = {4: ("ip", "inet"), 6: ("ip6", "inet")}


@dataclass(frozen=True)
class Chain:
    family: str
    table: str
    name: str
    hook: str | None = None  # a base chain's hook ("prerouting", "output", ...); None for a regular chain
    type: str | None = None  # "filter", "nat", "route"
    priority: int | None = None
    policy: str | None = None  # "accept" | "drop"

    @property
    def is_base(self) -> bool:
        return self.hook is not None


@dataclass(frozen=True)
class Rule:
    family: str
    table: str
    chain: str
    handle: int
    position: int  # from the chain's head, from 1
    packets: int | None  # the rule's first counter; None for a rule with none
    bytes: int | None
    expr: tuple = ()  # libnftables' JSON statements, as listed (kept for callers that render them)

    @property
    def ref(self) -> RuleRef:
        return RuleRef(self.table, self.chain, self.position)


class RulesetError(ValueError):
    """A listing the lab cannot name rules in (two tables, one name)."""


class Ruleset:
    """The chains and rules of the tables an IPv4 (or IPv6) packet meets."""

    def __init__(self, items: list[dict], ip_version: int = 4):
        families = FAMILIES[ip_version]
        self.ip_version = ip_version
        self.chains: dict[tuple[str, str, str], Chain] = {}
        self.rules: list[Rule] = []
        self._by_handle: dict[tuple[str, str, int], Rule] = {}
        lengths: dict[tuple[str, str, str], int] = {}
        owners: dict[str, str] = {}  # table name -> its family, to refuse two of one name
        for item in items:
            if (t := item.get("table")) and t["family"] in families:
                if owners.setdefault(t["name"], t["family"]) != t["family"]:
                    raise RulesetError(f"tables {owners[t['name']]} {t['name']} and {t['family']} {t['name']} "
                                       f"both hold rules an IPv{ip_version} packet meets: their rules would share names")
            elif (c := item.get("chain")) and c["family"] in families:
                key = (c["family"], c["table"], c["name"])
                self.chains[key] = Chain(*key, c.get("hook"), c.get("type"), c.get("prio"), c.get("policy"))
            elif (r := item.get("rule")) and r["family"] in families:
                key = (r["family"], r["table"], r["chain"])
                lengths[key] = lengths.get(key, 0) + 1
                packets, nbytes = _counter(r.get("expr", ()))
                rule = Rule(*key, r["handle"], lengths[key], packets, nbytes, tuple(r.get("expr", ())))
                self.rules.append(rule)
                self._by_handle[r["family"], r["table"], r["handle"]] = rule
        self._lengths = lengths

    def rule(self, family: str, table: str, handle: int) -> Rule:
        """The rule a trace event names; KeyError if the listing has none with that handle
        (a rule added after the listing was read)."""
        return self._by_handle[family, table, handle]

    def ref(self, family: str, table: str, handle: int) -> RuleRef:
        return self.rule(family, table, handle).ref

    def chain(self, family: str, table: str, name: str) -> Chain:
        return self.chains[family, table, name]

    def length(self, family: str, table: str, chain: str) -> int:
        """How many rules the chain holds: a chain's end and its policy are numbered one past it."""
        return self._lengths.get((family, table, chain), 0)

    def counters(self) -> dict[RuleRef, int]:
        """Each rule's packet counter (rules with a counter only)."""
        return {rule.ref: rule.packets for rule in self.rules if rule.packets is not None}

    def table_rules(self, family: str, table: str) -> list[Rule]:
        return [r for r in self.rules if (r.family, r.table) == (family, table)]


def _counter(expr) -> tuple[int | None, int | None]:
    for statement in expr:
        if isinstance(statement, dict) and isinstance(statement.get("counter"), dict):
            return statement["counter"].get("packets", 0), statement["counter"].get("bytes", 0)
    return None, None
