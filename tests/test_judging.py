"""The notation, the joiner, the measurement and the verdict, offline: recorded kernel runs of
every profile (tests/data/observations, made by tests/record_observations.py) judged again,
and hand-made evidence for the corners."""

import dataclasses
from pathlib import Path

import pytest

from lab import compare, dualstack, join, path, result
from lab.addr import Address
from lab.measure import Reached, measure
from lab.netfilter import RuleRef
from lab.observe import Observation
from lab.proxylogs import ProxyLine
from lab.join import Rules
from lab.rules import profiles
from lab.scenario import load_all
from lab.trace import TraceEvent

from .record_observations import load

ARTICLE = Path(__file__).resolve().parents[2] / "shared" / "article" / "istio-sidecar-traffic-types.txt"
SCENARIOS = {s.id: s for s in load_all()}
RECORDED = {name: load(name) for name in profiles.names(native_nftables=None)}
RUNS = [(name, sid) for name, runs in RECORDED.items() for sid in sorted(runs)]


def scenario_of(sid: str):
    base = SCENARIOS[sid.removesuffix(dualstack.SUFFIX)]
    return dualstack.over_ipv6(base) if sid.endswith(dualstack.SUFFIX) else base


def recorded(profile: str, sid: str) -> Observation:
    return Observation.from_json(RECORDED[profile][sid])


def test_every_profile_was_recorded_with_every_scenario_it_runs():
    assert set(RECORDED) == set(profiles.names(native_nftables=None))
    assert all(len(runs) >= 9 for runs in RECORDED.values())
    assert {sid for sid in RECORDED["istio-1.25-dns"] if sid.startswith("dns-")} == {
        "dns-udp", "dns-udp-forwarded", "dns-tcp", "dns-tcp-forwarded"}
    assert sum(sid.endswith("@ipv6") for sid in RECORDED["istio-1.25-ipv6"]) == 9


@pytest.mark.parametrize("profile, sid", RUNS, ids=[f"{p}:{s}" for p, s in RUNS])
def test_recorded_runs_join_into_the_expected_path(profile, sid):
    s = scenario_of(sid)
    r = result.conclude(s, profile, recorded(profile, sid))
    assert r.failure is None
    assert r.measured_path == str(s.expected.path(profile))
    assert r.measurement.counters_agree, r.measurement.disagreements
    assert r.passed


def test_recorded_legs_follow_the_proxies_logs():
    r = result.conclude(SCENARIOS["type4-local-to-local"], "istio-1.13", recorded("istio-1.13", "type4-local-to-local"))
    legs = r.measurement.legs
    assert [leg.proxy for leg in legs] == [15001, 15006, None]
    assert legs[2].client.ip == "127.0.0.6" and legs[2].server == Address("10.244.0.10", 8080)
    assert r.rule_hits == ["OUTPUT#1", "ISTIO_OUTPUT#9", "ISTIO_REDIRECT#1", "OUTPUT#1", "ISTIO_OUTPUT#2",
                           "ISTIO_IN_REDIRECT#1", "OUTPUT#1", "ISTIO_OUTPUT#1"]
    assert r.measurement.reached == Reached("sidecar", Address("10.244.0.10", 8080))
    assert r.view.reached_text == "sidecar 10.244.0.10:8080"


def test_a_hop_names_the_packet_and_the_rule_it_was_seen_on():
    r = result.conclude(SCENARIOS["type2-local-to-remote"], "istio-1.13", recorded("istio-1.13", "type2-local-to-remote"))
    rule9 = next(h for h in r.measurement.path.hops if h.rule == RuleRef("nat", "ISTIO_OUTPUT", 9))
    assert rule9.packet.proto == "tcp" and rule9.packet.dst == Address("10.96.0.90", 9080)
    assert str(rule9.packet).startswith("SYN 10.244.0.10:")
    assert rule9.line == "-A ISTIO_OUTPUT -j ISTIO_REDIRECT"
    entry = r.measurement.path.hops[1]
    assert (entry.name, entry.entry, entry.line) == ("OUTPUT", RuleRef("nat", "OUTPUT", 1), "-A OUTPUT -p tcp -j ISTIO_OUTPUT")
    assert entry.owner == (1000, 1000)


