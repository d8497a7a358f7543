"""A walk written as the lab measures it: the article's notation, and why rules did not match.

The hops are the measured path's (lab/path.py): in the sidecar pod, whose events the lab
reads, each leg starts at its hook (OUTPUT or PREROUTING); every rule that matched in a table
that is or plays raw, mangle or nat is a hop, but a base chain's jump (the chain jumped to
says more) and raw's base chains (the lab's TRACE rules live there); a rule number only
where the chain has more than one rule; a hop names its chain as the rule set does
(`ISTIO_OUTPUT`, nft's `istio-output`) and says its table where it plays no nat
(`istio-inbound RULE 8 (istio-proxy-mangle)`), its backend in a pod two wrote
(`ISTIO_OUTPUT RULE 9 (nft)`, `OUTPUT RULE 3 (mangle, legacy)`); a packet back in over lo shows `POSTROUTING -> PREROUTING`
before its hops there; a leg ends at the proxy that took it, or at INPUT (delivered here)
or POSTROUTING (sent on).  The path ends at the destination.

How a flow ends, written as the lab measures it (lab.join reads each from TRACE):
  - a rule that drops or rejects is a hop whatever its table, then `DROP` or `REJECT`
    (`... -> ISTIO_OUTPUT RULE 1 -> DROP`; a policy: `OUTPUT POLICY (filter) -> DROP`);
  - no socket: where a proxy would be, the port (`... -> ISTIO_REDIRECT -> 15001: no
    listener, refused`), elsewhere the pod and port (`... -> POSTROUTING -> Remote Pod 22:
    no listener, refused`); TPROXY with no transparent socket: `15006: no transparent
    listener, dropped`;
  - no route: `... -> POSTROUTING -> node: no route to 10.96.0.90, unreachable`;
  - a proxy that closes instead of dialling: `Envoy 15001 (Outbound) -> blackhole, closed`;
  - a loop: the proxy reached the second time, `... -> Envoy 15001 (loop)`, and no more.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from ..netfilter import BUILTIN_TARGETS, PATH_TABLES, RuleRef
from .. import path as paths
from ..addr import Address
from ..path import Hop, Packet, Path
from .chains import Hit, Passed, Policy
from .flow import Leg, Walk
from .stack import Death, Delivered, HookPass
from .topology import LABELS, NODE, Topology

SHOWN = "sidecar"  # the pod whose events make the measured path's hops


@dataclass(frozen=True)
class Mark:
    """A hop before it is a lab.path.Hop: kind "endpoint" | "hook" | "chain" | "proxy" | "end"."""

    kind: str
    name: str
    rule: int | None = None
    numbered: bool = True
    table: str = "nat"
    packet: str = ""
    line: str = ""
    owner: str = ""
    where: str = ""  # a chain hop's namespace when not the sidecar's: "node"
    role: str = ""  # the xtables table an nft table plays, where its name is another
    backend: str = ""  # legacy or nft, in a pod whose rules both wrote


def to_path(marks: list[Mark]) -> Path:
    """The one place that knows lab.path's types."""
    return paths.of(Hop(m.kind, m.name, m.table, m.rule, m.numbered, _packet(m.packet), m.line,
                        owner=_owner(m.owner), where=m.where, role=m.role, backend=m.backend) for m in marks)


def _owner(text: str) -> tuple[int, int] | None:
    """"uid 1000 gid 1000" as (1000, 1000)."""
    words = text.split()
    return (int(words[1]), int(words[3])) if len(words) == 4 else None


def _packet(text: str) -> Packet | None:
    """"SYN 10.244.0.10:20000 > 10.96.0.90:9080" (or "UDP ...") as a lab.path.Packet."""
    words = text.split()
    if len(words) != 4 or words[0] not in ("SYN", "UDP"):
        return None
    try:
        return Packet("udp" if words[0] == "UDP" else "tcp", _address(words[1]), Address.parse(words[3]))
    except ValueError:
        return None


def _address(text: str) -> Address:
    """An endpoint; a port the walk leaves open ("10.244.0.10:*": the kernel's to pick) is 0."""
    return Address.parse(text[:-1] + "0" if text.endswith(":*") else text)


