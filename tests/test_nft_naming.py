"""Handles to RuleRef, counters and legacy's event words, from `nft -a list ruleset` text
(no root), read as lab.rules.nftset reads every listing.

The listings are cut from what nft 1.0.6 printed on this machine for Istio 1.13's nat rules
applied by iptables-nft-restore, and for the lab's native test rule set.
"""

import dataclasses

import pytest

from lab.netfilter import Layout, RuleRef
from lab.nftrace import NftTraceEvent
from lab.rules import nftset
from lab.rules.nft import naming

# iptables-nft's `ip nat` for Istio 1.13: ISTIO_OUTPUT's nine rules are handles 17 - 25.
ISTIO_OUTPUT = "\n".join(
    f"\t\tmeta l4proto tcp counter packets {1 if h in (20, 25) else 0} bytes {60 if h in (20, 25) else 0} return "
    f"# handle {h}" for h in range(17, 26))
IPTABLES_NFT = f"""table ip nat {{ # handle 3
\tchain OUTPUT {{ # handle 2
\t\ttype nat hook output priority -100; policy accept;
\t\tmeta l4proto tcp counter packets 2 bytes 120 jump ISTIO_OUTPUT # handle 10
\t}}

\tchain ISTIO_OUTPUT {{ # handle 5
{ISTIO_OUTPUT}
\t}}

\tchain ISTIO_REDIRECT {{ # handle 6
\t\tmeta l4proto tcp counter packets 1 bytes 60 xt target REDIRECT # handle 26
\t}}
}}
"""
NATIVE = """table inet istio-proxy-nat { # handle 7
\tchain output { # handle 1
\t\ttype nat hook output priority -100; policy accept;
\t\tcounter packets 2 bytes 120 jump istio-output # handle 8
\t}

\tchain istio-output { # handle 2
""" + "\n".join(f"\t\tmeta l4proto tcp counter packets 0 bytes 0 return # handle {h}" for h in range(16, 25)) + """
\t}
}
table ip6 nat { # handle 9
\tchain OUTPUT { # handle 1
\t\ttype nat hook output priority -100; policy accept;
\t\tcounter packets 5 bytes 300 return # handle 3
\t}
}
table inet ilab-trace { # handle 10
\tchain output { # handle 1
\t\ttype filter hook output priority -301; policy accept;
\t}

\tchain input { # handle 2
\t\ttype filter hook input priority 1000; policy accept;
\t}
}
"""


def listing(text: str, ip_version: int = 4) -> nftset.RuleSet:
    return nftset.parse(text, "nft -a list ruleset").seen_by(ip_version)


def event(family, tbl, chain_name, handle=None, kind="rule", verdict="continue") -> NftTraceEvent:
    return NftTraceEvent(
        pod="sidecar", trace_id=1, family=family, table=tbl, chain=chain_name, type=kind, handle=handle,
        verdict=None if kind == "policy" else verdict, target=None, policy="accept" if kind == "policy" else None,
        ip_version=4, indev=None, outdev="eth0", mark=None, src="10.9.0.10", dst="10.9.0.20", proto="tcp",
        sport=43488, dport=9080, tcp_flags="S", ct_id=None, ct_state=None, ct_direction=None)


def test_a_handle_names_the_rule_by_its_position_as_legacy_numbers_it() -> None:
    handles = listing(IPTABLES_NFT).handles()
    assert handles["ip", "nat", 25] == RuleRef("nat", "ISTIO_OUTPUT", 9)
    assert handles["ip", "nat", 20] == RuleRef("nat", "ISTIO_OUTPUT", 4)
    assert str(handles["ip", "nat", 20]) == "ISTIO_OUTPUT#4"
    assert handles["ip", "nat", 26] == RuleRef("nat", "ISTIO_REDIRECT", 1)
    assert ("ip", "nat", 99) not in handles


def test_counters_by_rule_ref() -> None:
    counters = listing(IPTABLES_NFT).packet_counts()
    assert {str(ref): n for ref, n in counters.items() if n} == {"OUTPUT#1": 2, "ISTIO_OUTPUT#4": 1,
                                                                 "ISTIO_OUTPUT#9": 1, "ISTIO_REDIRECT#1": 1}
    assert len(counters) == 11
    rule = listing(IPTABLES_NFT).rule(RuleRef("nat", "ISTIO_REDIRECT", 1))
    assert (rule.text, rule.packets, rule.bytes) == ("meta l4proto tcp counter xt target REDIRECT", 1, 60)


def test_a_native_table_keeps_its_name_and_each_ip_version_its_families() -> None:
    v4, v6 = listing(NATIVE, 4), listing(NATIVE, 6)
    assert str(v4.handles()["inet", "istio-proxy-nat", 19]) == "istio-proxy-nat:istio-output#4"
    assert {ref.table for ref in v4.packet_counts()} == {"istio-proxy-nat"}
    assert {ref.table for ref in v6.packet_counts()} == {"istio-proxy-nat", "nat"}


def test_two_tables_with_one_name_for_one_ip_version_are_refused() -> None:
    with pytest.raises(nftset.RuleSetError, match="ip nat and inet nat"):
        listing(IPTABLES_NFT + "table inet nat {\n}\n")


def test_the_layout_says_what_each_table_plays_and_each_base_chain_hooks() -> None:
    layout = listing(NATIVE).layout(skip=(("inet", "ilab-trace"),))
    assert layout.role("istio-proxy-nat") == "nat" and layout.role("ilab-trace") == "ilab-trace"
    assert layout.hook("istio-proxy-nat", "output") == "OUTPUT"
    assert layout.hook("istio-proxy-nat", "istio-output") is None
    assert Layout().hook("nat", "OUTPUT") == "OUTPUT" and Layout().role("mangle") == "mangle"  # xtables: by name
    assert Layout.from_json(layout.as_json()) == layout


