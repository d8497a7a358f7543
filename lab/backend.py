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

mixed (a lab whose rules are written by both, as a pod whose init container chose one
backend and then the other: istio/istio#61019): the same rules through each backend in
turn, both traced by one nftrace rule (legacy's tables log TRACE on skb->nf_trace, whoever
set it), legacy's tables named `legacy-nat`, ... beside nf_tables' `nat`, and each pod's
two event streams merged in the order the kernel walks them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from dataclasses import dataclass
from typing import Iterator, Protocol

from .errors import LabError
from .netfilter import BUILTIN_CHAINS, HOOKS, LEGACY_PREFIX, TABLES, Layout, RuleRef, xt_priority
from .nftrace import TRACE_TABLE, NftraceReader
from .rules import nftset, xtables
from .rules.nft import iptables_nft, libnft, naming, native, probes, tracing
from .rules.ruleset import RuleSet
from .rules.save import Dump, NumberedRule
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

    def apply_rules(self, ns: str, rules: RuleSet) -> None: ...

    def rules(self, ns: str, family: int = 4) -> tuple[dict[RuleRef, str], Layout]: ...

    def listing(self, ns: str, table: str, family: int = 4) -> list[NumberedRule]: ...

    def counters(self, ns: str, tables: tuple[str, ...], family: int = 4) -> dict[RuleRef, int]: ...

    def policies(self, ns: str, family: int = 4) -> dict[tuple[str, str], str]: ...

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

    def apply_rules(self, ns: str, rules: RuleSet) -> None:
        """A rule set's dumps, one commit per table."""
        if rules.native:
            raise LabError(f"{rules.name}: native nftables rules go into nf_tables: run them with --backend nft "
                           f"(or auto), not legacy")
        for dump in rules.dumps:
            self.apply(ns, dump)

    def rules(self, ns: str, family: int = 4) -> tuple[dict[RuleRef, str], Layout]:
        """Every table's rules in iptables-save form (filter's too: a rule there may drop a
        flow); xtables name their own places."""
        return {r.ref: r.line for table in TABLES for r in self.listing(ns, table, family)}, Layout()

    def listing(self, ns: str, table: str, family: int = 4) -> list[NumberedRule]:
        return xtables.listing(ns, table, family)

    def counters(self, ns: str, tables: tuple[str, ...], family: int = 4) -> dict[RuleRef, int]:
        return {ref: n for table in tables for ref, n in xtables.packet_counts(ns, table, family).items()}

    def policies(self, ns: str, family: int = 4) -> dict[tuple[str, str], str]:
        """(table, chain) -> DROP for each built-in chain whose policy is not ACCEPT."""
        return {(t.name, chain): policy for t in xtables.saved(ns, family).tables.values()
                for chain, policy in t.policies.items() if policy != "ACCEPT"}

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
        libnft.release(self.ns)  # the namespace's libnftables context, with its reader


class Nft:
    name = NFT

    def apply(self, ns: str, dump: Dump) -> None:
        iptables_nft.apply(ns, dump)

    def apply_rules(self, ns: str, rules: RuleSet) -> None:
        """A rule set's dumps through iptables-nft; its native rules as one `nft -f`
        transaction replacing each of their tables, a counter in every rule."""
        for dump in rules.dumps:
            self.apply(ns, dump)
        if rules.nft is not None:
            native.apply(ns, rules.script, rules.name)

    def rules(self, ns: str, family: int = 4) -> tuple[dict[RuleRef, str], Layout]:
        """Every rule of every table (filter's too: a rule there may drop a flow), and where
        each table sits.  iptables-nft's tables read as iptables-nft-save prints them (`-A ...`,
        as legacy's); the others in nft's words, as `nft list ruleset` prints them."""
        listed = libnft.read(ns, family)
        layout = listed.layout(skip=(TRACE_TABLE,))
        lines: dict[RuleRef, str] = {}
        for key, table in listed.tables.items():
            if key == TRACE_TABLE:
                continue
            if iptables_nft.made(table):
                lines |= {r.ref: r.line for r in iptables_nft.listing(ns, table.name, family)}
            else:
                lines |= libnft.read(ns, family, [key], words=True).lines()
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
                                for ref, r in libnft.read(ns, family, [key], words=True).numbered()]
        return out

    def counters(self, ns: str, tables: tuple[str, ...], family: int = 4) -> dict[RuleRef, int]:
        """Each rule's packets in the named tables (iptables-nft's and native ones alike)."""
        present = [(fam, name) for fam, name in libnft.tables(ns)
                   if name in tables and fam in nftset.IP_FAMILIES[family]]
        return libnft.read(ns, family, present).packet_counts() if present else {}

    def policies(self, ns: str, family: int = 4) -> dict[tuple[str, str], str]:
        """(table, chain) -> DROP for each base chain whose policy is drop (ilab-trace's aside)."""
        return {(t.name, c.name): c.base.policy.upper() for key, t in libnft.read(ns, family).tables.items()
                if key != TRACE_TABLE for c in t.chains.values() if c.base and c.base.policy != "accept"}

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




