"""The netfilter backend a lab's rules go through: legacy xtables, or nf_tables.

A backend owns four things, and everything above it speaks RuleRef and TraceEvent:
  - apply a rule set to a pod (iptables-save dumps; native nftables rule sets on nft only),
    and read it back numbered with counters, with where its tables sit (Layout);
  - make a pod's tables exist, so that a traced packet is reported at every hook;
  - put trace rules in a pod for one flow's ports, and take them out again;
  - read a pod's trace events, each naming its rule as legacy TRACE does
    (`table:chain:kind:number`).

legacy: python-iptables (libiptc), TRACE rules at the head of raw PREROUTING and OUTPUT,
events through nfnetlink_log.  nft: iptables-nft writes the same rule set into nf_tables
(the xt compatibility layer runs what nf_tables has no expression for), `meta nftrace set
1` rules in the lab's own table `inet ilab-trace`, events from nf_tables' trace group,
each rule handle named back by its position in its chain.  A native nftables rule set
(Istio's `nativeNftables`, a user's `nft -f` script) goes in as one `nft -f` transaction
with a counter in every rule; its rules read back in nft's own words.  A pod under the nft
backend never gets a legacy table: python-iptables instantiates every table it touches.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Iterator, Protocol

from .errors import LabError
from .netfilter import BUILTIN_CHAINS, PATH_TABLES, Layout, RuleRef
from .nftrace import TRACE_TABLE, NftraceReader
from .rules import nftset, xtables
from .rules.nft import iptables_nft, libnft, naming, native, probes, tracing
from .rules.save import Dump
from .rules.xtables import NumberedRule
from .trace import TraceEvent, TraceReader

LEGACY, NFT, AUTO = "legacy", "nft", "auto"
CHOICES = (LEGACY, NFT, AUTO)
ENVIRONMENT = "ISTIO_LAB_BACKEND"  # what `auto` picks when set


@dataclass(frozen=True)
class TracedPorts:
    """The packets one flow's trace rules mark: to or from these ports."""

    tcp: tuple[int, ...]  # none: every TCP packet
    udp: tuple[int, ...] = ()


class Reader(Protocol):
    pod: str

    def drain(self, settle: float = ...) -> list[TraceEvent]: ...

    def fileno(self) -> int: ...

    def close(self) -> None: ...


class Backend(Protocol):
    name: str

    def apply(self, ns: str, dump: Dump) -> None: ...

    def apply_native(self, ns: str, rules: nftset.RuleSet, source: str) -> None: ...

    def rules(self, ns: str, family: int = 4) -> tuple[dict[RuleRef, str], Layout]: ...

    def listing(self, ns: str, table: str, family: int = 4) -> list[NumberedRule]: ...

    def counters(self, ns: str, tables: tuple[str, ...], family: int = 4) -> dict[RuleRef, int]: ...

    def prepare(self, ns: str, family: int = 4) -> None: ...

    def tracing(self, namespaces: list[str], ports: TracedPorts, family: int = 4): ...

    def reader(self, ns: str, pod: str) -> Reader: ...


def _legacy_rule(ports: tuple[int, ...], protocol: str) -> tuple[str, ...]:
    """Packets from or to any of `ports` (every packet of the protocol without ports)."""
    if not ports:
        return ("-p", protocol, "-j", "TRACE")
    return ("-p", protocol, "-m", "multiport", "--ports", ",".join(map(str, ports)), "-j", "TRACE")


class Legacy:
    name = LEGACY

    def apply(self, ns: str, dump: Dump) -> None:
        xtables.apply(ns, dump)

    def apply_native(self, ns: str, rules: nftset.RuleSet, source: str) -> None:
        raise LabError(f"{source}: native nftables rules go into nf_tables: run them with --backend nft "
                       f"(or auto), not legacy")

    def rules(self, ns: str, family: int = 4) -> tuple[dict[RuleRef, str], Layout]:
        """The path tables' rules in iptables-save form; xtables name their own places."""
        return {r.ref: r.line for table in PATH_TABLES for r in self.listing(ns, table, family)}, Layout()

    def listing(self, ns: str, table: str, family: int = 4) -> list[NumberedRule]:
        return xtables.listing(ns, table, family)

    def counters(self, ns: str, tables: tuple[str, ...], family: int = 4) -> dict[RuleRef, int]:
        return {ref: n for table in tables for ref, n in xtables.packet_counts(ns, table, family).items()}

    def prepare(self, ns: str, family: int = 4) -> None:
        xtables.touch(ns, family)

    @contextlib.contextmanager
    def tracing(self, namespaces: list[str], ports: TracedPorts, family: int = 4) -> Iterator[None]:
        """TRACE rules at the head of raw PREROUTING and OUTPUT (ip6tables' for IPv6)."""
        marked = [_legacy_rule(ports.tcp, "tcp")] + ([_legacy_rule(ports.udp, "udp")] if ports.udp else [])
        rules = [(chain, rule) for rule in marked for chain in ("PREROUTING", "OUTPUT")]
        placed = []
        try:
            for ns in namespaces:
                xtables.insert(ns, "raw", rules, family)
                placed.append(ns)
            yield
        finally:
            for ns in placed:
                xtables.delete(ns, "raw", rules, family)

    def reader(self, ns: str, pod: str) -> TraceReader:
        return TraceReader(ns, pod)


