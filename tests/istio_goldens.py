"""Istio's own expected rule sets (istio-iptables' capture goldens), read in iptables-save form.

A golden lists what istio-iptables runs: `iptables -t nat -A ...` commands up to Istio
1.23, iptables-restore input from 1.24 (`* nat`, `-N`, `-A`, `-I CHAIN N`, `COMMIT`; the
IPv4 tables first, then the IPv6 ones).  Both are applied here to empty chains, and each
rule is written as iptables-save prints it (header options first, `-m tcp` for a port,
`--to-ports`, hex marks, TPROXY's and CONNMARK's defaults), so a golden and the builder's
rules compare line for line.  test_annotations checks this reading against the kernel's.
"""

from __future__ import annotations

import ipaddress
import shlex
from pathlib import Path

from lab.netfilter import BUILTIN_CHAINS, TABLES
from lab.rules.save import Dump, RuleLine, TableDump

DIR = Path(__file__).resolve().parent / "data/istio-capture"
HEADER = ("-s", "-d", "-i", "-o", "-p")  # iptables-save's order; matches and the target follow as given
FULL = 0xFFFFFFFF


def path(era: str, name: str) -> Path:
    return DIR / era / f"{name}.golden"


def read(text: str) -> dict[int, Dump]:
    """The rule sets a golden leaves, per family (4, and 6 when it has IPv6 rules)."""
    chains: dict[tuple[int, str], dict[str, list[tuple[str, ...]]]] = {}
    family, table = 4, ""
    for line in text.splitlines():
        words = shlex.split(line)
        if not words or words[0] in ("iptables-save", "ip6tables-save", "COMMIT"):
            continue
        if words[0].startswith("*"):  # a restore block: the second block of a table is IPv6's
            table = "".join(words).lstrip("*")
            family = 6 if (4, table) in chains else 4
            chains[(family, table)] = {}
            continue
        if words[0] in ("iptables", "ip6tables"):
            family, table, words = (6 if words[0] == "ip6tables" else 4), words[2], words[3:]
        op, chain, *args = words
        rules = chains.setdefault((family, table), {}).setdefault(chain, [])
        if op == "-A":
            rules.append(canonical(args, family))
        elif op == "-I":
            rules.insert(int(args[0]) - 1, canonical(args[1:], family))
        elif op != "-N":
            raise ValueError(f"unexpected golden line {line!r}")
    dumps: dict[int, Dump] = {}
    for (fam, name), table_chains in sorted(chains.items(), key=lambda kv: (kv[0][0], TABLES.index(kv[0][1]))):
        builtin = BUILTIN_CHAINS[name]
        user = sorted(set(table_chains) - set(builtin))
        dump = TableDump(name, dict.fromkeys(builtin, "ACCEPT"), user)
        for chain in list(builtin) + user:
            dump.rules += [RuleLine(chain, rule) for rule in table_chains.get(chain, [])]
        dumps.setdefault(fam, Dump(family=fam)).tables[name] = dump
    return dumps


def canonical(args: list[str], family: int = 4) -> tuple[str, ...]:
    """One rule's arguments as iptables-save prints them."""
    header: dict[str, list[str]] = {}
    rest: list[str] = []
    i = 0
    while i < len(args):
        negated = args[i] == "!" and i + 1 < len(args) and args[i + 1] in HEADER
        at = i + negated
        if args[at] in HEADER:
            value = args[at + 1]
            if args[at] in ("-s", "-d"):
                value = str(ipaddress.ip_network(value, strict=False))
            header[args[at]] = ["!"] * negated + [args[at], value]
            i = at + 2
        else:
            rest.append(args[i])
            i += 1
    proto = header.get("-p", [""])[-1]
    out = [word for option in HEADER for word in header.get(option, [])]
    module = ""
    i = 0
    while i < len(rest):
        word = rest[i]
        if word == "-j":
            return tuple(out + ["-j"] + _target(rest[i + 1:], family))
        if word == "-m":
            module = rest[i + 1]
        elif word in ("--dport", "--sport") and module not in (proto, "multiport"):
            at = len(out) - 1 if out and out[-1] == "!" else len(out)
            out[at:at] = ["-m", proto]  # the protocol's match, which iptables loads for the port
            module = proto
        elif word == "--mark" and module in ("mark", "connmark"):
            out += [word, _mark(rest[i + 1], short=True)]
            i += 2
            continue
        out.append(word)
        i += 1
    return tuple(out)


def _mark(text: str, short: bool = False) -> str:
    value, _, mask = text.partition("/")
    mask_value = int(mask, 0) if mask else FULL
    if short and mask_value == FULL:
        return f"{int(value, 0):#x}"
    return f"{int(value, 0):#x}/{mask_value:#x}"


def _target(words: list[str], family: int) -> list[str]:
    name, options = words[0], words[1:]
    given = dict(zip(options[::2], options[1::2]))
    if name == "REDIRECT":
        return [name, "--to-ports", given.get("--to-ports") or given["--to-port"]]
    if name == "MARK" and "--set-mark" in given:
        return [name, "--set-xmark", _mark(given["--set-mark"])]
    if name == "CONNMARK":
        return [name, *options, "--nfmask", f"{FULL:#x}", "--ctmask", f"{FULL:#x}"]
    if name == "TPROXY":
        any_ip = "0.0.0.0" if family == 4 else "::"
        return [name, "--on-port", given["--on-port"], "--on-ip", given.get("--on-ip", any_ip),
                "--tproxy-mark", _mark(given["--tproxy-mark"])]
    return words
