"""Handles to RuleRef, counters and legacy's event words, from JSON listings (no root).

The listings are cut from what libnftables 1.0.6 printed on this machine for Istio 1.13's
nat rules applied by iptables-nft-restore, and for the lab's native test rule set.
"""

import dataclasses

import pytest

from lab.netfilter import RuleRef
from lab.nftrace import NftTraceEvent
from lab.rules.nft import naming
from lab.rules.nft.ruleset import Ruleset, RulesetError


def table(family, name):
    return {"table": {"family": family, "name": name, "handle": 1}}


def chain(family, tbl, name, hook=None, prio=None):
    c = {"family": family, "table": tbl, "name": name, "handle": 1}
    if hook:
        c.update(type="nat", hook=hook, prio=prio, policy="accept")
    return {"chain": c}


def rule(family, tbl, chain_name, handle, packets=None, verdict=None):
    expr = [{"match": {"op": "==", "left": {"meta": {"key": "l4proto"}}, "right": "tcp"}}]
    if packets is not None:
        expr.append({"counter": {"packets": packets, "bytes": packets * 60}})
    expr.append(verdict or {"return": None})
    return {"rule": {"family": family, "table": tbl, "chain": chain_name, "handle": handle, "expr": expr}}


# iptables-nft's `ip nat` for Istio 1.13: ISTIO_OUTPUT's nine rules are handles 17 - 25.
IPTABLES_NFT = [
    {"metainfo": {"version": "1.0.6", "release_name": "Lester Gooch #5", "json_schema_version": 1}},
    table("ip", "nat"),
    chain("ip", "nat", "OUTPUT", "output", -100),
    chain("ip", "nat", "ISTIO_OUTPUT"),
    chain("ip", "nat", "ISTIO_REDIRECT"),
    rule("ip", "nat", "OUTPUT", 10, 2, {"jump": {"target": "ISTIO_OUTPUT"}}),
    *(rule("ip", "nat", "ISTIO_OUTPUT", h, 1 if h in (20, 25) else 0) for h in range(17, 26)),
    rule("ip", "nat", "ISTIO_REDIRECT", 26, 1, {"xt": {"type": "target", "name": "REDIRECT"}}),
]
NATIVE = [
    table("inet", "istio-proxy-nat"),
    chain("inet", "istio-proxy-nat", "output", "output", -100),
    chain("inet", "istio-proxy-nat", "istio-output"),
    rule("inet", "istio-proxy-nat", "output", 8, 2, {"jump": {"target": "istio-output"}}),
    *(rule("inet", "istio-proxy-nat", "istio-output", h, 0) for h in range(16, 25)),
    table("ip6", "nat"),
    chain("ip6", "nat", "OUTPUT", "output", -100),
    rule("ip6", "nat", "OUTPUT", 3, 5),
]


def event(family, tbl, chain_name, handle=None, kind="rule", verdict="continue") -> NftTraceEvent:
    return NftTraceEvent(
        pod="sidecar", trace_id=1, family=family, table=tbl, chain=chain_name, type=kind, handle=handle,
        verdict=None if kind == "policy" else verdict, target=None, policy="accept" if kind == "policy" else None,
        ip_version=4, indev=None, outdev="eth0", mark=None, src="10.9.0.10", dst="10.9.0.20", proto="tcp",
        sport=43488, dport=9080, tcp_flags="S", ct_id=None, ct_state=None, ct_direction=None)


def test_a_handle_names_the_rule_by_its_position_as_legacy_numbers_it() -> None:
    rules = Ruleset(IPTABLES_NFT)
    assert rules.ref("ip", "nat", 25) == RuleRef("nat", "ISTIO_OUTPUT", 9)
    assert rules.ref("ip", "nat", 20) == RuleRef("nat", "ISTIO_OUTPUT", 4)
    assert str(rules.ref("ip", "nat", 20)) == "ISTIO_OUTPUT#4"
    assert rules.ref("ip", "nat", 26) == RuleRef("nat", "ISTIO_REDIRECT", 1)
    assert rules.length("ip", "nat", "ISTIO_OUTPUT") == 9 and rules.length("ip", "nat", "nowhere") == 0
    with pytest.raises(KeyError):
        rules.rule("ip", "nat", 99)


def test_counters_by_rule_ref() -> None:
    counters = Ruleset(IPTABLES_NFT).counters()
    assert {str(ref): n for ref, n in counters.items() if n} == {"OUTPUT#1": 2, "ISTIO_OUTPUT#4": 1,
                                                                 "ISTIO_OUTPUT#9": 1, "ISTIO_REDIRECT#1": 1}
    assert len(counters) == 11


def test_a_native_table_keeps_its_name_and_each_ip_version_its_families() -> None:
    v4, v6 = Ruleset(NATIVE, 4), Ruleset(NATIVE, 6)
    assert str(v4.ref("inet", "istio-proxy-nat", 19)) == "istio-proxy-nat:istio-output#4"
    assert {ref.table for ref in v4.counters()} == {"istio-proxy-nat"}
    assert {ref.table for ref in v6.counters()} == {"istio-proxy-nat", "nat"}


def test_two_tables_with_one_name_for_one_ip_version_are_refused() -> None:
    with pytest.raises(RulesetError, match="ip nat and inet nat"):
        Ruleset(IPTABLES_NFT + [table("inet", "nat")])


def test_events_in_legacy_trace_words() -> None:
    rules = Ruleset(IPTABLES_NFT)
    named = naming.trace_events([
        event("ip", "nat", "OUTPUT", 10, verdict="jump"),
        event("ip", "nat", "ISTIO_OUTPUT", 20, verdict="return"),  # an explicit return is a matched rule
        event("ip", "nat", "ISTIO_REDIRECT"),  # a regular chain's end
        event("ip", "nat", "OUTPUT"),  # a base chain's end: its policy event says it
        event("ip", "nat", "OUTPUT", kind="policy"),
        event("inet", "ilab-trace", "output", 3),  # a table this rule set does not hold
    ], rules)
    assert [(e.table, e.chain, e.kind, e.rulenum) for e in named] == [
        ("nat", "OUTPUT", "rule", 1), ("nat", "ISTIO_OUTPUT", "rule", 4),
        ("nat", "ISTIO_REDIRECT", "return", 2), ("nat", "OUTPUT", "policy", 2)]
    first = named[0]
    assert (first.pod, first.src, first.dport, first.tcp_flags, first.uid, first.outdev) == \
        ("sidecar", "10.9.0.10", 9080, "S", None, "eth0")
    assert first.prefix.startswith("sidecar ip nat OUTPUT rule handle 10 jump")


def test_an_event_whose_walk_start_was_not_read_is_left_out() -> None:
    headless = dataclasses.replace(event("ip", "nat", "ISTIO_OUTPUT", 25), src=None, dst=None, sport=None, dport=None)
    assert naming.trace_events([headless], Ruleset(IPTABLES_NFT)) == []