def test_the_kernel_names_the_sender_of_each_leg():
    """TRACE reports the socket's uid/gid on locally sent SYNs: who really sent each leg."""
    def owners(profile, sid):
        r = result.conclude(SCENARIOS[sid], profile, recorded(profile, sid))
        return [h.owner for h in r.measurement.path.hops if h.owner]

    assert owners("istio-1.13", "type2-local-to-remote") == [(1000, 1000), (1337, 1337)]  # the app, then Envoy
    assert owners("istio-1.13", "type6-sidecar-to-istiod") == [(1337, 1337)]  # the real pilot-agent's re-dial
    assert owners("istio-1.25-tproxy", "type6-sidecar-to-istiod") == [(0, 1337)]  # TPROXY's istio-proxy


def test_a_missing_proxy_log_leaves_the_proxy_unnamed_and_fails():
    seen = dataclasses.replace(recorded("istio-1.13", "type2-local-to-remote"), proxy_lines=[])
    r = result.conclude(SCENARIOS["type2-local-to-remote"], "istio-1.13", seen)
    assert "Envoy 15001" not in r.measured_path
    assert not r.passed


def test_counters_that_disagree_with_trace_fail_the_verdict():
    seen = recorded("istio-1.13", "type2-local-to-remote")
    seen.counters_after[RuleRef("nat", "ISTIO_OUTPUT", 9)] += 1
    r = result.conclude(SCENARIOS["type2-local-to-remote"], "istio-1.13", seen)
    assert r.measurement.disagreements == [RuleRef("nat", "ISTIO_OUTPUT", 9)]
    assert not r.passed
    assert "rule counters {'ISTIO_OUTPUT#9': 2} differ from TRACE rule events {'ISTIO_OUTPUT#9': 1}" in r.view.problems


@pytest.mark.parametrize("ref, moved, seen, agree", [
    (RuleRef("nat", "ISTIO_OUTPUT", 9), 2, 1, False),  # nat judges the first packet only: equal, or a witness lies
    (RuleRef("raw", "ISTIO_OUTPUT_DNS", 5), 1, 1, True),
    (RuleRef("mangle", "ISTIO_DIVERT", 1), 5, 3, True),  # mangle sees every packet; a last ACK may come after the read
    (RuleRef("mangle", "ISTIO_INBOUND", 8), 0, 1, False),  # but never fewer than TRACE saw
])
def test_counters_must_equal_trace_in_nat_and_raw_and_cover_it_in_mangle(ref, moved, seen, agree):
    base = measure(SCENARIOS["type1-remote-to-local"].traffic, recorded("istio-1.13", "type1-remote-to-local"))
    m = dataclasses.replace(base, counters={ref: moved} if moved else {}, trace_counts={ref: seen})
    assert m.counters_agree is agree


def test_a_flow_delivered_nowhere_fails_with_its_last_leg_named():
    seen = recorded("istio-1.13", "type2-local-to-remote")
    seen.events = {pod: [e for e in events if e.chain != "INPUT"] for pod, events in seen.events.items()}
    r = result.conclude(SCENARIOS["type2-local-to-remote"], "istio-1.13", seen)
    assert r.failure.startswith("the last leg 10.244.0.10:") and r.failure.endswith("never reached INPUT in any pod")
    assert r.measured_path == "" and r.agreement == "-"


def test_a_flow_that_was_not_measured_says_why_and_compares_nothing():
    r = result.conclude(SCENARIOS["type2-local-to-remote"], "istio-1.13", None, "connect to x: refused")
    assert (r.failure, r.measured_path, r.agreement, r.article.matches) == ("connect to x: refused", "", "-", False)


# --- joining legs -----------------------------------------------------------------------

def line(listener, peer, dst, up_local=None, up_peer=None):
    return ProxyLine(listener, Address.parse(peer), Address.parse(dst) if dst else None,
                     Address.parse(up_local) if up_local else None, Address.parse(up_peer) if up_peer else None)


def test_legs_follow_each_proxy_and_stop_on_a_loop():
    log = [line(15001, "10.244.0.10:20000", "10.96.0.80:8080", "10.244.0.10:40000", "10.244.0.10:8080"),
           line(15006, "10.244.0.10:40000", "10.244.0.10:8080", "127.0.0.6:40001", "10.244.0.10:8080")]
    legs = join.legs(Address.parse("10.244.0.10:20000"), Address.parse("10.96.0.80:8080"), log)
    assert [(str(l.client), l.proxy) for l in legs] == [("10.244.0.10:20000", 15001), ("10.244.0.10:40000", 15006),
                                                         ("127.0.0.6:40001", None)]
    looped = [line(15001, "a.b.c.d:1", "e.f.g.h:2", "a.b.c.d:1", "e.f.g.h:2")]
    assert len(join.legs(Address.parse("a.b.c.d:1"), Address.parse("e.f.g.h:2"), looped)) == 1


