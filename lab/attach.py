"""Attach mode: one flow measured in a network namespace the lab does not own (a real pod's).

    istio-lab probe --netns /proc/PID/ns/net --from pod:1000 --to 10.96.0.90:9080

The flow is sent from that namespace as the given uid/gid (a TCP connection opened and
closed at once, no payload; or one empty UDP datagram) to the address named, and traced
there for the probe only: nf_tables' `inet ilab-trace` marks its packets (lab.attached),
and the pod's own tables report every rule they pass, legacy ones through nfnetlink_log,
iptables-nft ones through nf_tables' trace.  The pod's rules are read with their save
tools (which make no table), before and after, for the rule text and the counters.  Its
rules are never written: when the probe ends, or the next istio-lab command after one
that was killed, the namespace is as it was (lab.attached.undo).

What a live pod's other traffic does meanwhile moves counters too: here a counter may
move more than TRACE saw, never less.  Only the client's own connection is measured:
where a proxy takes it, the proxy's own connection onward is its own (the lab joins such
legs through its stub Envoy's log; a real Envoy's is not read).
"""

from __future__ import annotations

import os
import subprocess
from collections import Counter
from dataclasses import dataclass

from . import attached, join, netns, plan, procfs, traffic
from . import path as paths
from .addr import Address
from .backend import NftReader
from .errors import LabError
from .netfilter import RuleRef
from .observe import witnessed
from .path import Path
from .rules.nft import libnft, tracing
from .rules.save import counted
from .rules.xtables import RESTORE_DEADLINE
from .nftrace import NftraceReader
from .trace import TraceEvent, TraceError, TraceReader

POD = "sidecar"  # what the joiner calls the namespace whose rules it reads
SAVE = {("legacy", 4): "iptables-legacy-save", ("legacy", 6): "ip6tables-legacy-save",
        ("nft", 4): "iptables-nft-save", ("nft", 6): "ip6tables-nft-save"}
PROXY_PROCESSES = ("envoy",)  # a local listener of these on 15001/15006 is a proxy hop


@dataclass(frozen=True)
class Attached:
    """What one attach probe measured."""

    netns: str
    backends: tuple[str, ...]  # whose tables the pod holds: "legacy", "nft"
    path: Path
    client: Address | None
    error: str | None  # what the client was told, if its flow failed
    ending: str  # "reached", "died", "proxy" (taken by a local proxy), "sent" (left the pod)
    listener: str  # the local process that took it, if any ("envoy (pid 4242)")
    rows: tuple[tuple[RuleRef, int, int, str], ...]  # (rule, counter moved, TRACE events, its line)
    counters_cover_trace: bool
    events: tuple[TraceEvent, ...]


def _tables(path: str, family: int) -> list[str]:
    """The legacy tables that exist in the namespace (/proc/net/ip_tables_names: reading it makes none)."""
    name = "ip6_tables_names" if family == 6 else "ip_tables_names"
    with netns.entered(path):
        try:
            with open(f"/proc/thread-self/net/{name}") as f:  # the thread's namespace, not the process's
                return f.read().split()
        except OSError:
            return []


def _saved(path: str, backend: str, family: int) -> tuple[dict[RuleRef, str], dict[RuleRef, int], dict]:
    """The pod's rules as its save tool prints them with counters: (lines, packets, policies)."""
    tool = SAVE[backend, family]
    try:
        with netns.entered(path):
            done = subprocess.run([tool, "-c"], capture_output=True, text=True, timeout=RESTORE_DEADLINE)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise LabError(f"{tool}: {e}") from None
    if done.returncode:
        raise LabError(f"{tool}: {' '.join(done.stderr.split())}")
    dump, rules = counted(done.stdout, tool, family)
    refs = {r.ref: r.line for r in rules}
    packets = {r.ref: r.packets for r in rules}
    policies = {(t.name, c): p for t in dump.tables.values() for c, p in t.policies.items() if p != "ACCEPT"}
    return refs, packets, policies


def _read(path: str, backends: tuple[str, ...], family: int):
    lines, packets, policies = {}, {}, {}
    for backend in backends:
        found = _saved(path, backend, family)
        lines.update(found[0])
        packets.update(found[1])
        policies.update(found[2])
    return lines, packets, policies


def _delivered(events) -> list[TraceEvent]:
    """Our own input chain's events (lab.rules.nft.tracing's witness, after every table) as
    INPUT events of the pod: a traced packet delivered in the namespace (the pod's tables may have no INPUT chain a packet back over lo is walked by:
    nat judges it no more, and a table that does not exist reports nothing)."""
    out = []
    for e in events:
        if e.table_id != (tracing.FAMILY, tracing.TABLE) or e.chain != "input" or e.type != "policy":
            continue
        out.append(TraceEvent(POD, tracing.TABLE, "INPUT", "policy", 1, e.indev, e.outdev, e.src or "", e.dst or "",
                              e.proto, e.sport, e.dport, e.tcp_flags, None, None, None, "TRACE: (ilab-trace input)"))
    return out