@pytest.mark.parametrize("rule, target", [
    ("counter jump istio-output", "istio-output"),
    ("meta l4proto tcp counter redirect to :15001", "REDIRECT"),
    ('oifname "lo" ip saddr 127.0.0.6 counter return', "RETURN"),
    ("meta l4proto tcp ip daddr != 127.0.0.1 tproxy ip to :15006 meta mark set 0x00000539 counter accept", "TPROXY"),
    ("counter meta mark set 0x00000539", "MARK"),
    ("meta l4proto tcp meta mark 0x00000539 counter ct mark set meta mark", "CONNMARK"),
    ("udp dport 53 meta skuid 1337 counter ct zone set 1", "CT"),
    ("meta l4proto tcp counter xt target REDIRECT", None),  # iptables-nft's compat target: its save form says it
    ("tcp dport 80", None),
])
def test_a_rules_target_in_xtables_words(rule, target) -> None:
    assert nftset.target(rule) == target


def test_events_in_legacy_trace_words() -> None:
    rules = listing(IPTABLES_NFT + NATIVE.split("table ip6 nat")[0].replace("istio-proxy-nat", "other"))
    named = naming.trace_events([
        event("ip", "nat", "OUTPUT", 10, verdict="jump"),
        event("ip", "nat", "ISTIO_OUTPUT", 20, verdict="return"),  # an explicit return is a matched rule
        event("ip", "nat", "ISTIO_REDIRECT"),  # a regular chain's end
        event("ip", "nat", "OUTPUT"),  # a base chain's end: its policy event says it
        event("ip", "nat", "OUTPUT", kind="policy"),
        event("inet", "elsewhere", "output", 3),  # a table this rule set does not hold
    ], rules)
    assert [(e.table, e.chain, e.kind, e.rulenum) for e in named] == [
        ("nat", "OUTPUT", "rule", 1), ("nat", "ISTIO_OUTPUT", "rule", 4),
        ("nat", "ISTIO_REDIRECT", "return", 2), ("nat", "OUTPUT", "policy", 2)]
    first = named[0]
    assert (first.pod, first.src, first.dport, first.tcp_flags, first.uid, first.outdev) == \
        ("sidecar", "10.9.0.10", 9080, "S", None, "eth0")
    assert first.prefix.startswith("sidecar ip nat OUTPUT rule handle 10 jump")


def test_the_labs_trace_table_witnesses_each_hook_once() -> None:
    """ilab-trace's rule and chain end say nothing; its policy is the hook the packet passed."""
    named = naming.trace_events([
        event("inet", "ilab-trace", "output", 4),  # the rule that set the trace bit
        event("inet", "ilab-trace", "output"),
        event("inet", "ilab-trace", "output", kind="policy"),
        event("inet", "istio-proxy-nat", "output", 8, verdict="jump"),
        event("inet", "ilab-trace", "input"),
        event("inet", "ilab-trace", "input", kind="policy"),
    ], listing(NATIVE))
    assert [(e.table, e.chain, e.kind, e.rulenum) for e in named] == [
        ("ilab-trace", "OUTPUT", "policy", 1), ("istio-proxy-nat", "output", "rule", 1),
        ("ilab-trace", "INPUT", "policy", 1)]


def test_an_event_whose_walk_start_was_not_read_is_left_out() -> None:
    headless = dataclasses.replace(event("ip", "nat", "ISTIO_OUTPUT", 25), src=None, dst=None, sport=None, dport=None)
    assert naming.trace_events([headless], listing(IPTABLES_NFT)) == []


def test_the_json_listing_gives_the_same_handles_positions_and_counters() -> None:
    """libnft.read lists by JSON (nothing translated through libxtables): the same model, no words."""
    items = [{"metainfo": {"json_schema_version": 1}},
             {"table": {"family": "ip", "name": "nat", "handle": 3}},
             {"chain": {"family": "ip", "table": "nat", "name": "OUTPUT", "handle": 2, "type": "nat",
                        "hook": "output", "prio": -100, "policy": "accept"}},
             {"chain": {"family": "ip", "table": "nat", "name": "ISTIO_OUTPUT", "handle": 5}},
             {"rule": {"family": "ip", "table": "nat", "chain": "OUTPUT", "handle": 10,
                       "expr": [{"counter": {"packets": 2, "bytes": 120}}, {"jump": {"target": "ISTIO_OUTPUT"}}]}},
             *({"rule": {"family": "ip", "table": "nat", "chain": "ISTIO_OUTPUT", "handle": h,
                         "expr": [{"counter": {"packets": int(h in (20, 25)), "bytes": 60 * (h in (20, 25))}},
                                  {"return": None}]}} for h in range(17, 26))]
    from_json, from_text = nftset.from_json(items).seen_by(4), listing(IPTABLES_NFT)
    assert from_json.handles() == {k: v for k, v in from_text.handles().items() if v.chain != "ISTIO_REDIRECT"}
    assert from_json.packet_counts() == {k: v for k, v in from_text.packet_counts().items() if k.chain != "ISTIO_REDIRECT"}
    assert from_json.layout() == listing(IPTABLES_NFT.split("\tchain ISTIO_REDIRECT")[0] + "}\n").layout()
    assert {rule.text for _, rule in from_json.numbered()} == {""}  # JSON gives expressions, not words