def marks(walk: Walk) -> list[Mark]:
    source, destination = walk.flow.labels
    out = [Mark("endpoint", source)]
    for i, leg in enumerate(walk.legs):
        looped = walk.ending.kind == "loop" and i == len(walk.legs) - 1
        out += _leg(leg, looped)
    if walk.ending.kind == "reached":
        out.append(Mark("endpoint", destination, packet=walk.legs[-1].end.packet.text()))
    elif walk.ending.kind == "closed":
        out.append(Mark("end", walk.ending.why))
    return out


def _leg(leg: Leg, looped: bool) -> list[Mark]:
    """One leg's marks: each stay in the sidecar (a packet the node sends back in, a pod's own
    Service hairpinned, stays again), the node's rewrites between (`KUBE-SEP-APP RULE 2
    (node)`), and how the leg ended."""
    visits = _visits(leg.passes)
    end = leg.end
    killer = end.cause if isinstance(end, Death) else None
    out: list[Mark] = []
    stays = [i for i, (ns, _) in enumerate(visits) if ns == SHOWN]
    if not stays:  # the sidecar never saw it: the node's rewrites are all there is
        out = [m for _, passes in visits for m in _node_marks(passes)]
        if isinstance(end, Death):
            out += _ending(end, killer, [], None)
        return out
    out += [m for _, passes in visits[:stays[0]] for m in _node_marks(passes)]  # rewritten before it came in
    for k, i in enumerate(stays):
        passes = visits[i][1]
        marks, back = _hops(passes, killer)
        out += marks
        after = [m for _, later in visits[i + 1:stays[k + 1] if k + 1 < len(stays) else None] for m in _node_marks(later)]
        if k + 1 < len(stays):  # sent out, and the node sends it back in
            out += _exit(passes, back) + after
            continue
        if leg.proxy is not None:
            name = leg.proxy.looped if looped else leg.proxy.name
            return out + [Mark("proxy", name, packet=leg.packet.text())]
        if _refused_where_redirected(end):  # where the proxy would be: the port alone
            return out + [Mark("end", paths.refused(end.packet.dport).name)]
        out += _exit(passes, back) + after
        if isinstance(end, Death):
            out += _ending(end, killer, passes, back)
    return out


def _visits(passes) -> list[tuple[str, list[HookPass]]]:
    """The leg's passes grouped by namespace, one group per stay, in order."""
    out: list[tuple[str, list[HookPass]]] = []
    for ps in passes:
        if out and out[-1][0] == ps.namespace:
            out[-1][1].append(ps)
        else:
            out.append((ps.namespace, [ps]))
    return out


def _exit(passes: list[HookPass], back: list[Mark]) -> list[Mark]:
    """The hook the packet left the sidecar's rules by: INPUT (delivered here) or POSTROUTING."""
    entry = passes[0].hook if passes else None
    exit_hook = "INPUT" if entry == "PREROUTING" or back else "POSTROUTING"
    exit_pass = next((ps for ps in reversed(passes) if ps.hook == exit_hook), None)
    return [Mark("hook", exit_hook, packet=exit_pass.packet.text())] if exit_pass is not None else []


def _node_marks(passes: list[HookPass]) -> list[Mark]:
    """The node's rules that rewrote the packet: kube-proxy's DNAT, a hairpin's masquerade."""
    out = []
    for ps in passes:
        if ps.namespace != NODE:
            continue
        for step in _steps(ps):
            if isinstance(step, Hit) and step.chain.table.role == "nat" and step.rule.target is not None \
                    and step.rule.target.name in paths.NODE_REWRITES:
                out.append(replace(_hit(step), where=NODE))
    return out


def _ending(end: Death, killer: Hit | Policy | None, passes: list[HookPass], back: list[Mark]) -> list[Mark]:
    out = []
    shown = any(step is killer for ps in passes if ps.hook != "POSTROUTING" for step in _steps(ps))
    if killer is not None and not shown:
        hop = _killer(killer)
        if end.namespace != SHOWN:  # another namespace's rule: say whose
            hop = replace(hop, name=f"{LABELS[end.namespace]}: {hop.name}")
        out.append(hop)
    return out + [Mark("end", _death(end))]


