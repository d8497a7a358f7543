"""Native nftables rule sets (Istio 1.27+'s `nativeNftables`, a user's `nft -f` script).

A script is applied as Istio applies its own (`nft -f -`): one batch, so the kernel takes
all of it or none.  Its rules come back with their handles, positions and counters, and
their text as `nft list` prints it; the tables it made can be deleted again.
"""

from __future__ import annotations

import re

from ..xtables import NumberedRule
from . import libnft
from .ruleset import Ruleset

TableId = tuple[str, str]  # (family, name), as nft names a table: `inet istio-proxy-nat`

_CHAIN = re.compile(r"^\s*chain (?P<name>\S+) \{")
_RULE = re.compile(r"^\s*(?P<text>.*\S)\s+# handle (?P<handle>\d+)$")
_COUNTER = re.compile(r"counter packets \d+ bytes \d+")


def apply(ns: str, script: str, source: str = "<rules>") -> list[TableId]:
    """Run the script in `ns` in one transaction; the tables that exist now and did not
    before, which delete() removes.  An error names `source` and the script's line."""
    before = set(libnft.tables(ns))
    libnft.run(ns, script, source)
    return [t for t in libnft.tables(ns) if t not in before]


def delete(ns: str, tables: list[TableId]) -> None:
    """Delete the tables, all in one transaction."""
    if tables:
        libnft.run(ns, "".join(f"delete table {family} {name}\n" for family, name in tables), "delete tables")


def rule_texts(ns: str, table: TableId) -> dict[int, str]:
    """Each rule's text by handle, as `nft list` prints it (counter values left out)."""
    texts, in_chain = {}, False
    for line in libnft.text(ns, f"table {table[0]} {table[1]}").splitlines():
        if _CHAIN.match(line):
            in_chain = True
        elif line.strip() == "}":
            in_chain = False
        elif in_chain and (m := _RULE.match(line)):
            texts[int(m["handle"])] = _COUNTER.sub("counter", m["text"])
    return texts


def listing(ns: str, table: TableId, ip_version: int = 4) -> list[NumberedRule]:
    """Every rule of a table, numbered by its position in its chain, with its text and counters."""
    texts = rule_texts(ns, table)
    rules = Ruleset(libnft.listing(ns, f"table {table[0]} {table[1]}"), ip_version).table_rules(*table)
    return [NumberedRule(r.ref, texts.get(r.handle, ""), r.packets or 0, r.bytes or 0)
            for r in rules]
