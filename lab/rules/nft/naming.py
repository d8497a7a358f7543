"""nftrace events in legacy TRACE's words, so one path joiner reads both backends.

Legacy TRACE says `table:chain:kind:rulenum` for every rule a packet matched (kind
`rule`), for the end of a user chain (`return`) and for a built-in chain's policy
(`policy`), the last two numbered one past the chain's last rule.  nf_tables says
(table, chain, handle, verdict).  The mapping, measured on 6.18:

  - an event with a handle (any verdict: continue, jump, return, accept, ...) -> `rule`,
    numbered by the rule's position in its chain (lab.rules.nftset reads the listing);
  - an event with no handle in a regular chain (its end, no verdict) -> `return`;
  - an event with no handle in a base chain: its end, always followed by the `policy`
    event, which says the same -> dropped, as legacy sends one event there;
  - a `policy` event -> `policy`.

The lab's own table `inet ilab-trace` (lab.rules.nft.tracing) has a base chain at each of
the four hooks a path crosses.  Its policy events are the hook witnesses: one event per
hook a traced packet passes, named `ilab-trace:OUTPUT:policy` (the chain by its hook), so
a path sees where a packet entered, left or was delivered whatever the rule set hooks.
A native rule set (Istio's `inet istio-proxy-nat`) has base chains at prerouting and
output only; legacy's and iptables-nft's tables would say INPUT and POSTROUTING otherwise.

The socket's uid/gid are None: nftrace does not carry them.
"""

from __future__ import annotations

from typing import Iterable

from ...netfilter import RuleRef
from ...nftrace import TRACE_TABLE, NftTraceEvent
from ...trace import TraceEvent
from ..nftset import RuleSet


class Names:
    """The rule set one IP version's packets meet (RuleSet.seen_by), indexed by handle."""

    def __init__(self, rules: RuleSet):
        self.rules = rules
        self.handles = rules.handles()

    def name(self, event: NftTraceEvent) -> tuple[RuleRef, str] | None:
        """(the rule, legacy's kind) an event names; None for a base chain's end (its policy
        event follows).  KeyError for a handle the listing lacks (the rules changed after it)."""
        table = self.rules.tables[event.family, event.table]
        chain = table.chains[event.chain]
        if event.table_id == TRACE_TABLE:  # a hook witness: its policy only
            hook = chain.base.hook.upper() if chain.base else event.chain.upper()
            return (RuleRef(event.table, hook, 1), "policy") if event.type == "policy" else None
        if event.handle is not None:
            return self.handles[event.family, event.table, event.handle], "rule"
        past_end = RuleRef(event.table, event.chain, len(chain.rules) + 1)
        if event.type == "policy":
            return past_end, "policy"
        if chain.base is not None:
            return None
        return past_end, "return"

    def holds(self, event: NftTraceEvent) -> bool:
        table = self.rules.tables.get((event.family, event.table))
        return table is not None and event.chain in table.chains


def trace_events(events: Iterable[NftTraceEvent], rules: RuleSet) -> list[TraceEvent]:
    """The events of one IP version's packets as lab.trace.TraceEvent, in order.  Left
    out: events of tables `rules` does not hold (the other IP version's), and events whose
    walk's first step, the one with the headers, was not read (a reader that joined
    mid-walk): a TraceEvent names its packet."""
    names = Names(rules)
    out = []
    for event in events:
        if not names.holds(event):
            continue
        named = names.name(event)
        if named is None or event.src is None:
            continue
        ref, kind = named
        out.append(TraceEvent(
            event.pod, ref.table, ref.chain, kind, ref.number, indev=event.indev, outdev=event.outdev,
            src=event.src, dst=event.dst, proto=event.proto, sport=event.sport, dport=event.dport,
            tcp_flags=event.tcp_flags, uid=None, gid=None, seq=None, prefix=str(event),
        ))
    return out