def test_a_proxys_upstream_port_equal_to_the_clients_still_joins_both_legs():
    """connect(2) may give Envoy's upstream socket the client's own port (a different 4-tuple):
    the soak's one type-4 flake.  A line is matched by its peer and its original destination."""
    client, vip, pod = "10.244.0.10:33000", "10.96.0.80:8080", "10.244.0.10:8080"
    log = [line(15006, client, pod, "127.0.0.6:41000", pod),  # the inbound leg, logged first
           line(15001, client, vip, client, pod)]  # Envoy's upstream reused port 33000
    legs = join.legs(Address.parse(client), Address.parse(vip), log)
    assert [l.proxy for l in legs] == [15001, 15006, None]


def _event(table, chain, rulenum, kind="rule", src="10.244.0.10", sport=40000):
    return TraceEvent("sidecar", table, chain, kind, rulenum, None, None, src, "10.244.0.10", "tcp", sport, 8080,
                      "S", None, None, None, "")


def test_a_leg_back_in_through_lo_shows_its_second_pass():
    """A SYN sent over lo meets mangle again on the way in: those hops follow POSTROUTING ->
    PREROUTING; a built-in chain's jump is no hop, its MARK is."""
    lines = {RuleRef("mangle", "OUTPUT", n): f"-A OUTPUT -j RETURN" for n in range(1, 5)}
    lines |= {RuleRef("mangle", "OUTPUT", 3): "-A OUTPUT ! -d 127.0.0.1/32 -o lo -p tcp -m owner --gid-owner 1337 "
                                               "-j MARK --set-xmark 0x53a/0xffffffff",
              RuleRef("mangle", "PREROUTING", 1): "-A PREROUTING -p tcp -j ISTIO_INBOUND",
              RuleRef("mangle", "ISTIO_TPROXY", 1): "-A ISTIO_TPROXY -j TPROXY",
              RuleRef("nat", "OUTPUT", 1): "-A OUTPUT -j ISTIO_OUTPUT"}
    lines |= {RuleRef("mangle", "ISTIO_INBOUND", n): "-A ISTIO_INBOUND -j RETURN" for n in range(1, 9)}
    lines |= {RuleRef("nat", "ISTIO_OUTPUT", n): "-A ISTIO_OUTPUT -j RETURN" for n in range(1, 10)}
    events = [_event("raw", "OUTPUT", 1), _event("mangle", "OUTPUT", 3), _event("mangle", "OUTPUT", 5, "policy"),
              _event("nat", "OUTPUT", 1), _event("nat", "ISTIO_OUTPUT", 3), _event("nat", "POSTROUTING", 1, "policy"),
              _event("mangle", "PREROUTING", 1), _event("mangle", "ISTIO_INBOUND", 8),
              _event("mangle", "ISTIO_TPROXY", 1)]
    leg = join.Leg(Address("10.244.0.10", 40000), Address("10.244.0.10", 8080), 15006)
    hops = join.leg_hops(events, leg, join.Rules(lines))
    assert " -> ".join(map(str, hops)) == (
        "OUTPUT -> OUTPUT RULE 3 (mangle) -> ISTIO_OUTPUT RULE 3 -> POSTROUTING -> PREROUTING"
        " -> ISTIO_INBOUND RULE 8 (mangle) -> ISTIO_TPROXY (mangle) -> Envoy 15006 (Inbound)")


# --- the notation and comparisons --------------------------------------------------------

def test_article_paths_read_back_with_their_typography_normalised():
    claim = path.parse("Prometheus-> RREROUTING -> ISTIO_INBOUND (traffic destined for ports 15002, 15090 "
                       "will go to INPUT) -> INPUT -> Local Pod")
    assert [str(h) for h in claim.hops] == ["Prometheus", "PREROUTING", "ISTIO_INBOUND", "INPUT", "Local Pod"]
    assert path.notes("Prometheus-> RREROUTING -> INPUT -> X") == ["the article writes RREROUTING, read as PREROUTING"]
    six = path.parse("pilot-agent\u00a0 process -> OUTPUT -> Istio_OUTPUT RULE 9 -> Envoy 15001 (Outbound Handler) -> Istiod")
    assert [str(h) for h in six.hops] == ["pilot-agent process", "OUTPUT", "ISTIO_OUTPUT RULE 9", "Envoy 15001 (Outbound)", "Istiod"]