def _listener(ns: attached.Namespace, port: int) -> str:
    """The process of the namespace listening on `port` (TCP), as `name (pid N)`, or ""."""
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or procfs.net_inode(entry) != ns.ino:
            continue
        try:
            held = procfs.sockets(int(entry), "tcp", ipv6=True)  # tcp and tcp6
        except OSError:
            continue
        if any(s.state == procfs.TCP_LISTEN and s.local.port == port for s in held):
            try:
                with open(f"/proc/{entry}/comm") as f:
                    return f"{f.read().strip()} (pid {entry})"
            except OSError:
                return f"pid {entry}"
    return ""


def _fire(path: str, to: Address, transport: str, uid: int, gid: int, timeout: float) -> tuple[Address | None, str | None]:
    """Send the flow: (the client's address, what it was told when it failed)."""
    try:
        if transport == "udp":
            try:
                reply = traffic.datagram(path, to.ip, to.port, uid=uid, gid=gid, timeout=min(timeout, 0.5))
                return reply.local, None
            except traffic.RequestError as e:
                if e.local is not None and "no answer" in str(e):  # sent: an answer is not what is measured
                    return e.local, None
                raise
        sock = traffic.connect(path, to.ip, to.port, uid=uid, gid=gid, timeout=timeout)
        local = Address.of(sock.getsockname())
        sock.close()  # the handshake is all that is measured: no payload
        return local, None
    except traffic.RequestError as e:
        if e.local is None:
            raise
        return e.local, str(e)


def probe(path: str, uid: int, gid: int, to: Address, transport: str = "tcp", timeout: float = 2.0) -> Attached:
    """Trace one flow from the namespace at `path`; leave it as it was found."""
    ns = attached.Namespace.at(path)
    family = to.family
    with attached.one_probe(ns):
        if (tracing.FAMILY, tracing.TABLE) in libnft.tables(path):
            raise LabError(f"--netns {path}: it has an `{tracing.FAMILY} {tracing.TABLE}` table already (a lab's "
                           f"pod?): attach mode is for pods the lab does not own")
        legacy = bool(_tables(path, family))
        nft = any(name in ("raw", "mangle", "nat", "filter", "security") for fam, name in libnft.tables(path)
                  if fam == ("ip6" if family == 6 else "ip"))
        backends = tuple(b for b, on in (("legacy", legacy), ("nft", nft)) if on)
        lines, before, policies = _read(path, backends, family)
        rec = attached.AttachRecord.new(ns)
        rec.table_made = True
        rec.nf_log = {str(f): v for f, v in attached.nf_loggers(path).items()} if legacy else {}
        rec.save()  # the intent, before anything is placed
        readers, marker = [], None
        try:
            if legacy:
                readers.append(TraceReader(path, POD))  # binds nfnetlink_log as the namespace's logger
            if nft:
                readers.append(NftReader(path, POD))
            marker = NftraceReader(path, POD, skip=frozenset())  # our own table's input chain: delivered here
            tracing.ensure_table(path)
            placed = tracing.add(path, [tracing.Flow(transport, (to.port,), family)])
            rec.handles = [list(h) for h in placed.handles]
            rec.save()
            for reader in (*readers, marker):
                reader.drain(settle=0)
            client, error = _fire(path, to, transport, uid, gid, timeout)
            events = [e for reader in readers for e in reader.drain(settle=0.02)]
            events += _delivered(marker.drain(settle=0))
        except (TraceError, libnft.NftError) as e:  # a reader or the trace rules could not be placed
            raise LabError(f"--netns {path}: {e}") from None
        finally:
            for reader in (*readers, *([marker] if marker else [])):
                reader.close()
            attached.undo(rec)
        _, after, _ = _read(path, backends, family)
    return _measure(ns, backends, to, client, error, events, lines, policies, before, after, transport)


def _measure(ns: attached.Namespace, backends, to: Address, client: Address | None, error: str | None,
             events: list[TraceEvent], lines, policies, before, after, transport: str) -> Attached:
    rules = join.Rules(lines, policies=policies)
    if client is not None and client.ip in plan.WILDCARD.values():  # a failed connect keeps the bound wildcard
        client = next((e.source for e in events if e.opens_flow and e.sport == client.port and e.source), client)
    leg = join.Leg(client, to) if client is not None else None
    syn = join.first_packet(events, leg) if leg else []
    died = join.death(events, leg, {POD: rules}, error) if leg and error else None
    delivered = join.reached(events, leg) if leg else None
    listener = _listener(ns, delivered[1].port) if delivered and transport == "tcp" else ""
    label = str(to)
    ending = "died" if died else "reached" if delivered else "sent"
    if delivered and died is None:
        label = "Local Pod"
        if delivered[1].port in paths.PROXIES and any(p in listener for p in PROXY_PROCESSES):
            leg, ending = join.Leg(leg.client, leg.server, delivered[1].port), "proxy"
    path = join.path("Local Pod", label, [leg], events, rules, died=died) if syn else paths.of([])
    traced = Counter(e.rule for e in events if rules.matched(e) and witnessed(e.rule))
    moved = {ref: after.get(ref, 0) - n for ref, n in before.items() if after.get(ref, 0) != n}
    refs = [ref for ref in dict.fromkeys([*traced, *moved]) if witnessed(ref)]
    rows = tuple((ref, moved.get(ref, 0), traced.get(ref, 0), lines.get(ref, "")) for ref in refs)
    cover = all(moved.get(ref, 0) >= traced.get(ref, 0) for ref in refs)
    return Attached(ns.path, backends, path, client, error, ending, listener, rows, cover, tuple(events))
