"""A pod's own nft rules: `nft list ruleset` output taken from a real pod, or an `nft -f`
script such as Istio's goldens, checked and fitted to the lab.

    nsenter -t PID -n nft list ruleset > pod.nft      # on the node, PID of any process of the pod
    istio-lab run --rules pod.nft

As foreign.py does for an iptables-save dump: the proxy's uid and gid are read from the
`skuid`/`skgid` matches, Envoy's ports from the `redirect to :PORT` of istio-redirect and
istio-in-redirect (or the `tproxy ... to :PORT`), and where they differ from the lab's
they are renumbered, with a note.  Refused, with the line at fault: a rule iptables-nft
wrote through the xt compatibility layer (`xt target REDIRECT`: nft lists it but cannot
write it back; give that pod's iptables-save output instead), and a rule set that would
leave the scenarios meaningless (no nat base chain at the output hook, no redirect to an
outbound port, no owner match to let the proxy's own traffic out).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field, replace

from .. import plan
from ..errors import LabError
from . import nftset

LAB = {"skuid": plan.PROXY_UID, "skgid": plan.PROXY_GID}
TRACE_TABLE = ("inet", "ilab-trace")  # the lab's own (lab.nftrace.TRACE_TABLE): a rule set may not hold it


@dataclass
class ForeignNft:
    file: str
    rules: nftset.RuleSet  # as it goes into the sidecar pod, renumbered to the lab's uid and ports
    notes: list[str] = field(default_factory=list)


def load(file: str, text: str, proxy_uid: int | None = None, proxy_gid: int | None = None,
         outbound_port: int | None = None, inbound_port: int | None = None) -> ForeignNft:
    try:
        rules = nftset.parse(text, file)
    except nftset.NftFormatError as e:
        raise LabError(str(e)) from None
    for (family, name), table in rules.tables.items():
        if (family, name) == TRACE_TABLE:
            raise LabError(f"{file}: table {family} {name} is the lab's own trace table: leave it out")
        for chain in table.chains.values():
            for rule in chain.rules:
                if rule.xt:
                    raise LabError(f"{file}:{rule.lineno}: {rule.text!r}: a rule iptables-nft wrote through the xt "
                                   f"compatibility layer, which nft lists but cannot write back (give this table "
                                   f"as iptables-save output: --rules takes that too)")
    notes: list[str] = []
    _usable(file, rules)
    ids = {"skuid": _owner(file, rules, "skuid", proxy_uid, notes), "skgid": _owner(file, rules, "skgid", proxy_gid, notes)}
    if ids["skuid"] is None and ids["skgid"] is None:
        raise LabError(f"{file}: no skuid or skgid rule: nothing lets the proxy's own traffic out "
                       f"(Envoy would capture its own connections)")
    ports = {"outbound": outbound_port or _redirect(file, rules, "istio-redirect", "outbound"),
             "inbound": inbound_port or _inbound(rules, notes)}
    if ports["inbound"] is not None and ports["inbound"] == ports["outbound"] and inbound_port is None:
        ports["inbound"] = None  # one port for both: it stays the outbound one (renumbering it would move both)
        notes.append(f"inbound and outbound are redirected to one port, {ports['outbound']}: Envoy serves both "
                     f"there and tells them apart by the original destination (Istio 1.0, 1.1)")
    swaps = {key: (theirs, LAB[key]) for key, theirs in ids.items() if theirs not in (None, LAB[key])}
    lab_ports = {"outbound": plan.Port.OUTBOUND, "inbound": plan.Port.INBOUND}
    port_swaps = {theirs: lab_ports[what] for what, theirs in ports.items() if theirs not in (None, lab_ports[what])}
    notes += [f"proxy {'uid' if key == 'skuid' else 'gid'} {theirs} is the lab's {ours} here: renumbered"
              for key, (theirs, ours) in swaps.items()]
    notes += [f"{what} port {theirs} is the lab's {lab_ports[what]} here: renumbered"
              for what, theirs in ports.items() if theirs not in (None, lab_ports[what])]
    return ForeignNft(file, rules.map_rules(lambda r: _renumbered(r, swaps, port_swaps)), notes)


def _usable(file: str, rules: nftset.RuleSet) -> None:
    nat = [t for t in rules.tables.values() if nftset.role(t) == "nat"]
    if not nat:
        raise LabError(f"{file}: no table with a nat base chain: Istio's sidecar redirects in nat "
                       f"(is this `nft list ruleset` of the pod?)")
    if not any(c.base and c.base.hook == "output" and c.rules for t in nat for c in t.chains.values()):
        raise LabError(f"{file}: no nat base chain at the output hook holds a rule: the scenarios' outbound "
                       f"traffic would meet no Istio rule")


def _owner(file: str, rules: nftset.RuleSet, key: str, given: int | None, notes: list[str]) -> int | None:
    if given is not None:
        return given
    seen: Counter[int] = Counter()
    first = 0
    for _, rule in rules.numbered():
        w = rule.words
        for i, word in enumerate(w[:-1]):
            value = w[i + 2] if w[i + 1] == "!=" and i + 2 < len(w) else w[i + 1]
            if word == key and value.isdigit():
                seen[int(value)] += 1
                first = first or rule.lineno
    if not seen:
        return None
    if len(seen) > 1:
        if LAB[key] in seen:
            notes.append(f"{key} names {', '.join(map(str, sorted(seen)))}: the proxy is {LAB[key]}")
            return LAB[key]
        flag = "--proxy-uid" if key == "skuid" else "--proxy-gid"
        raise LabError(f"{file}:{first}: {key} names {', '.join(map(str, sorted(seen)))}: say which is the "
                       f"proxy's with {flag}")
    (found,) = seen
    return found


def _port_of(rule: nftset.Rule, statement: str) -> int | None:
    """The port of `redirect to :P` or `tproxy ip to :P` (also `to 0.0.0.0:P`)."""
    w = rule.words
    if statement not in w:
        return None
    after = w[w.index(statement):]
    target = next((after[i + 1] for i, word in enumerate(after[:-1]) if word == "to"), "")
    port = target.rsplit(":", 1)[-1]
    return int(port) if port.isdigit() else None


def _redirect(file: str, rules: nftset.RuleSet, chain: str, role: str) -> int:
    for t in rules.tables.values():
        for rule in t.chains.get(chain, nftset.Chain(chain)).rules:
            port = _port_of(rule, "redirect")
            if port is not None:
                return port
    raise LabError(f"{file}: no `redirect to :PORT` in chain {chain}: nothing sends {role} traffic to Envoy "
                   f"(give --{role}-port if the redirect is elsewhere)")


def _inbound(rules: nftset.RuleSet, notes: list[str]) -> int | None:
    for t in rules.tables.values():
        for rule in t.chains.get("istio-in-redirect", nftset.Chain("")).rules:
            if (port := _port_of(rule, "redirect")) is not None:
                return port
    for _, rule in rules.numbered():
        if (port := _port_of(rule, "tproxy")) is not None:
            return port
    notes.append("no inbound redirect: inbound traffic goes straight to the app")
    return None


def _renumbered(rule: nftset.Rule, ids: dict[str, tuple[int, int]], ports: dict[int, int]) -> nftset.Rule:
    if not ids and not ports:
        return rule
    w = list(rule.words)
    for i, word in enumerate(w[:-1]):
        at = i + 2 if w[i + 1] == "!=" and i + 2 < len(w) else i + 1
        if word in ids and w[at] == str(ids[word][0]):
            w[at] = str(ids[word][1])
        if word == "to" and i and (w[i - 1] in ("redirect", "ip", "ip6")):
            host, _, port = w[i + 1].rpartition(":")
            if port.isdigit() and int(port) in ports:
                w[i + 1] = f"{host}:{ports[int(port)]}"
    return replace(rule, text=" ".join(w))