def _key(e: TraceEvent) -> tuple:
    """One packet's events share this: the source does not change in the sidecar's rules
    (REDIRECT rewrites the destination), and a flow's SYN, ACKs and datagrams differ in flags."""
    return e.src, e.sport, e.proto, e.tcp_flags


def _walks(events: list[TraceEvent], base) -> list[tuple[tuple, int, int, TraceEvent]]:
    """(packet, walk number, priority, event) for each event of one stream: a packet's walk
    number grows each time it reaches another hook (its events at a built-in or base chain,
    `base(e)` -> (hook, priority) or None for a chain entered by a jump, which keeps the
    walk and priority of the chain that jumped)."""
    state: dict[tuple, tuple[int, str | None, int]] = {}
    out = []
    for e in events:
        key = _key(e)
        walk, hook, priority = state.get(key, (-1, None, 0))
        here = base(e)
        if here is not None:
            if here[0] != hook:
                walk += 1
            hook, priority = here
        state[key] = (walk, hook, priority)
        out.append((key, walk, priority, e))
    return out


def merge(streams: list[tuple[list[TraceEvent], object]]) -> list[TraceEvent]:
    """One pod's events from two readers, in the order the kernel walked them.  Two sockets
    give no order between them, but each gives its own, and the kernel's is known: a packet
    meets the hooks in turn, at each hook the chains by priority, and at one priority the
    hook registered last first (`streams` come in that order: the backend written last
    first).  Packets keep the order in which each first showed up."""
    tagged = []
    for rank, (events, base) in enumerate(streams):
        tagged += [(key, walk, priority, rank, at, e) for at, (key, walk, priority, e) in enumerate(_walks(events, base))]
    first: dict[tuple, int] = {}
    for i, item in enumerate(tagged):
        first.setdefault(item[0], i)
    tagged.sort(key=lambda t: (first[t[0]], t[1], t[2], t[3], t[4]))
    return [t[-1] for t in tagged]


def _legacy_base(e: TraceEvent) -> tuple[str, int] | None:
    if e.chain not in HOOKS:
        return None
    return e.chain, xt_priority(e.table.removeprefix(LEGACY_PREFIX), e.chain)


class MixedReader:
    """A pod's legacy TRACE events and its nftrace events, merged in the kernel's order, the
    legacy tables named `legacy-nat`, ..."""

    def __init__(self, ns: str, pod: str, order: tuple[str, ...]):
        self.pod = pod
        self.order = order
        self.legacy = TraceReader(ns, pod)
        try:
            self.nft = NftReader(ns, pod)
        except BaseException:
            self.legacy.close()
            raise

    def _nft_base(self, e: TraceEvent) -> tuple[str, int] | None:
        for rules in self.nft.rules.values():
            table = next((t for t in rules.tables.values() if t.name == e.table), None)
            chain = table.chains.get(e.chain) if table else None
            if chain is not None and chain.base is not None:
                return chain.base.hook.upper(), chain.base.priority
            if table is not None and e.table == TRACE_TABLE[1]:  # a witness: named by its hook
                hook = next(c for c in table.chains.values() if c.base and c.base.hook.upper() == e.chain)
                return e.chain, hook.base.priority
        return None

    def drain(self, settle: float = 0.025) -> list[TraceEvent]:
        old = [dataclasses.replace(e, table=LEGACY_PREFIX + e.table) for e in self.legacy.drain(settle=settle)]
        new = self.nft.drain(settle=0)
        streams = {LEGACY: (old, _legacy_base), NFT: (new, self._nft_base)}
        return merge([streams[b] for b in reversed(self.order)] + [streams[b] for b in (LEGACY, NFT)
                                                                    if b not in self.order])

    def fileno(self) -> int:
        return self.nft.fileno()  # the hook witnesses: every traced packet shows there

    def close(self) -> None:
        self.legacy.close()
        self.nft.close()