class NftReader:
    """nftrace events of one pod, named as legacy TRACE names them (lab.rules.nft.naming).

    Handles are named from the pod's listing, read when the reader is made (after the
    rules are applied) and again if an event names a handle the listing lacks."""

    def __init__(self, ns: str, pod: str):
        self.ns, self.pod = ns, pod
        self.reader = NftraceReader(ns, pod, skip=frozenset())  # ilab-trace's events witness the hooks
        self.rules = {4: libnft.read(ns, 4), 6: libnft.read(ns, 6)}

    def drain(self, settle: float = 0.025) -> list[TraceEvent]:
        events = self.reader.drain(settle=settle)
        out = []
        for version in (4, 6):
            mine = [e for e in events if e.ip_version == version]
            try:
                out += naming.trace_events(mine, self.rules[version])
            except KeyError:  # a rule made after the listing was read
                self.rules[version] = libnft.read(self.ns, version)
                out += naming.trace_events(mine, self.rules[version])
        return out

    def fileno(self) -> int:
        return self.reader.sock.fileno()

    def close(self) -> None:
        self.reader.close()


class Nft:
    name = NFT

    def apply(self, ns: str, dump: Dump) -> None:
        iptables_nft.apply(ns, dump)

    def apply_native(self, ns: str, rules: nftset.RuleSet, source: str) -> None:
        """One `nft -f` transaction replacing each of the rule set's tables, a counter in every rule."""
        native.apply(ns, nftset.script(rules), source)

    def rules(self, ns: str, family: int = 4) -> tuple[dict[RuleRef, str], Layout]:
        """Every rule of the tables that play raw, mangle or nat, and where each table sits.
        iptables-nft's tables read as iptables-nft-save prints them (`-A ...`, as legacy's);
        the others in nft's words, as `nft list ruleset` prints them."""
        listed = libnft.read(ns, family)
        layout = listed.layout(skip=(TRACE_TABLE,))
        lines: dict[RuleRef, str] = {}
        for key, table in listed.tables.items():
            if key == TRACE_TABLE or layout.role(table.name) not in PATH_TABLES:
                continue
            if iptables_nft.made(table):
                lines |= {r.ref: r.line for r in iptables_nft.listing(ns, table.name, family)}
            else:
                lines |= nftset.RuleSet({key: table}).lines()
        return lines, layout

    def listing(self, ns: str, table: str, family: int = 4) -> list[NumberedRule]:
        return iptables_nft.listing(ns, table, family)

    def native_listing(self, ns: str) -> dict[tuple[str, str], list[NumberedRule]]:
        """The rules of every table iptables-nft did not make (the lab's ilab-trace aside), in
        nft's words with their counters: Istio's native tables, a user's nft rules."""
        out = {}
        for family in (4, 6):
            for key, table in libnft.read(ns, family).tables.items():
                if key != TRACE_TABLE and key not in out and not iptables_nft.made(table):
                    out[key] = [NumberedRule(ref, r.text, r.packets or 0, r.bytes or 0)
                                for ref, r in nftset.RuleSet({key: table}).numbered()]
        return out

    def counters(self, ns: str, tables: tuple[str, ...], family: int = 4) -> dict[RuleRef, int]:
        """Each rule's packets in the named tables (iptables-nft's and native ones alike)."""
        present = [(fam, name) for fam, name in libnft.tables(ns)
                   if name in tables and fam in nftset.IP_FAMILIES[family]]
        return libnft.read(ns, family, present).packet_counts() if present else {}

    def prepare(self, ns: str, family: int = 4) -> None:
        tracing.ensure_table(ns)  # inet: both families; its base chains witness every hook

    @contextlib.contextmanager
    def tracing(self, namespaces: list[str], ports: TracedPorts, family: int = 4) -> Iterator[None]:
        """`meta nftrace set 1` rules in each pod's `inet ilab-trace`, for the flow's ports."""
        flows = [tracing.Flow("tcp", ports.tcp, family)] + ([tracing.Flow("udp", ports.udp, family)] if ports.udp else [])
        placed = []
        try:
            for ns in namespaces:
                placed.append(tracing.add(ns, flows))
            yield
        finally:
            for rules in placed:
                tracing.remove(rules)

    def reader(self, ns: str, pod: str) -> NftReader:
        return NftReader(ns, pod)


BACKENDS: dict[str, Backend] = {LEGACY: Legacy(), NFT: Nft()}


def choose(name: str, native: bool = False) -> tuple[Backend, str]:
    """The backend a name asks for, and why.  `auto` is the one ISTIO_LAB_BACKEND names (how
    CI runs the whole suite on each), else legacy where the kernel has it, else nft; for
    rule sets with native nftables rules (`native`) it is nft whatever the variable says.
    Native rules under --backend legacy are one clear error."""
    if native and name == LEGACY:
        raise LabError("native nftables rules go into nf_tables: use --backend nft (or auto), not legacy")
    if native:
        return BACKENDS[NFT], f"{'auto: ' if name == AUTO else '--backend '}nft (native nftables rules)"
    if name == AUTO:
        named = os.environ.get(ENVIRONMENT, "")
        if named in BACKENDS:
            return BACKENDS[named], f"auto: {named} ({ENVIRONMENT}={named})"
        picked, why = probes.auto_backend()
        return BACKENDS[picked], why
    return BACKENDS[name], f"--backend {name}"