def test_unreadable_hop_is_an_error():
    with pytest.raises(ValueError, match="cannot read hop"):
        path.parse("A -> OUTPUT -> ??? -> B")


def test_differences_hop_by_hop():
    article = path.parse("pilot-agent process -> OUTPUT -> ISTIO_OUTPUT RULE 9 -> Envoy 15001 (Outbound) -> "
                         "OUTPUT -> ISTIO_OUTPUT RULE 4 -> POSTROUTING -> Istiod")
    kernel = path.parse("pilot-agent process -> OUTPUT -> ISTIO_OUTPUT RULE 4 -> POSTROUTING -> Istiod")
    assert compare.differences(article, kernel) == [
        "after hop 2: the article has ISTIO_OUTPUT RULE 9 -> Envoy 15001 (Outbound) -> OUTPUT; "
        "the kernel never passes them",
    ]
    assert compare.differences(kernel, article) == [
        "hops 3-5: the kernel passes ISTIO_OUTPUT RULE 9 -> Envoy 15001 (Outbound) -> OUTPUT, "
        "which the article leaves out",
    ]
    assert compare.differences(kernel, kernel) == []
    replaced = path.parse("X -> OUTPUT -> ISTIO_OUTPUT RULE 8 -> POSTROUTING -> X")
    measured = path.parse("X -> OUTPUT -> ISTIO_OUTPUT RULE 4 -> POSTROUTING -> X")
    assert compare.differences(replaced, measured) == [
        "hop 3: the article has ISTIO_OUTPUT RULE 8, the kernel ISTIO_OUTPUT RULE 4"]


def test_an_unnumbered_article_hop_matches_any_rule():
    assert compare.differences(path.parse("A -> PREROUTING -> ISTIO_INBOUND -> INPUT -> B"),
                               path.parse("A -> PREROUTING -> ISTIO_INBOUND RULE 2 -> INPUT -> B")) == []


def test_hops_of_other_tables_and_builtin_rules_read_back():
    text = ("Remote Pod -> PREROUTING -> ISTIO_INBOUND RULE 8 (mangle) -> ISTIO_TPROXY (mangle) -> Envoy 15006 (Inbound)"
            " -> OUTPUT -> OUTPUT RULE 1 (mangle) -> ISTIO_OUTPUT RULE 3 -> POSTROUTING -> PREROUTING"
            " -> ISTIO_INBOUND RULE 1 (mangle) -> INPUT -> Local Pod")
    hops = path.parse(text).hops
    assert str(path.parse(text)) == text
    assert [(h.kind, h.table) for h in hops if h.name == "ISTIO_INBOUND"] == [("chain", "mangle")] * 2
    assert hops[6].rule == RuleRef("mangle", "OUTPUT", 1)
    # the same chain name in nat is another hop
    assert compare.differences(path.parse("A -> ISTIO_INBOUND RULE 1 -> B"),
                               path.parse("A -> ISTIO_INBOUND RULE 1 (mangle) -> B")) != []


def test_rule_references_read_back():
    for ref in (RuleRef("nat", "ISTIO_OUTPUT", 9), RuleRef("mangle", "ISTIO_INBOUND", 8), RuleRef("raw", "A:B", 1)):
        assert RuleRef.parse(str(ref)) == ref
    assert str(RuleRef("nat", "ISTIO_OUTPUT", 9)) == "ISTIO_OUTPUT#9"
    assert [str(r) for r in sorted([RuleRef("nat", "X", 10), RuleRef("nat", "X", 9)])] == ["X#9", "X#10"]


def test_a_flow_of_your_own_makes_no_claim_the_article_could_agree_with():
    r = result.conclude(dataclasses.replace(SCENARIOS["type2-local-to-remote"], article=None, article_note=""),
                        "istio-1.13", recorded("istio-1.13", "type2-local-to-remote"))
    assert (r.agreement, r.article.matches, r.as_json()["matches_article"]) == ("no claim", None, None)


@pytest.mark.parametrize("s", SCENARIOS.values(), ids=SCENARIOS)
def test_article_words_are_quoted_verbatim(s):
    if not ARTICLE.exists():
        pytest.skip(f"the article is not beside this checkout ({ARTICLE})")
    if s.article is None:
        return
    article = ARTICLE.read_text()
    assert s.article.sentence in article
    if s.article.path_text:
        assert s.article.path_text in article.splitlines()


