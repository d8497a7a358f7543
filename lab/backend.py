"""The netfilter backend a lab's rules go through: legacy xtables, or nf_tables.

A backend owns four things, and everything above it speaks RuleRef and TraceEvent:
  - apply a rule set to a pod, and read it back numbered with counters;
  - make a pod's tables exist, so that a traced packet is reported at every hook;
  - put trace rules in a pod for one flow's ports, and take them out again;
  - read a pod's trace events, each naming its rule as legacy TRACE does
    (`table:chain:kind:number`).

legacy: python-iptables (libiptc), TRACE rules at the head of raw PREROUTING and OUTPUT,
events through nfnetlink_log.  nft: iptables-nft writes the same rule set into nf_tables
(the xt compatibility layer runs what nf_tables has no expression for), `meta nftrace set
1` rules in the lab's own table `inet ilab-trace`, events from nf_tables' trace group,
each rule handle named back by its position in its chain.  A pod under the nft backend
never gets a legacy table: python-iptables instantiates every table it touches.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Iterator, Protocol

from .netfilter import RuleRef
from .nftrace import NftraceReader
from .rules import xtables
from .rules.nft import iptables_nft, libnft, naming, probes, tracing
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

    def listing(self, ns: str, table: str, family: int = 4) -> list[NumberedRule]: ...

    def counters(self, ns: str, tables: tuple[str, ...], family: int = 4) -> dict[RuleRef, int]: ...

    def saved(self, ns: str, family: int = 4) -> Dump: ...

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

    def listing(self, ns: str, table: str, family: int = 4) -> list[NumberedRule]:
        return xtables.listing(ns, table, family)

    def counters(self, ns: str, tables: tuple[str, ...], family: int = 4) -> dict[RuleRef, int]:
        return {ref: n for table in tables for ref, n in xtables.packet_counts(ns, table, family).items()}

    def saved(self, ns: str, family: int = 4) -> Dump:
        """The namespace's rule set as its save tool prints it (policies included)."""
        return xtables.saved(ns, family)

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
        self.reader = NftraceReader(ns, pod)
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

    def listing(self, ns: str, table: str, family: int = 4) -> list[NumberedRule]:
        return iptables_nft.listing(ns, table, family)

    def counters(self, ns: str, tables: tuple[str, ...], family: int = 4) -> dict[RuleRef, int]:
        present = set(iptables_nft.present(ns, family))
        return iptables_nft.packet_counts(ns, tuple(t for t in tables if t in present), family) if present else {}

    def saved(self, ns: str, family: int = 4) -> Dump:
        return iptables_nft.saved(ns, family)

    def prepare(self, ns: str, family: int = 4) -> None:
        iptables_nft.touch(ns, family)
        tracing.ensure_table(ns)

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


def choose(name: str) -> tuple[Backend, str]:
    """The backend a name asks for, and why.  `auto` is the one ISTIO_LAB_BACKEND names (how
    CI runs the whole suite on each), else legacy where the kernel has it, else nft."""
    if name == AUTO:
        named = os.environ.get(ENVIRONMENT, "")
        if named in BACKENDS:
            return BACKENDS[named], f"auto: {named} ({ENVIRONMENT}={named})"
        picked, why = probes.auto_backend()
        return BACKENDS[picked], why
    return BACKENDS[name], f"--backend {name}"
