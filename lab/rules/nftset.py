"""nftables rule sets as data: tables, chains and their rules in order.

One grammar reads both what people hand the lab: `nft -f` scripts such as Istio's goldens
(`add table`, `add chain`, `add rule`, `insert rule ... index N`, `flush table`) and `nft
list ruleset` output (nested `table inet x { chain y { type ...; policy accept; ... } }`),
as nft itself takes either.  A script is read by doing what nft would do to an empty rule
set, so `insert ... index N` lands where the kernel puts it.  A rule stays text, in the
words it was written or listed in; its 1-based position in its chain is its number,
`RuleRef(table, chain, number)`, as iptables rules are numbered.

Written back as one `nft -f` transaction that replaces each table whole, with a counter in
every rule: the counters are one of the lab's witnesses.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass, field, replace
from typing import Iterator

from ..errors import LabError
from ..netfilter import ROLE_PRIORITIES, Layout, RuleRef

FAMILIES = ("ip", "ip6", "inet", "arp", "bridge", "netdev")
IP_FAMILIES = {4: ("ip", "inet"), 6: ("ip6", "inet")}  # the tables a packet of each IP version meets
# nft's names for the standard priorities (`priority mangle`, `priority dstnat - 5`).
PRIORITIES = {"raw": -300, "mangle": -150, "dstnat": -100, "filter": 0, "security": 50, "srcnat": 100}
VERDICTS = frozenset({"accept", "drop", "return", "jump", "goto", "continue", "queue", "reject"})
# Words that start a statement, as opposed to a match; `KEY set VALUE` is one as well.
STATEMENTS = VERDICTS | {"counter", "redirect", "tproxy", "dnat", "snat", "masquerade", "log", "notrack",
                         "limit", "quota"}


class NftFormatError(LabError):
    """Text that is not a rule set the lab can read; names the line and what went wrong."""

    def __init__(self, source: str, lineno: int, line: str, problem: str):
        super().__init__(f"{source}:{lineno}: {problem}: {line.strip()!r}")


class RuleSetError(LabError):
    """A rule set the lab cannot name rules in (two tables of one name that one packet meets)."""


@dataclass(frozen=True)
class BaseChain:
    """What makes a chain a base chain: `type nat hook output priority -100; policy accept;`."""

    type: str  # filter, nat or route
    hook: str  # prerouting, input, forward, output, postrouting
    priority: int
    policy: str = "accept"

    def spec(self) -> str:
        return f"type {self.type} hook {self.hook} priority {self.priority}; policy {self.policy};"


@dataclass(frozen=True)
class Rule:
    """One rule: its words single-spaced, a set as `{ 53, 15008 }`.  A counter's packets and
    bytes are state, not text: a listed `counter packets 3 bytes 180` reads as `counter`."""

    text: str
    handle: int | None = field(default=None, compare=False)  # from `nft -a list ruleset`
    packets: int | None = field(default=None, compare=False)  # a listed counter's packets
    bytes: int | None = field(default=None, compare=False)  # and bytes
    lineno: int = field(default=0, compare=False)  # where the text had it (0: built)

    @functools.cached_property
    def words(self) -> list[str]:
        return words(self.text)

    @property
    def counter(self) -> bool:
        return "counter" in self.words

    @property
    def xt(self) -> bool:
        """Written by iptables-nft through the xt compatibility layer (`xt match "owner"`, `xt
        target "REDIRECT"`); a chain named xt (`jump xt`) is not."""
        w = self.words
        return any(a == "xt" and b in ("match", "target") for a, b in zip(w, w[1:]))

    @property
    def verdict(self) -> str | None:
        """`return`, `accept`, `jump istio-output`, ...: what the rule does last, if a verdict."""
        w = self.words
        for i, word in enumerate(w):
            if word in VERDICTS:
                return " ".join(w[i:i + 2]) if word in ("jump", "goto") else word
        return None

    def counted(self) -> "Rule":
        """With a counter, if it has none: after its matches, before its first statement, where
        it counts what the rule matched as an iptables rule's counter does.  A `tproxy` that
        finds no socket ends its rule there, so after a tproxy the counter goes before the
        verdict and counts what was diverted (as nftrace, and Istio 1.28's own counter, do)."""
        if self.counter:
            return self
        w = self.words
        at = _first_statement(w)
        if w[at:at + 1] == ["tproxy"]:
            at = next((i for i in range(at, len(w)) if w[i] in VERDICTS), len(w))
        return replace(self, text=" ".join(w[:at] + ["counter"] + w[at:]))

    def uncounted(self) -> "Rule":
        return replace(self, text=" ".join(w for w in self.words if w != "counter"))


@dataclass
class Chain:
    name: str
    base: BaseChain | None = None  # None: a regular chain, entered only by jump or goto
    rules: list[Rule] = field(default_factory=list)


@dataclass
class Table:
    family: str
    name: str
    chains: dict[str, Chain] = field(default_factory=dict)  # in the order they were made


@dataclass
class RuleSet:
    """Tables by (family, name).  Equal rule sets hold the same tables and chains, chain for
    chain the same rules in the same order; the order of tables and chains is not compared."""

    tables: dict[tuple[str, str], Table] = field(default_factory=dict)

    def table(self, name: str, family: str = "inet") -> Table:
        return self.tables[family, name]

    def numbered(self) -> Iterator[tuple[RuleRef, Rule]]:
        """Every rule with its RuleRef (the table's name; families are not part of a RuleRef)."""
        for t in self.tables.values():
            for chain in t.chains.values():
                for number, rule in enumerate(chain.rules, 1):
                    yield RuleRef(t.name, chain.name, number), rule

    def rule(self, ref: RuleRef) -> Rule:
        """The rule a RuleRef names."""
        found = [t for t in self.tables.values() if t.name == ref.table]
        if len(found) != 1 or ref.chain not in found[0].chains:
            raise KeyError(ref)
        rules = found[0].chains[ref.chain].rules
        if not 1 <= ref.number <= len(rules):
            raise KeyError(ref)
        return rules[ref.number - 1]

    def packet_counts(self) -> dict[RuleRef, int]:
        """RuleRef -> packets, for the rules of a listing whose counters said how many."""
        return {ref: rule.packets for ref, rule in self.numbered() if rule.packets is not None}

    def handles(self) -> dict[tuple[str, str, int], RuleRef]:
        """(family, table, handle) -> RuleRef for a listing read with handles (`nft -a list
        ruleset`): what a trace event names.  A handle is unique within its table."""
        out = {}
        for t in self.tables.values():
            for chain in t.chains.values():
                for number, rule in enumerate(chain.rules, 1):
                    if rule.handle is not None:
                        out[t.family, t.name, rule.handle] = RuleRef(t.name, chain.name, number)
        return out

    def seen_by(self, ip_version: int) -> "RuleSet":
        """The tables an IPv4 (or IPv6) packet meets: `ip` (or `ip6`) and `inet`.  Two of them
        with one name (`ip nat` and `inet nat`) would give two rules one RuleRef: refused."""
        families = IP_FAMILIES[ip_version]
        mine = {key: t for key, t in self.tables.items() if t.family in families}
        names: dict[str, str] = {}
        for t in mine.values():
            if names.setdefault(t.name, t.family) != t.family:
                raise RuleSetError(f"tables {names[t.name]} {t.name} and {t.family} {t.name} both hold rules an "
                                   f"IPv{ip_version} packet meets: their rules would share names")
        return RuleSet(mine)

    def lines(self) -> dict[RuleRef, str]:
        """Each rule's text by RuleRef, counter state left out: what reports quote."""
        return {ref: rule.text for ref, rule in self.numbered()}

    def layout(self, skip: tuple[tuple[str, str], ...] = ()) -> Layout:
        """Which xtables table each table plays and which hook each base chain is (netfilter.Layout);
        tables in `skip` (family, name) are left out."""
        roles, hooks = [], []
        for key, t in self.tables.items():
            if key in skip:
                continue
            roles.append((t.name, role(t)))
            hooks += [(t.name, c.name, c.base.hook.upper()) for c in t.chains.values() if c.base]
        return Layout(tuple(roles), tuple(hooks))

    def map_rules(self, change) -> "RuleSet":
        """A copy with `change(rule)` in place of every rule."""
        return RuleSet({key: Table(t.family, t.name, {
            name: Chain(c.name, c.base, [change(r) for r in c.rules]) for name, c in t.chains.items()})
            for key, t in self.tables.items()})

    def counted(self) -> "RuleSet":
        return self.map_rules(Rule.counted)

    def uncounted(self) -> "RuleSet":
        return self.map_rules(Rule.uncounted)


def script(rules: RuleSet, counters: bool = True, header: tuple[str, ...] = ()) -> str:
    """The rule set as one `nft -f` transaction that replaces each of its tables whole (chains
    included), after `header` comment lines, with the lab's counter in every rule unless
    `counters` is False."""
    if counters:
        rules = rules.counted()
    out = [f"# {line}" for line in header]
    for t in rules.tables.values():
        where = f"{t.family} {t.name}"
        out += [f"add table {where}", f"delete table {where}", f"add table {where}"]
        for c in t.chains.values():
            out.append(f"add chain {where} {c.name}" + (f" {{ {c.base.spec()} }}" if c.base else ""))
        for c in t.chains.values():
            out += [f"add rule {where} {c.name} {r.text}" for r in c.rules]
    return "\n".join(out) + "\n"


def role(table: Table) -> str:
    """The xtables table an nf_tables table plays: nat if it has a nat base chain, else by its
    earliest base chain's priority (raw at -300 or before, mangle up to -150), else filter.  A
    table without a base chain is never entered by a packet: it plays no part ("")."""
    bases = [c.base for c in table.chains.values() if c.base]
    if not bases:
        return ""
    if any(b.type == "nat" for b in bases):
        return "nat"
    first = min(b.priority for b in bases)
    return next((name for name, at in ROLE_PRIORITIES if first <= at), "filter")


# A rule's first statement in xtables' words: what it does, as an iptables target says it.
TARGETS = {"redirect": "REDIRECT", "tproxy": "TPROXY", "dnat": "DNAT", "snat": "SNAT", "masquerade": "MASQUERADE",
           "accept": "ACCEPT", "drop": "DROP", "return": "RETURN", "reject": "REJECT", "queue": "QUEUE",
           "log": "LOG", "notrack": "CT"}


def target(text: str) -> str | None:
    """What a rule does, as an iptables rule's target would name it: the chain of a jump or
    goto, REDIRECT, TPROXY, MARK (`meta mark set`), CONNMARK (`ct mark set`), CT (`ct zone
    set`), ACCEPT, RETURN, ...; None for a rule that only counts."""
    w = words(text)
    for i in range(_first_statement(w), len(w)):
        word = w[i]
        if word in ("jump", "goto"):
            return w[i + 1] if i + 1 < len(w) else None
        if word in TARGETS:
            return TARGETS[word]
        if word == "ct" and w[i + 2:i + 3] == ["set"]:
            return "CONNMARK" if w[i + 1] == "mark" else "CT"
        if (word == "meta" and w[i + 1:i + 3] == ["mark", "set"]) or (word == "mark" and w[i + 1:i + 2] == ["set"]):
            return "MARK"
        if word == "meta" and w[i + 1:i + 3] == ["nftrace", "set"]:
            return "TRACE"
    return None


def port_to(w: list[str], statement: str) -> int | None:
    """The port a rule's `redirect to :PORT` or `tproxy [ip|ip6] to [ADDR]:PORT` sends to."""
    if statement not in w:
        return None
    rest = w[w.index(statement) + 1:]
    if rest[:1] in (["ip"], ["ip6"]):
        rest = rest[1:]
    port = rest[1].rsplit(":", 1)[-1] if len(rest) > 1 and rest[0] == "to" else ""
    return int(port) if port.isdigit() else None


def text(rules: RuleSet) -> str:
    """The rule set as `nft list ruleset` lays it out (table blocks, each chain's spec then its
    rules), in the rules' own words: the lab's canonical form, which parse() reads back."""
    out = []
    for t in rules.tables.values():
        out.append(f"table {t.family} {t.name} {{")
        for c in t.chains.values():
            out.append(f"\tchain {c.name} {{")
            if c.base:
                out.append(f"\t\t{c.base.spec()}")
            out += [f"\t\t{r.text}" for r in c.rules]
            out.append("\t}")
        out.append("}")
    return "\n".join(out) + "\n"


def words(text: str) -> list[str]:
    """A rule's words: a quoted string or a `{ ... }` set is one word (a set as `{ a, b }`)."""
    return _fold([t.text for t in _tokens(text) if t.text != "\n"])


def elements(word: str) -> list[str]:
    """A word's values: a set's elements (`{ 53, 15008 }`, as _fold writes it), or the word,
    quotes taken off."""
    if word.startswith("{"):
        return [e.strip().strip('"') for e in word.strip("{} ").split(",") if e.strip()]
    return [word.strip('"')]


def _fold(texts: list[str]) -> list[str]:
    """Tokens to words: each `{ ... }` set one word, a counter without its packets and bytes
    (`counter packets 3 bytes 180` -> `counter`: the numbers are what happened, not the rule)."""
    out: list[str] = []
    i = 0
    while i < len(texts):
        if texts[i] == "{":
            end = texts.index("}", i) if "}" in texts[i:] else len(texts)
            elements = " ".join(texts[i + 1:end]).split(",")
            out.append("{ " + ", ".join(e.strip() for e in elements if e.strip()) + " }")
            i = end + 1
        elif texts[i] == "counter" and texts[i + 1:i + 2] == ["packets"] and texts[i + 3:i + 4] == ["bytes"]:
            out.append("counter")
            i += 5
        else:
            out.append(texts[i])
            i += 1
    return out


def _first_statement(w: list[str]) -> int:
    """Index of a rule's first statement word (len(w) when it has none)."""
    for i, word in enumerate(w):
        if word in STATEMENTS or (word == "mark" and w[i + 1:i + 2] == ["set"]):
            return i
        if word in ("meta", "ct") and w[i + 2:i + 3] == ["set"]:
            return i
    return len(w)


# ------------------------------------------------------------------ reading
@dataclass(frozen=True)
class _Token:
    text: str  # a word, "{", "}", ";" or "\n"
    lineno: int
    handle: int | None = None  # `# handle N` after it on its line (nft -a)


_TOKEN = re.compile(r'(#.*)|([{};])|("[^"]*"?)|([^\s{};"#]+)')  # blanks match nothing: skipped


def _tokens(text: str, fail=None) -> list[_Token]:
    out: list[_Token] = []
    for lineno, line in enumerate(text.splitlines(), 1):
        for m in _TOKEN.finditer(line):
            comment, punct, quoted, word = m.groups()
            if word or punct:
                out.append(_Token(word or punct, lineno))
            elif quoted:
                if len(quoted) == 1 or not quoted.endswith('"'):
                    if fail:
                        raise fail(lineno, "a quoted string never ends")
                out.append(_Token(quoted, lineno))
            elif comment:
                said = comment[1:].split()
                if said[:1] == ["handle"] and len(said) == 2 and said[1].isdigit() and out:
                    out[-1] = replace(out[-1], handle=int(said[1]))
        out.append(_Token("\n", lineno))
    return out


def from_json(items: list[dict]) -> RuleSet:
    """The rule set of libnftables' JSON listing (`nft -j -a list ...`): tables, chains (base
    chains with their type, hook, priority and policy), rules in chain order with their
    handles and counters.  JSON gives a rule's expressions, not its words: each rule's text
    is "" (read `nft -a list` where the words matter).  What it is for: handles, positions
    and counters of any table, without the text listing's translation of iptables-nft's xt
    rules, for which libnftables calls into libxtables, and libxtables keeps the extensions
    it loads registered for one IP family per process (python-iptables then finds no
    REDIRECT for IPv4 once an ip6 table was listed)."""
    rules = RuleSet()
    for item in items:
        if t := item.get("table"):
            rules.tables.setdefault((t["family"], t["name"]), Table(t["family"], t["name"]))
        elif c := item.get("chain"):
            base = BaseChain(c["type"], c["hook"], c["prio"], c.get("policy", "accept")) if "hook" in c else None
            rules.tables[c["family"], c["table"]].chains[c["name"]] = Chain(c["name"], base)
        elif r := item.get("rule"):
            counter = next((e["counter"] for e in r.get("expr", ()) if isinstance(e, dict)
                            and isinstance(e.get("counter"), dict)), {})
            rules.tables[r["family"], r["table"]].chains[r["chain"]].rules.append(
                Rule("", handle=r["handle"], packets=counter.get("packets"), bytes=counter.get("bytes")))
    return rules


def parse(text: str, source: str = "<nft>") -> RuleSet:
    """Read an `nft -f` script or `nft list ruleset` output, applied to an empty rule set."""
    return _Reader(text, source).read()


class _Reader:
    """Recursive descent over the tokens; each command changes `self.rules` as nft would."""

    def __init__(self, text: str, source: str):
        self.source = source
        self.lines = text.splitlines()
        self.tokens = _tokens(text, self._fail)
        self.at = 0
        self.rules = RuleSet()

    # -- plumbing
    def _fail(self, lineno: int, problem: str) -> NftFormatError:
        line = self.lines[lineno - 1] if 0 < lineno <= len(self.lines) else ""
        return NftFormatError(self.source, lineno, line, problem)

    def fail(self, problem: str) -> NftFormatError:
        return self._fail(self.peek().lineno, problem)

    def peek(self) -> _Token:
        return self.tokens[self.at] if self.at < len(self.tokens) else _Token("", len(self.lines))

    def take(self, what: str = "a word") -> _Token:
        token = self.peek()
        if token.text in ("", "\n", ";", "{", "}"):
            raise self.fail(f"expected {what}, found {_said(token.text)}")
        self.at += 1
        return token

    def expect(self, text: str) -> None:
        if self.peek().text != text:
            raise self.fail(f"expected {_said(text)}, found {_said(self.peek().text)}")
        self.at += 1

    def skip_ends(self) -> None:
        while self.peek().text in ("\n", ";"):
            self.at += 1

    def end_of_command(self) -> None:
        if self.peek().text not in ("\n", ";", ""):
            raise self.fail(f"unexpected {_said(self.peek().text)}")

    # -- grammar
    def read(self) -> RuleSet:
        while True:
            self.skip_ends()
            token = self.peek()
            if not token.text:
                return self.rules
            if token.text == "table":
                self.at += 1
                self.table_block(*self.table_name(), create=False)
            elif token.text in ("add", "create", "insert", "delete", "flush"):
                self.at += 1
                self.command(token.text)
            else:
                raise self.fail("expected a table block or a command (add, insert, delete, flush)")
            self.end_of_command()

    def table_name(self) -> tuple[str, str]:
        family = self.take("a family or table name").text
        if family not in FAMILIES:
            return "ip", family  # nft's default family
        return family, self.take("a table name").text

    def chain_ref(self) -> tuple[Table, str]:
        family, name = self.table_name()
        return self.existing_table(family, name), self.take("a chain name").text

    def existing_table(self, family: str, name: str) -> Table:
        try:
            return self.rules.tables[family, name]
        except KeyError:
            raise self.fail(f"no table {family} {name}") from None

    def existing_chain(self, table: Table, name: str) -> Chain:
        try:
            return table.chains[name]
        except KeyError:
            raise self.fail(f"no chain {name} in table {table.family} {table.name}") from None

    def command(self, verb: str) -> None:
        what = self.take("table, chain, rule or ruleset").text
        if what == "ruleset" and verb == "flush":
            self.rules.tables.clear()
        elif what == "table":
            family, name = self.table_name()
            if verb in ("add", "create"):
                if self.peek().text == "{":
                    self.table_block(family, name, create=verb == "create")
                else:
                    self.add_table(family, name, create=verb == "create")
            elif verb == "delete":
                self.existing_table(family, name)
                del self.rules.tables[family, name]
            elif verb == "flush":
                for chain in self.existing_table(family, name).chains.values():
                    chain.rules.clear()
            else:
                raise self.fail(f"nft has no `{verb} table`")
        elif what == "chain":
            table, name = self.chain_ref()
            if verb in ("add", "create"):
                base = self.chain_body(name) if self.peek().text == "{" else None
                self.add_chain(table, name, base, create=verb == "create")
            elif verb == "delete":
                self.existing_chain(table, name)
                del table.chains[name]
            elif verb == "flush":
                self.existing_chain(table, name).rules.clear()
            else:
                raise self.fail(f"nft has no `{verb} chain`")
        elif what == "rule" and verb in ("add", "insert"):
            table, name = self.chain_ref()
            self.place_rule(table, self.existing_chain(table, name), verb)
        elif what == "rule":
            raise self.fail(f"`{verb} rule` needs a rule handle, which only a live rule set has")
        else:
            raise self.fail(f"{what!r} is not something the lab models (tables, chains and rules only)")

    def add_table(self, family: str, name: str, create: bool) -> Table:
        if (family, name) in self.rules.tables and create:
            raise self.fail(f"table {family} {name} exists already (create)")
        return self.rules.tables.setdefault((family, name), Table(family, name))

    def add_chain(self, table: Table, name: str, base: BaseChain | None, create: bool) -> Chain:
        chain = table.chains.get(name)
        if chain is None:
            chain = table.chains[name] = Chain(name, base)
        elif create:
            raise self.fail(f"chain {name} exists already (create)")
        elif base is not None and chain.base not in (None, base):
            raise self.fail(f"chain {name} is already a base chain with {chain.base.spec()}")
        elif base is not None:
            chain.base = base
        return chain

    def table_block(self, family: str, name: str, create: bool) -> None:
        table = self.add_table(family, name, create)
        self.expect("{")
        while True:
            self.skip_ends()
            word = self.peek().text
            if not word:
                raise self.fail(f"table {family} {name} never closes (no }})")
            if word == "}":
                self.at += 1
                self.check_jumps(table, [r for c in table.chains.values() for r in c.rules], "")
                return
            if word != "chain":
                raise self.fail(f"expected a chain or }}, found {_said(word)} (the lab models chains and rules only)")
            self.at += 1
            chain_name = self.take("a chain name").text
            chain = self.add_chain(table, chain_name, None, create=False)
            base = self.chain_body(chain_name, chain)
            if base is not None:
                self.add_chain(table, chain_name, base, create=False)

    def chain_body(self, name: str, chain: Chain | None = None) -> BaseChain | None:
        """`{ type T hook H priority P; policy P; rules... }`: the base chain's spec (None for a
        regular chain), and the rules into `chain` (an `add chain` command's block has none)."""
        self.expect("{")
        base, policy = None, None
        while True:
            self.skip_ends()
            token = self.peek()
            if not token.text:
                raise self.fail(f"chain {name} never closes (no }})")
            if token.text == "}":
                self.at += 1
                break
            if token.text == "type":
                self.at += 1
                base = self.base_chain()
            elif token.text == "policy":
                self.at += 1
                policy = self.take("accept or drop").text
                if policy not in ("accept", "drop"):
                    raise self.fail(f"policy {policy!r} is not accept or drop")
            elif token.text in ("comment", "device", "flags"):
                raise self.fail(f"chain {token.text} is not modelled")
            elif chain is not None:
                chain.rules.append(self.rule_words())
            else:
                raise self.fail(f"expected type, policy or }} in chain {name}'s spec, found {_said(token.text)}")
        if base is None and policy is not None:
            raise self.fail(f"chain {name} has a policy but no hook")
        return replace(base, policy=policy) if base and policy else base

    def base_chain(self) -> BaseChain:
        """`type T hook H priority P` after `type`."""
        kind = self.take("a chain type").text
        if self.take("hook").text != "hook":
            raise self.fail("expected `hook` after the chain type")
        hook = self.take("a hook").text
        if self.peek().text == "device":
            raise self.fail("netdev chains (device) are not modelled")
        if self.take("priority").text != "priority":
            raise self.fail("expected `priority` after the hook")
        return BaseChain(kind, hook, self.priority())

    def priority(self) -> int:
        """`-100`, `mangle`, `dstnat - 5`: nft's priority, as a number."""
        first = self.take("a priority").text
        named = PRIORITIES.get(first)
        if named is None:
            try:
                return int(first)
            except ValueError:
                raise self.fail(f"priority {first!r} is not a number or one of {', '.join(PRIORITIES)}") from None
        if self.peek().text in ("+", "-"):
            sign = 1 if self.take().text == "+" else -1
            offset = self.take("a number").text
            if not offset.isdigit():
                raise self.fail(f"priority offset {offset!r} is not a number")
            return named + sign * int(offset)
        return named

    def place_rule(self, table: Table, chain: Chain, verb: str) -> None:
        """`add` appends (or goes after the rule at `index N`), `insert` prepends (or goes
        before it); indexes count from 0, and the rule there must exist, as in nft."""
        index = None
        if self.peek().text in ("index", "position", "handle"):
            how = self.take().text
            if how != "index":
                raise self.fail(f"`{verb} rule ... {how}` needs a rule handle, which only a live rule set has")
            value = self.take("an index").text
            if not value.isdigit():
                raise self.fail(f"index {value!r} is not a number")
            index = int(value)
            if index >= len(chain.rules):
                raise self.fail(f"index {index}: chain {chain.name} has {len(chain.rules)} rules (nft counts from 0)")
        rule = self.rule_words()
        self.check_jumps(table, [rule], " yet (a script must make a chain before a rule jumps to it)")
        if index is None:
            at = 0 if verb == "insert" else len(chain.rules)
        else:
            at = index if verb == "insert" else index + 1
        chain.rules.insert(at, rule)

    def rule_words(self) -> Rule:
        """A rule's words up to the end of its line (or `;`, or its chain's closing brace)."""
        start = self.peek()
        texts: list[str] = []
        handle = None
        depth = 0
        while self.peek().text not in ("", "\n", ";") and not (depth == 0 and self.peek().text == "}"):
            token = self.tokens[self.at]
            self.at += 1
            depth += {"{": 1, "}": -1}.get(token.text, 0)
            texts.append(token.text)
            handle = token.handle if token.handle is not None else handle
        if depth:
            raise self._fail(start.lineno, "a set { ... } never closes")
        if not texts:
            raise self._fail(start.lineno, "an empty rule")
        at = texts.index("counter") if "counter" in texts else -1
        packets = texts[at + 2] if texts[at + 1:at + 2] == ["packets"] and at >= 0 else ""
        nbytes = texts[at + 4] if packets and texts[at + 3:at + 4] == ["bytes"] else ""
        folded = _fold(texts)
        rule = Rule(" ".join(folded), handle=handle, packets=int(packets) if packets.isdigit() else None,
                    bytes=int(nbytes) if nbytes.isdigit() else None, lineno=start.lineno)
        rule.__dict__["words"] = folded  # what Rule.words would read again from the text
        return rule

    def check_jumps(self, table: Table, rules: list[Rule], still: str) -> None:
        for rule in rules:
            w = rule.words
            for i, word in enumerate(w[:-1]):
                if word in ("jump", "goto") and w[i + 1] not in table.chains:
                    raise self._fail(rule.lineno, f"{word} to chain {w[i + 1]}, which table {table.family} "
                                                  f"{table.name} does not have{still}")


def _said(text: str) -> str:
    return {"": "the end", "\n": "the end of the line"}.get(text, repr(text))