# --- every ending, from hand-made TRACE events -------------------------------------------------

def _ev(pod, table, chain, rulenum, kind="rule", src="10.244.0.10", sport=40000, dst="10.244.0.20", dport=9080,
        flags="S", outdev=None):
    return TraceEvent(pod, table, chain, kind, rulenum, None, outdev, src, dst, "tcp", sport, dport, flags, None, None,
                      None, "")


CLIENT, SERVER = Address("10.244.0.10", 40000), Address("10.244.0.20", 9080)
ISTIO = {RuleRef("nat", "OUTPUT", 1): "-A OUTPUT -p tcp -j ISTIO_OUTPUT",
         **{RuleRef("nat", "ISTIO_OUTPUT", n): "-A ISTIO_OUTPUT -j RETURN" for n in range(1, 10)}}


def _path(events, rules, error, node_rules=None, routes=None, leg=None):
    leg = leg or join.Leg(CLIENT, SERVER)
    died = join.death(events, leg, {"sidecar": rules, "node": node_rules or join.Rules({})}, error, routes)
    return str(join.path("Local Pod", "Remote Pod", [leg], [e for e in events if e.pod == "sidecar"], rules,
                         died=died)), died


def test_a_drop_rule_in_any_table_is_a_hop_then_the_verdict():
    lines = ISTIO | {RuleRef("filter", "OUTPUT", 1): "-A OUTPUT -p tcp -m tcp --dport 9080 -j DROP"}
    events = [_ev("sidecar", "raw", "OUTPUT", 2, "policy"), _ev("sidecar", "nat", "OUTPUT", 1),
              _ev("sidecar", "nat", "ISTIO_OUTPUT", 4), _ev("sidecar", "filter", "OUTPUT", 1)]
    text, died = _path(events, join.Rules(lines), "ETIMEDOUT: connect timed out")
    assert died.kind == "DROP" and text == "Local Pod -> OUTPUT -> ISTIO_OUTPUT RULE 4 -> OUTPUT (filter) -> DROP"
    # the same SYN sent again after a second: one packet, one path
    again, _ = _path(events + events, join.Rules(lines), "ETIMEDOUT: connect timed out")
    assert again == text


def test_a_policy_that_drops_is_named_as_one():
    rules = join.Rules(ISTIO | {RuleRef("filter", "OUTPUT", 1): "-A OUTPUT -o lo -j ACCEPT"},
                       policies={("filter", "OUTPUT"): "DROP"})
    events = [_ev("sidecar", "nat", "OUTPUT", 1), _ev("sidecar", "nat", "ISTIO_OUTPUT", 4),
              _ev("sidecar", "filter", "OUTPUT", 2, "policy")]
    text, _ = _path(events, rules, "ETIMEDOUT: connect timed out")
    assert text == "Local Pod -> OUTPUT -> ISTIO_OUTPUT RULE 4 -> OUTPUT POLICY (filter) -> DROP"
    assert path.parse(text).hops[-2].name == "OUTPUT POLICY" and path.parse(text).ending == "died"


def test_the_node_with_no_route_is_where_the_flow_died():
    to = Address("10.96.0.99", 80)
    events = [_ev("sidecar", "nat", "OUTPUT", 1, dst=to.ip, dport=80), _ev("sidecar", "nat", "ISTIO_OUTPUT", 4, dst=to.ip, dport=80),
              _ev("sidecar", "nat", "POSTROUTING", 1, "policy", dst=to.ip, dport=80),
              _ev("node", "raw", "PREROUTING", 1, dst=to.ip, dport=80),
              _ev("node", "nat", "KUBE-SERVICES", 5, "return", dst=to.ip, dport=80)]
    routes = join.Routes(["10.244.0.0/24", "10.96.0.10/32"])
    text, died = _path(events, join.Rules(ISTIO), "EHOSTUNREACH: No route to host", routes=routes,
                       leg=join.Leg(CLIENT, to))
    assert died.kind == "unreachable" and text.endswith("-> POSTROUTING -> node: no route to 10.96.0.99, unreachable")
    # a node that forwarded it did not kill it: nothing explains the failure, so no path
    forwarded = events + [_ev("node", "filter", "FORWARD", 1, "policy", dst=to.ip, dport=80)]
    assert join.death(forwarded, join.Leg(CLIENT, to), {"sidecar": join.Rules(ISTIO)}, "ETIMEDOUT", routes) is None


