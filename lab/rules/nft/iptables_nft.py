"""iptables rule sets in nf_tables, written and read as iptables-nft writes and reads them.

iptables-nft turns each iptables-save table into an nf_tables table of family `ip` (`ip6`
for ip6tables) with the same name, its built-in chains as base chains at the xtables
priorities (raw -300, mangle -150, nat -100, filter 0, security 50), matches nf_tables
has natively (addresses, ports, interfaces) as nf_tables expressions, and the rest
(owner, multiport, REDIRECT) through the xt compatibility layer (nft_compat), each rule
with a counter.  No library exposes that translation: the rule set goes through
iptables-nft-restore, run inside the pod's namespace; the rules come back as
iptables-nft-save prints them, and by handle from nf_tables' own listing.
"""

from __future__ import annotations

import re
import subprocess

from ...netfilter import BUILTIN_CHAINS
from .. import nftset
from ..save import Dump, NumberedRule, RuleLine, counted
from ..xtables import RESTORE_DEADLINE, RuleError
from . import libnft

FAMILY = {4: "ip", 6: "ip6"}
TOOLS = {4: ("iptables-nft-restore", "iptables-nft-save"), 6: ("ip6tables-nft-restore", "ip6tables-nft-save")}


def _tool(ns: str, argv: list[str], text: str = "") -> str:
    """One iptables-nft command run in `ns` (the child inherits the thread's namespace)."""
    try:
        with libnft.inside(ns):
            done = subprocess.run(argv, input=text, capture_output=True, text=True, timeout=RESTORE_DEADLINE)
    except OSError as e:
        raise RuleError(f"{argv[0]}: cannot run it: {e.strerror}") from None
    except subprocess.TimeoutExpired:
        raise RuleError(f"{argv[0]}: no answer in {RESTORE_DEADLINE}s") from None
    if done.returncode:
        raise RuleError(f"{argv[0]}: the kernel refused the rules: {' '.join(done.stderr.split())}")
    return done.stdout


def apply(ns: str, dump: Dump) -> None:
    """Replace each table of the dump in `ns` with the dump's content, in one transaction
    (iptables-nft-restore sends the whole file as one nf_tables batch).  A rule it refuses
    is named as legacy names it: the dump's line, its table, the rule."""
    text = dump.text()
    try:
        _tool(ns, [TOOLS[dump.family][0]], text)
    except RuleError as e:
        at = re.search(r"Error occurred at line: (\d+)", str(e))
        rule = _rule_at(dump, text, int(at.group(1))) if at else None
        if rule is None:
            raise
        table, line = rule
        where = f"line {line.lineno}: " if line.lineno else ""
        raise RuleError(f"{where}{table}: {line}: {str(e).split(': ', 2)[-1]}") from None


def _rule_at(dump: Dump, text: str, number: int) -> tuple[str, RuleLine] | None:
    """The dump's rule on line `number` of its text (dump.text()), with its table."""
    table, rules = None, iter(())
    for i, line in enumerate(text.splitlines(), 1):
        if line.startswith("*"):
            table = line[1:]
            rules = iter(dump.tables[table].rules)
        elif line.startswith("-A "):
            rule = next(rules)
            if i == number:
                return table, rule
    return None


def listing(ns: str, table: str, family: int = 4) -> list[NumberedRule]:
    """Every rule of a table in `ns`, numbered per chain, as iptables-nft-save prints it,
    with its counters.  An absent table lists no rule."""
    _, rules = counted(_tool(ns, [TOOLS[family][1], "-c", "-t", table]), TOOLS[family][1], family)
    return rules


def made(table: nftset.Table) -> bool:
    """Is this nf_tables table one iptables-nft made (`ip nat` with its built-in chains by
    their xtables names), as opposed to a native table that happens to share its name?"""
    builtin = BUILTIN_CHAINS.get(table.name)
    return table.family in FAMILY.values() and builtin is not None and all(
        c.name in builtin for c in table.chains.values() if c.base)
