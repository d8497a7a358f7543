"""Native nftables rule sets (Istio 1.27+'s `nativeNftables`, a user's `nft -f` script).

A script is applied as Istio applies its own (`nft -f -`): one batch, so the kernel takes
all of it or none.  Its rules come back with their handles, positions and counters, and
their text as `nft list` prints it; the tables it made can be deleted again.
"""

from __future__ import annotations

from ..save import NumberedRule
from . import libnft

TableId = tuple[str, str]  # (family, name), as nft names a table: `inet istio-proxy-nat`


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


def listing(ns: str, table: TableId, ip_version: int = 4) -> list[NumberedRule]:
    """Every rule of a table, numbered by its position in its chain, with its text as `nft
    list` prints it (counter values left out) and its counters."""
    rules = libnft.read(ns, ip_version, [table], words=True)
    return [NumberedRule(ref, rule.text, rule.packets or 0, rule.bytes or 0) for ref, rule in rules.numbered()]
