"""The iptables-save format: parse a dump into tables, chains and rule lines.

Pure text work, no kernel: the lab keeps rule sets in this format because it
is what people copy out of a real pod (`iptables-save`) and what the kernel
reads back, so a profile and a pod's dump compare line for line.
"""

from __future__ import annotations

import shlex
from collections import Counter
from dataclasses import dataclass, field

from ..netfilter import BUILTIN_CHAINS, RuleRef



class SaveFormatError(ValueError):
    """A line of a dump that cannot be understood; names the line."""

    def __init__(self, source: str, lineno: int, line: str, problem: str):
        super().__init__(f"{source}:{lineno}: {problem}: {line.strip()!r}")
        self.lineno = lineno


@dataclass(frozen=True)
class RuleLine:
    """One `-A CHAIN ...` line: the chain and the rule's arguments after it."""

    chain: str
    args: tuple[str, ...]
    lineno: int = field(default=0, compare=False)  # where the dump had it (0: built, not read)

    @property
    def target(self) -> str | None:
        """The `-j` (or `-g`) target: a chain of the rule set, or a built-in target."""
        return self.option("-j") or self.option("-g")

    def option(self, name: str) -> str | None:
        """The word after `name` (`--to-ports` -> "15001"), None if the rule has no such option."""
        args = list(self.args)
        return args[args.index(name) + 1] if name in args[:-1] else None

    @classmethod
    def parse(cls, line: str) -> "RuleLine":
        """A rule as the kernel lists it, `-A CHAIN args...`."""
        tokens = shlex.split(line)
        if len(tokens) < 2 or tokens[0] != "-A":
            raise ValueError(f"not a rule line: {line!r}")
        return cls(tokens[1], tuple(tokens[2:]))

    @property
    def spec(self) -> str:
        return " ".join(f'"{a}"' if not a or " " in a else a for a in self.args)

    def __str__(self) -> str:
        return f"-A {self.chain} {self.spec}"


@dataclass
class TableDump:
    name: str
    policies: dict[str, str] = field(default_factory=dict)  # builtin chain -> policy
    chains: list[str] = field(default_factory=list)  # user chains, in order
    rules: list[RuleLine] = field(default_factory=list)

    def chain_rules(self, chain: str) -> list[RuleLine]:
        return [r for r in self.rules if r.chain == chain]

    def lines(self) -> list[str]:
        """The table's rule lines in save order (what a round trip compares)."""
        return [str(r) for r in self.rules]


@dataclass
class Dump:
    tables: dict[str, TableDump] = field(default_factory=dict)
    family: int = 4  # 4: what iptables-save prints, 6: ip6tables-save

    def lines(self) -> list[str]:
        return [line for t in self.tables.values() for line in t.lines()]

    def text(self, header: tuple[str, ...] = ()) -> str:
        """The dump as iptables-save prints it (counters zero), after `header` comment lines."""
        out = [f"# {line}" for line in header]
        for t in self.tables.values():
            out.append(f"*{t.name}")
            out += [f":{name} {t.policies.get(name, 'ACCEPT')} [0:0]" for name in BUILTIN_CHAINS[t.name]]
            out += [f":{name} - [0:0]" for name in t.chains]
            out += t.lines()
            out.append("COMMIT")
        return "\n".join(out) + "\n"


def parse(text: str, source: str = "<rules>", family: int = 4) -> Dump:
    dump = Dump(family=family)
    table: TableDump | None = None
    for lineno, line in enumerate(text.splitlines(), 1):
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue

        def fail(problem: str) -> SaveFormatError:
            return SaveFormatError(source, lineno, line, problem)

        if stripped.startswith("*"):
            if table is not None:
                raise fail(f"table {table.name} has no COMMIT before this")
            name = stripped[1:]
            if name not in BUILTIN_CHAINS:
                raise fail(f"unknown table {name!r}")
            table = dump.tables.setdefault(name, TableDump(name))
        elif table is None:
            raise fail("line outside a table (a dump starts tables with *nat, *mangle, ...)")
        elif stripped == "COMMIT":
            table = None
        elif stripped.startswith(":"):
            _parse_chain(stripped, table, fail)
        elif stripped.startswith("-A "):
            try:
                tokens = shlex.split(stripped)
            except ValueError as e:
                raise fail(str(e)) from None
            if len(tokens) < 3:
                raise fail("rule with no match or target")
            chain = tokens[1]
            if chain not in BUILTIN_CHAINS[table.name] and chain not in table.chains:
                raise fail(f"chain {chain} is not declared in table {table.name}")
            table.rules.append(RuleLine(chain, tuple(tokens[2:]), lineno))
        else:
            raise fail("expected *table, :CHAIN, -A CHAIN or COMMIT")
    if table is not None:
        raise SaveFormatError(source, lineno, "", f"table {table.name} never COMMITs")
    return dump


@dataclass(frozen=True)
class NumberedRule:
    ref: RuleRef  # numbered from the chain's head, starting at 1, as the kernel counts
    line: str  # iptables-save form: "-A CHAIN ..."
    packets: int
    bytes: int


def counted(text: str, source: str, family: int = 4) -> tuple[Dump, list[NumberedRule]]:
    """A save tool's `-c` output (`[packets:bytes] -A CHAIN ...`): the dump, and each rule
    numbered in its chain with its counters, tables in the order printed."""
    counters, lines = [], []
    for line in text.splitlines():
        if line.startswith("[") and "] -A " in line:
            packets_bytes, line = line[1:].split("] ", 1)
            counters.append(tuple(map(int, packets_bytes.split(":"))))
        lines.append(line)
    dump = parse("\n".join(lines), source, family)
    rules = [(t.name, r) for t in dump.tables.values() for r in t.rules]
    out, numbers = [], Counter()
    for (table, rule), (packets, nbytes) in zip(rules, counters):
        numbers[table, rule.chain] += 1
        out.append(NumberedRule(RuleRef(table, rule.chain, numbers[table, rule.chain]), str(rule), packets, nbytes))
    return dump, out


def _parse_chain(line: str, table: TableDump, fail) -> None:
    parts = line[1:].split()
    if len(parts) < 2:
        raise fail("chain line needs a name and a policy")
    name, policy = parts[0], parts[1]
    if name in BUILTIN_CHAINS[table.name]:
        if policy not in ("ACCEPT", "DROP"):
            raise fail(f"policy of {name} must be ACCEPT or DROP")
        table.policies[name] = policy
    elif policy != "-":
        raise fail(f"user chain {name} cannot have policy {policy}")
    elif name not in table.chains:
        table.chains.append(name)
