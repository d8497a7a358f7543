"""Where Istio's native nftables rules differ from its iptables ones, read from the two rule
sets themselves: the native set and the iptables-save dumps istio-iptables writes for the
same options.

Each nft chain has an iptables counterpart: a base chain is its table's built-in chain of
its hook (`istio-proxy-nat output` -> nat `OUTPUT`), a regular chain the chain of the same
name in iptables' spelling (`istio-output` -> `ISTIO_OUTPUT`).  Within a chain Istio
writes the same rules in the same order, with one difference of shape: one inet table
holds both families, so in a dual-stack pod each rule that names an address is followed
by its IPv6 twin in the same chain, where ip6tables keeps IPv6's rules in a table of their
own.  A rule is IPv4's if it names no IPv6 address (`ip6 ...`, `tproxy ip6`), IPv6's if it
names no IPv4 one; a chain's rules of one family, in order, are the iptables chain's of that
family, one for one, when the two sets hold the same rules: `numbering()` says where they
stand, and says so when they do not pair.
"""

from __future__ import annotations

from dataclasses import dataclass

from .nftset import RuleSet, role
from .save import Dump

FAMILY_WORDS = {4: ("ip",), 6: ("ip6",)}  # what an address match of each family starts with


@dataclass(frozen=True)
class Counterpart:
    """An nft chain and the iptables chain it mirrors."""

    table: str  # the nft table
    chain: str
    xt_table: str  # nat, mangle, raw
    xt_chain: str


def counterparts(rules: RuleSet) -> list[Counterpart]:
    """Every chain of the native rule set, with the iptables chain it stands for."""
    out = []
    for t in rules.tables.values():
        part = role(t)
        for c in t.chains.values():
            xt_chain = c.base.hook.upper() if c.base else c.name.upper().replace("-", "_")
            out.append(Counterpart(t.name, c.name, part, xt_chain))
    return out


def _family_of(words: list[str]) -> int | None:
    """4 or 6 for a rule that names only that family's addresses; None for both."""
    said = {f for f, starts in FAMILY_WORDS.items() for w in words if w in starts}
    said |= {6 for i, w in enumerate(words) if w == "tproxy" and words[i + 1:i + 2] == ["ip6"]}
    return next(iter(said)) if len(said) == 1 else None


def numbering(rules: RuleSet, dumps: tuple[Dump, ...], pair: Counterpart) -> dict[int, list[int]] | None:
    """family -> the nft positions of the iptables chain's rules 1, 2, ... of that family;
    None when the chain's rules of some family do not pair one for one."""
    table = next(t for t in rules.tables.values() if t.name == pair.table)
    nft_rules = table.chains[pair.chain].rules
    out = {}
    for dump in dumps:
        xt = dump.tables.get(pair.xt_table)
        if xt is None:
            continue
        wanted = len(xt.chain_rules(pair.xt_chain))
        mine = [i for i, r in enumerate(nft_rules, 1) if _family_of(r.words) in (None, dump.family)]
        if len(mine) != wanted:
            return None
        out[dump.family] = mine
    return out


def differences(rules: RuleSet, dumps: tuple[Dump, ...]) -> list[str]:
    """One line per difference the two rule sets show."""
    out = []
    families = sorted(d.family for d in dumps)
    tables = [t for t in rules.tables.values()]
    xt_names = ", ".join(f"{name}{' (ip6tables)' if d.family == 6 else ''}"
                         for d in dumps for name in d.tables if d.tables[name].rules)
    out.append(f"tables: nft writes {', '.join(f'{t.family} {t.name}' for t in tables)} "
               f"(one table per part, {'IPv4 and IPv6 in each' if all(t.family == 'inet' for t in tables) else 'by family'}); "
               f"iptables writes {xt_names}")
    words = [w for _, r in rules.numbered() for w in r.words]
    if "skuid" in words or "skgid" in words:
        out.append("owner: `skuid`/`skgid` (nf_tables' own socket match) where iptables has "
                   "`-m owner --uid-owner`/`--gid-owner` (xt_owner)")
    hooks = sorted({c.base.hook for t in tables for c in t.chains.values() if c.base})
    out.append(f"base chains: nft hooks {' and '.join(hooks)} only, each table making only the chains "
               f"that hold rules; iptables has every built-in chain of each table")
    for pair in counterparts(rules):
        where = numbering(rules, dumps, pair)
        if where is None:
            out.append(f"{pair.chain} ({pair.table}): its rules do not pair one for one with "
                       f"{pair.xt_chain} ({pair.xt_table})")
            continue
        moved = {f: pos for f, pos in where.items() if pos != list(range(1, len(pos) + 1))}
        for f, pos in sorted(moved.items()):
            label = "IPv6's" if f == 6 else "IPv4's"
            tool = "ip6tables'" if f == 6 else "iptables'"
            out.append(f"numbering: {label} rules of {tool} {pair.xt_chain} 1-{len(pos)} are {pair.chain} "
                       f"{', '.join(map(str, pos))} (each IPv4 address rule has its IPv6 twin after it, in one chain)")
    if 6 not in families and any(_family_of(r.words) == 6 for _, r in rules.numbered()):
        out.append("IPv6: nft holds IPv6 rules the iptables set has no ip6tables table for")
    if any(r.words[:3] == ["meta", "l4proto", "tcp"] and "dport" in r.words for _, r in rules.numbered()):
        out.append("protocol: Istio writes `meta l4proto tcp` before a `tcp dport` match that implies it "
                   "(nft lists it without: `tcp dport != 15008`), where iptables has `-p tcp -m tcp`")
    if "tproxy" in words:
        out.append("TPROXY: one nft rule diverts, marks and accepts (`tproxy ip to :15006 meta mark set "
                   "1337 accept`) where iptables' TPROXY target does the first two and ends the walk")
    counted = [r.counter for _, r in rules.numbered()]
    if counted and not any(counted):
        out.append("counters: Istio 1.27 writes none (1.28 put a `counter` in every rule); iptables counts "
                   "every rule; the lab adds a counter to every nft rule")
    return out