class Mixed:
    """Rules written by more than one backend into one pod, in `order` (the last written runs
    first where their hooks share a priority); kube-proxy's rules in the node through nf_tables."""

    def __init__(self, order: tuple[str, ...]):
        self.order = order
        self.name = f"{MIXED}:{','.join(order)}"
        self.legacy, self.nft = BACKENDS[LEGACY], BACKENDS[NFT]

    def apply(self, ns: str, dump: Dump) -> None:  # the node's kube-proxy rules
        self.nft.apply(ns, dump)

    def apply_rules(self, ns: str, rules: RuleSet) -> None:
        """The rule set through each backend in turn."""
        for name in self.order:
            BACKENDS[name].apply_rules(ns, rules)

    def rules(self, ns: str, family: int = 4) -> tuple[dict[RuleRef, str], Layout]:
        old, _ = self.legacy.rules(ns, family)
        new, layout = self.nft.rules(ns, family)
        lines = {RuleRef(LEGACY_PREFIX + ref.table, ref.chain, ref.number): line for ref, line in old.items()}
        legacy = Layout(tuple((LEGACY_PREFIX + t, t) for t in BUILTIN_CHAINS),
                        tuple((LEGACY_PREFIX + t, c, c) for t, chains in BUILTIN_CHAINS.items() for c in chains))
        backends = tuple((LEGACY_PREFIX + t, LEGACY) for t in BUILTIN_CHAINS) + tuple((t, NFT) for t, _ in layout.roles)
        merged = legacy.merged(layout)
        return lines | new, Layout(merged.roles, merged.hooks, backends)

    def listing(self, ns: str, table: str, family: int = 4) -> list[NumberedRule]:
        return self.nft.listing(ns, table, family)

    def counters(self, ns: str, tables: tuple[str, ...], family: int = 4) -> dict[RuleRef, int]:
        out = self.nft.counters(ns, tuple(t for t in tables if not t.startswith(LEGACY_PREFIX)), family)
        for t in tables:
            if t.startswith(LEGACY_PREFIX):
                out |= {RuleRef(t, ref.chain, ref.number): n for ref, n in
                        self.legacy.counters(ns, (t.removeprefix(LEGACY_PREFIX),), family).items()}
        return out

    def policies(self, ns: str, family: int = 4) -> dict[tuple[str, str], str]:
        return ({(LEGACY_PREFIX + table, chain): p for (table, chain), p in self.legacy.policies(ns, family).items()}
                | self.nft.policies(ns, family))

    def prepare(self, ns: str, family: int = 4) -> None:
        self.legacy.prepare(ns, family)  # every legacy table at every hook: TRACE names each
        self.nft.prepare(ns, family)

    def tracing(self, namespaces: list[str], ports: TracedPorts, family: int = 4):
        """nftrace rules only: legacy's tables log TRACE for the packets they mark too."""
        return self.nft.tracing(namespaces, ports, family)

    def reader(self, ns: str, pod: str) -> MixedReader:
        return MixedReader(ns, pod, self.order)


BACKENDS: dict[str, Backend] = {LEGACY: Legacy(), NFT: Nft()}
MIXED = "mixed"  # a lab's record says `mixed:legacy,nft`: written by legacy, then nft


def get(name: str) -> Backend:
    """The backend a lab's record names: legacy, nft, or mixed:ORDER."""
    if name.startswith(f"{MIXED}:"):
        return mixed(tuple(name.split(":", 1)[1].split(",")))
    return BACKENDS[name]


def mixed(order: tuple[str, ...]) -> Mixed:
    """Rules written by these backends in this order, into one pod."""
    if not order or any(b not in BACKENDS for b in order) or len(set(order)) != len(order):
        raise LabError(f"backends {', '.join(order) or 'none'}: give legacy and nft, each once, in the order written")
    return Mixed(order)


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
