"""Netfilter's vocabulary, defined once: tables in the order packets meet them, their
built-in chains, the hooks, the targets that are not jumps, and how a rule is named.

Every backend, the path joiner, the reports and the predictor speak these words.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

# The xtables tables in the order a packet meets them at a hook (priorities raw -300,
# mangle -150, nat -100 on the way in, filter 0, security 50), each with its built-in chains.
BUILTIN_CHAINS = {
    "raw": ("PREROUTING", "OUTPUT"),
    "mangle": ("PREROUTING", "INPUT", "FORWARD", "OUTPUT", "POSTROUTING"),
    "nat": ("PREROUTING", "INPUT", "OUTPUT", "POSTROUTING"),
    "filter": ("INPUT", "FORWARD", "OUTPUT"),
    "security": ("INPUT", "FORWARD", "OUTPUT"),
}
TABLES = tuple(BUILTIN_CHAINS)
# The tables whose rules make a path's hops.  filter and security decide nothing Istio
# does; raw's built-in chains hold the lab's own TRACE rules, its own chains (DNS
# capture's conntrack zones) do make hops.
PATH_TABLES = ("raw", "mangle", "nat")
HOOKS = ("PREROUTING", "INPUT", "FORWARD", "OUTPUT", "POSTROUTING")
# Where each xtables table sits at each hook (the kernel's NF_IP_PRI_*); nat translates
# destinations at -100 (PREROUTING, OUTPUT) and sources at 100 (INPUT, POSTROUTING).
XT_PRIORITIES = {"raw": -300, "mangle": -150, "nat": -100, "filter": 0, "security": 50}
SOURCE_NAT_HOOKS = ("INPUT", "POSTROUTING")


def xt_priority(table: str, hook: str) -> int:
    return 100 if table == "nat" and hook in SOURCE_NAT_HOOKS else XT_PRIORITIES.get(table, 0)


# A pod whose rules both backends wrote holds two tables of each name: legacy's are named
# `legacy-nat`, ... beside nf_tables' `nat` (the backend reads them so, predict names them so).
LEGACY_PREFIX = "legacy-"

# Targets that end, mark or rewrite, as opposed to a jump into a chain of the rule set.
BUILTIN_TARGETS = frozenset({
    "ACCEPT", "DROP", "RETURN", "REJECT", "QUEUE", "NFQUEUE", "REDIRECT", "DNAT", "SNAT", "MASQUERADE",
    "TPROXY", "MARK", "CONNMARK", "CT", "TRACE", "LOG", "NFLOG",
})


@dataclass(frozen=True, order=True)
class RuleRef:
    """One rule of a rule set: its table, its chain, its number from the chain's head (from 1,
    as `iptables -L --line-numbers` and the article count; in nft, its position in the chain)."""

    table: str
    chain: str
    number: int

    def __str__(self) -> str:
        """The form reports and JSON use: `ISTIO_OUTPUT#9`, `mangle:ISTIO_INBOUND#8` (nat needs no prefix)."""
        where = self.chain if self.table == "nat" else f"{self.table}:{self.chain}"
        return f"{where}#{self.number}"

    @property
    def chain_ref(self) -> tuple[str, str]:
        return self.table, self.chain

    _TEXT = re.compile(r"^(?:(?P<table>[a-z][a-z0-9-]*):)?(?P<chain>.+)#(?P<number>\d+)$")

    @classmethod
    def parse(cls, text: str) -> "RuleRef":
        """Read back the form __str__ writes (recorded observations, JSON)."""
        m = cls._TEXT.match(text)
        if not m:
            raise ValueError(f"not a rule reference: {text!r}")
        return cls(m["table"] or "nat", m["chain"], int(m["number"]))


# The xtables table whose part an nf_tables table plays, by its base chains: a `nat` chain
# makes a nat table; otherwise the earliest priority says it (raw -300, mangle -150).
ROLE_PRIORITIES = (("raw", -300), ("mangle", -150))


@dataclass(frozen=True)
class Layout:
    """Where a rule set's tables and chains sit in netfilter, so the path joiner can read
    events of any rule set.

    xtables (legacy, and what iptables-nft makes) need none: a table's name is its part
    (nat, mangle, raw) and a chain named after a hook is that hook's built-in chain.  An
    nf_tables table of its own (Istio's `inet istio-proxy-nat`) names itself and its base
    chains as it likes: `roles` says which xtables table each plays, `hooks` which hook
    each base chain is (`("istio-proxy-nat", "output") -> "OUTPUT"`).
    """

    roles: tuple[tuple[str, str], ...] = ()  # (table, nat | mangle | raw | filter)
    hooks: tuple[tuple[str, str, str], ...] = ()  # (table, chain, PREROUTING | INPUT | ...)
    backends: tuple[tuple[str, str], ...] = ()  # (table, legacy | nft): a pod whose rules both backends wrote

    def backend(self, table: str) -> str:
        """Which backend holds the table, in a pod whose rules both hold; "" otherwise."""
        return dict(self.backends).get(table, "")

    def role(self, table: str) -> str:
        """The xtables table `table` plays: itself for an xtables table."""
        return dict(self.roles).get(table, table)

    def hook(self, table: str, chain: str) -> str | None:
        """The hook a base chain is attached to; None for a chain entered by a jump."""
        if table in dict(self.roles):
            return next((hook for t, c, hook in self.hooks if (t, c) == (table, chain)), None)
        return chain if chain in HOOKS else None

    def merged(self, other: "Layout") -> "Layout":
        return Layout(*(tuple(dict.fromkeys(mine + theirs)) for mine, theirs in
                        ((self.roles, other.roles), (self.hooks, other.hooks), (self.backends, other.backends))))

    def as_json(self) -> dict:
        return {"roles": dict(self.roles), "hooks": [list(h) for h in self.hooks],
                **({"backends": dict(self.backends)} if self.backends else {})}

    @classmethod
    def from_json(cls, data: dict) -> "Layout":
        return cls(tuple(data.get("roles", {}).items()), tuple(tuple(h) for h in data.get("hooks", ())),
                   tuple(data.get("backends", {}).items()))