def test_a_syn_delivered_with_nothing_answering_it_met_no_listener():
    """TPROXY's original_src dial from an address the pod does not own: the kernel's reset cannot
    reach the dialer, which times out; no SYN-ACK ever left, so no socket took it."""
    delivered = [_ev("remote", "filter", "INPUT", 1, "policy")]
    _, died = _path(delivered, join.Rules(ISTIO), "timeout")
    assert died.kind == "refused" and died.text() == "Remote Pod 9080: no listener, refused"
    answered = delivered + [_ev("remote", "filter", "OUTPUT", 1, "policy", src=SERVER.ip, sport=SERVER.port,
                                dst=CLIENT.ip, dport=CLIENT.port, flags="SA")]
    assert join.death(answered, join.Leg(CLIENT, SERVER), {"sidecar": join.Rules(ISTIO)}, "timeout") is None


def test_a_proxy_that_closes_and_one_listener_for_both_sides():
    closed = ProxyLine(15006, CLIENT, Address("10.244.0.10", 15006), None, None, "blackhole: connection addressed to "
                       "the proxy port itself", role="Inbound")
    legs = join.legs(CLIENT, Address("10.244.0.10", 15006), [closed])
    assert legs[0].closed == "blackhole, closed"
    events = [_ev("sidecar", "nat", "OUTPUT", 1, dst="10.244.0.10", dport=15006)]
    hops = join.leg_hops(events, legs[0], join.Rules(ISTIO))
    assert [str(h) for h in hops][-2:] == ["Envoy 15006 (Inbound)", "blackhole, closed"]
    inbound = ProxyLine(15001, CLIENT, Address("10.244.0.10", 8080), Address("127.0.0.6", 41000),
                        Address("10.244.0.10", 8080), role="Inbound")
    legs = join.legs(CLIENT, Address("10.244.0.10", 8080), [inbound])
    hops = join.leg_hops([_ev("sidecar", "nat", "OUTPUT", 1, dst="10.244.0.10", dport=8080)], legs[0], join.Rules(ISTIO))
    assert str(hops[-1]) == "Envoy 15001 (Inbound)"


def test_every_ending_reads_back_from_its_text():
    for text in ("Local Pod -> OUTPUT -> ISTIO_OUTPUT RULE 1 -> DROP",
                 "Local Pod -> OUTPUT -> OUTPUT POLICY (filter) -> DROP",
                 "Local Pod -> OUTPUT -> ISTIO_OUTPUT RULE 4 -> OUTPUT (filter) -> REJECT",
                 "Local Pod -> OUTPUT -> ISTIO_OUTPUT RULE 4 -> POSTROUTING -> node: no route to 10.96.0.99, unreachable",
                 "Local Pod -> OUTPUT -> ISTIO_OUTPUT RULE 2 -> ISTIO_IN_REDIRECT -> Envoy 15006 (Inbound) -> blackhole, closed",
                 "Remote Pod -> PREROUTING -> Local Pod: INPUT RULE 1 (filter) -> REJECT",
                 "Remote Pod -> PREROUTING -> ISTIO_TPROXY (mangle) -> 15006: no transparent listener, dropped",
                 "Remote Pod -> PREROUTING -> ISTIO_INBOUND -> ISTIO_IN_REDIRECT -> Envoy 15001 (Inbound) -> OUTPUT -> "
                 "ISTIO_OUTPUT RULE 1 -> ISTIO_REDIRECT -> Envoy 15001 (loop)"):
        assert str(path.parse(text)) == text
    assert path.parse("A -> OUTPUT -> Envoy 15001 (Outbound) -> blackhole, closed").ending == "closed"


@pytest.mark.parametrize("line, port", [
    ("-A ISTIO_TPROXY ! -d 127.0.0.1/32 -p tcp -j TPROXY --on-port 15006 --on-ip 0.0.0.0 --tproxy-mark 0x539/0xffffffff", 15006),
    ("meta l4proto tcp tproxy ip to :15006 meta mark set 0x539 accept", 15006),
    ("meta l4proto tcp tproxy to 127.0.0.1:15006 accept", 15006),
    ("meta l4proto tcp counter accept", 0),
])
def test_a_tproxy_rule_names_its_port_in_either_syntax(line, port) -> None:
    """A flow TPROXY sent nowhere dies at the rule's port, whether iptables or nft wrote it
    (nft's text once went to the iptables parser: ValueError)."""
    ref = RuleRef("mangle", "ISTIO_TPROXY", 1)
    assert Rules({ref: line}).tproxy_port(ref) == port
