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

from ...netfilter import BUILTIN_CHAINS, TABLES, RuleRef
from ..save import Dump, RuleLine, TableDump, parse
from ..xtables import RESTORE_DEADLINE, NumberedRule, RuleError
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


def touch(ns: str, family: int = 4) -> None:
    """Make every xtables table exist in nf_tables with its built-in chains, leaving any
    rules in place: only a chain that exists reports nftrace events, and legacy's TRACE
    names each built-in chain's policy (`filter:INPUT:policy`), which the paths use.  Only the
    tables absent are made: a table's chain lines would set its policies back to ACCEPT."""
    made = set(present(ns, family))
    empty = Dump({name: TableDump(name) for name in TABLES if name not in made}, family)
    if empty.tables:
        _tool(ns, [TOOLS[family][0], "--noflush"], empty.text())


def listing(ns: str, table: str, family: int = 4) -> list[NumberedRule]:
    """Every rule of a table in `ns`, numbered per chain, as iptables-nft-save prints it,
    with its counters.  An absent table lists no rule."""
    out = _tool(ns, [TOOLS[family][1], "-c", "-t", table])
    counters, lines = [], []
    for line in out.splitlines():  # "[packets:bytes] -A CHAIN ...": counters first
        if line.startswith("[") and "] -A " in line:
            packets_bytes, line = line[1:].split("] ", 1)
            counters.append(tuple(map(int, packets_bytes.split(":"))))
        lines.append(line)
    dump = parse("\n".join(lines), TOOLS[family][1], family).tables.get(table)
    rules, numbers = [], {}
    for rule, (packets, nbytes) in zip(dump.rules if dump else (), counters):
        numbers[rule.chain] = numbers.get(rule.chain, 0) + 1
        rules.append(NumberedRule(RuleRef(table, rule.chain, numbers[rule.chain]), str(rule), packets, nbytes))
    return rules


def saved(ns: str, family: int = 4) -> Dump:
    """Every xtables table iptables-nft made in `ns`, as iptables-nft-save prints it."""
    return parse(_tool(ns, [TOOLS[family][1]]), TOOLS[family][1], family)


def present(ns: str, family: int = 4) -> list[str]:
    """The xtables tables iptables-nft made in `ns` for one family."""
    return [name for fam, name in libnft.tables(ns) if fam == FAMILY[family] and name in BUILTIN_CHAINS]


def packet_counts(ns: str, tables: tuple[str, ...], family: int = 4) -> dict[RuleRef, int]:
    """Each rule's packet counter in the named tables, read from nf_tables' listing (one
    libnftables call per table, no iptables-nft-save): what a scenario reads twice."""
    return libnft.read(ns, family, [(FAMILY[family], t) for t in tables]).counters()