def _hops(passes: list[HookPass], killer: Hit | Policy | None) -> tuple[list[Mark], list[Mark]]:
    """The leg's entry hook and the rules it matched in the sidecar; (all of them, those after
    the packet came back in over lo)."""
    if not passes:
        return [], []
    first = passes[0].packet
    owner = f"uid {first.owner.uid} gid {first.owner.gid}" if first.owner else ""
    out = [Mark("hook", passes[0].hook, packet=first.text(), owner=owner, line=_entry(passes[0]))]
    sent = [i for i, ps in enumerate(passes) if ps.hook == "POSTROUTING"] if passes[0].hook == "OUTPUT" else []
    before, after = (passes[:sent[0]], passes[sent[-1] + 1:]) if sent else (passes, [])
    out += _rules(before, killer)
    back = _rules(after, killer)
    if back:
        out += [Mark("hook", "POSTROUTING", packet=passes[sent[0]].packet.text()),
                Mark("hook", "PREROUTING", packet=after[0].packet.text(), line=_entry(after[0]))] + back
    return out, back


def _entry(ps: HookPass) -> str:
    """The rule of the hook's nat base chain that the packet matched (its jump into Istio's
    chains), as the measured hook hop names it."""
    for walked in ps.walks:
        if walked.table.role != "nat":
            continue
        for step in walked.steps:
            if isinstance(step, Hit) and step.chain.hook == ps.hook:
                return step.rule.line
    return ""


def _refused_where_redirected(end: Delivered | Death) -> bool:
    return (isinstance(end, Death) and end.kind == "refused" and end.namespace == SHOWN
            and end.packet.conn is not None and end.packet.conn.dst_nat)


def _steps(ps: HookPass):
    return (step for walked in ps.walks for step in walked.steps)


def _rules(passes: list[HookPass], killer: Hit | Policy | None) -> list[Mark]:
    out = []
    for ps in passes:
        for step in _steps(ps):
            if isinstance(step, Hit) and (step is killer or _shown(step)):
                out.append(_hit(step))
            elif isinstance(step, Policy) and step is killer:
                out.append(_killer(step))
    return out


def _shown(hit: Hit) -> bool:
    role, target = hit.chain.table.role, hit.rule.target
    if role not in PATH_TABLES:
        return False
    if hit.chain.hook is not None:  # a base chain: its jumps are not hops, and raw's hold the lab's TRACE rules
        return role != "raw" and target is not None and target.name in BUILTIN_TARGETS
    return True


def _hit(hit: Hit) -> Mark:
    ref, table = hit.rule.ref, hit.chain.table
    return Mark("chain", ref.chain, ref.number, len(hit.chain) > 1, ref.table, hit.packet.text(), hit.rule.line,
                role=table.role if table.role != table.name else "", backend=table.backend)


def _killer(cause: Hit | Policy) -> Mark:
    if isinstance(cause, Hit):
        return _hit(cause)
    return Mark("chain", f"{cause.chain} POLICY", None, False, cause.table, cause.packet.text())


def _death(end: Death) -> str:
    if end.kind in ("DROP", "REJECT") and end.cause is not None:
        return end.why or end.kind  # a target's own words (TPROXY with no socket), or the verdict
    if end.kind == "refused":
        return paths.refused(end.packet.dport, LABELS[end.namespace]).name
    if end.kind == "unreachable":
        return f"node: {end.why}, unreachable" if end.namespace == NODE else f"{end.why}, unreachable"
    return f"{LABELS[end.namespace]}: {end.why}, dropped"


# --- why rules did not match ----------------------------------------------------------------

@dataclass(frozen=True)
class Miss:
    """A rule the packet passed: what it needs, and what the packet had instead."""

    leg: int  # 0: the client's connection, then one per proxy
    rule: RuleRef
    needs: str
    has: str
    namespace: str = SHOWN  # whose rule: the sidecar's, or the node's (kube-proxy's)
    qualifier: str = ""  # what its table's hops say after the rule: `istio-proxy-mangle`, `mangle, legacy`

    def __str__(self) -> str:
        return f"rule {self.rule.number}: needs {self.needs}; {self.has}"


def misses(walk: Walk, topology: Topology) -> list[Miss]:
    """Every rule each leg's first packet passed without matching, in the order it passed them."""
    out = []
    for i, leg in enumerate(walk.legs):
        for ps in leg.passes:
            ns = topology.namespaces[ps.namespace]
            for walked in ps.walks:
                for step in walked.steps:
                    if isinstance(step, Passed):
                        for rule in step.chain.rules[step.start:step.stop]:
                            condition = rule.first_miss(step.packet, ns)
                            out.append(Miss(i, rule.ref, condition.needs(), condition.has(step.packet, ns),
                                            ps.namespace, walked.table.qualifier))
    return out
