"""nftrace events in legacy TRACE's words, so one path joiner reads both backends.

Legacy TRACE says `table:chain:kind:rulenum` for every rule a packet matched (kind
`rule`), for the end of a user chain (`return`) and for a built-in chain's policy
(`policy`), the last two numbered one past the chain's last rule.  nf_tables says
(table, chain, handle, verdict).  The mapping, measured on 6.18:

  - an event with a handle (any verdict: continue, jump, return, accept, ...) -> `rule`,
    numbered by the rule's position in its chain;
  - an event with no handle in a regular chain (its end, no verdict) -> `return`;
  - an event with no handle in a base chain: its end, always followed by the `policy`
    event, which says the same -> dropped, as legacy sends one event there;
  - a `policy` event -> `policy`.

The socket's uid/gid are None: nftrace does not carry them.
"""

from __future__ import annotations

from typing import Iterable

from ...netfilter import RuleRef
from ...nftrace import NftTraceEvent
from ...trace import TraceEvent
from .ruleset import Ruleset


def name(event: NftTraceEvent, rules: Ruleset) -> tuple[RuleRef, str] | None:
    """(the rule, legacy's kind) an event names; None for a base chain's end (its policy
    event follows).  KeyError for a handle the listing lacks (the rules changed after it)."""
    family, table, chain = event.family, event.table, event.chain
    if event.handle is not None:
        return rules.ref(family, table, event.handle), "rule"
    past_end = RuleRef(table, chain, rules.length(family, table, chain) + 1)
    if event.type == "policy":
        return past_end, "policy"
    if rules.chain(family, table, chain).is_base:
        return None
    return past_end, "return"


def trace_events(events: Iterable[NftTraceEvent], rules: Ruleset) -> list[TraceEvent]:
    """The events of one IP version's packets as lab.trace.TraceEvent, in order.  Left
    out: events of tables `rules` does not hold (the other IP version's), and events whose
    walk's first step, the one with the headers, was not read (a reader that joined
    mid-walk): a TraceEvent names its packet."""
    out = []
    for event in events:
        if (event.family, event.table, event.chain) not in rules.chains:
            continue
        named = name(event, rules)
        if named is None or event.src is None:
            continue
        ref, kind = named
        out.append(TraceEvent(
            event.pod, ref.table, ref.chain, kind, ref.number, indev=event.indev, outdev=event.outdev,
            src=event.src, dst=event.dst, proto=event.proto, sport=event.sport, dport=event.dport,
            tcp_flags=event.tcp_flags, uid=None, gid=None, seq=None, prefix=str(event),
        ))
    return out
