"""The joiner and the article's notation, offline: recorded kernel runs judged again."""

import json
from pathlib import Path

import pytest

from lab import path, runner, scenario
from lab.trace import TraceEvent

from .record_observations import OUT, from_json

ARTICLE = Path(__file__).resolve().parents[2] / "shared" / "article" / "istio-sidecar-traffic-types.txt"
RECORDED = json.load(open(OUT))
SCENARIOS = {s.id: s for s in scenario.load_all()}


@pytest.mark.parametrize("sid", sorted(RECORDED))
def test_recorded_runs_join_into_the_expected_path(sid):
    result = runner.judge(SCENARIOS[sid], from_json(RECORDED[sid]))
    assert result.failure is None
    assert result.measured_path == SCENARIOS[sid].expected_path
    assert result.counters_agree
    assert result.verdict == "pass"


def test_recorded_legs_follow_the_access_log():
    vip = runner.judge(SCENARIOS["type4-local-to-local"], from_json(RECORDED["type4-local-to-local"]))
    assert [leg.proxy for leg in vip.legs] == [15001, 15006, None]
    assert vip.legs[2].client.startswith("127.0.0.6:")
    assert vip.legs[2].server == "10.244.0.10:8080"
    assert vip.rule_hits == ["OUTPUT#1", "ISTIO_OUTPUT#9", "ISTIO_REDIRECT#1",
                             "OUTPUT#1", "ISTIO_OUTPUT#2", "ISTIO_IN_REDIRECT#1",
                             "OUTPUT#1", "ISTIO_OUTPUT#1"]
    assert vip.endpoint == "sidecar 10.244.0.10:8080"


def test_a_hop_names_the_packet_it_was_seen_on():
    result = runner.judge(SCENARIOS["type2-local-to-remote"], from_json(RECORDED["type2-local-to-remote"]))
    rule9 = next(h for h in result.measured.hops if h.name == "ISTIO_OUTPUT" and h.rule == 9)
    assert rule9.packet.startswith("SYN 10.244.0.10:") and rule9.packet.endswith("> 10.96.0.90:9080")
    assert rule9.line == "-A ISTIO_OUTPUT -j ISTIO_REDIRECT"


def test_a_missing_access_log_line_leaves_the_proxy_unnamed():
    seen = from_json(RECORDED["type2-local-to-remote"])
    seen.access_log = []
    result = runner.judge(SCENARIOS["type2-local-to-remote"], seen)
    assert "Envoy 15001" not in result.measured_path
    assert result.verdict == "fail"


def test_counters_that_disagree_with_trace_fail_the_verdict():
    seen = from_json(RECORDED["type2-local-to-remote"])
    seen.counters_after["ISTIO_OUTPUT#9"] += 1
    result = runner.judge(SCENARIOS["type2-local-to-remote"], seen)
    assert not result.counters_agree
    assert result.verdict == "fail"


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
    assert path.differences(article, kernel) == [
        "after hop 2: the article has ISTIO_OUTPUT RULE 9 -> Envoy 15001 (Outbound) -> OUTPUT; "
        "the kernel never passes them",
    ]
    assert path.differences(kernel, article) == [
        "hops 3-5: the kernel passes ISTIO_OUTPUT RULE 9 -> Envoy 15001 (Outbound) -> OUTPUT, "
        "which the article leaves out",
    ]
    assert path.differences(kernel, kernel) == []
    replaced = path.parse("X -> OUTPUT -> ISTIO_OUTPUT RULE 8 -> POSTROUTING -> X")
    measured = path.parse("X -> OUTPUT -> ISTIO_OUTPUT RULE 4 -> POSTROUTING -> X")
    assert path.differences(replaced, measured) == ["hop 3: the article has ISTIO_OUTPUT RULE 8, the kernel ISTIO_OUTPUT RULE 4"]


def test_an_unnumbered_article_hop_matches_any_rule():
    assert path.differences(path.parse("A -> PREROUTING -> ISTIO_INBOUND -> INPUT -> B"),
                            path.parse("A -> PREROUTING -> ISTIO_INBOUND RULE 2 -> INPUT -> B")) == []


def test_chain_legs_stops_on_a_loop_in_the_log():
    log = [{"downstream_peer": "a:1", "original_dst": "b:2", "listener": 15001, "upstream_local": "a:1", "upstream_peer": "b:2"}]
    assert path.chain_legs("a:1", "b:2", log) == [path.Leg("a:1", "b:2", 15001)]


def test_hops_of_other_tables_and_builtin_rules_read_back():
    text = ("Remote Pod -> PREROUTING -> ISTIO_INBOUND RULE 8 (mangle) -> ISTIO_TPROXY (mangle) -> Envoy 15006 (Inbound)"
            " -> OUTPUT -> OUTPUT RULE 1 (mangle) -> ISTIO_OUTPUT RULE 3 -> POSTROUTING -> PREROUTING"
            " -> ISTIO_INBOUND RULE 1 (mangle) -> INPUT -> Local Pod")
    hops = path.parse(text).hops
    assert str(path.parse(text)) == text
    assert [(h.kind, h.table) for h in hops if h.name == "ISTIO_INBOUND"] == [("chain", "mangle")] * 2
    assert (hops[6].kind, hops[6].name, hops[6].rule) == ("chain", "OUTPUT", 1)
    # the same chain name in nat is another hop
    assert path.differences(path.parse("A -> ISTIO_INBOUND RULE 1 -> B"),
                            path.parse("A -> ISTIO_INBOUND RULE 1 (mangle) -> B")) != []


def _event(table, chain, rulenum, kind="rule", src="10.244.0.10", sport=40000):
    return TraceEvent("sidecar", table, chain, kind, rulenum, None, None, src, "10.244.0.10", "tcp", sport, 8080,
                      "S", None, None, None, "")


@pytest.mark.parametrize("table_ref, moved, seen, agree", [
    ("ISTIO_OUTPUT#9", 2, 1, False),  # nat judges the first packet only: equal, or a witness lies
    ("raw:ISTIO_OUTPUT_DNS#5", 1, 1, True),
    ("mangle:ISTIO_DIVERT#1", 5, 3, True),  # mangle sees every packet; a last ACK may come after the read
    ("mangle:ISTIO_INBOUND#8", 0, 1, False),  # but never fewer than TRACE saw
])
def test_counters_must_equal_trace_in_nat_and_raw_and_cover_it_in_mangle(table_ref, moved, seen, agree):
    result = runner.Result(SCENARIOS["type1-remote-to-local"],
                           counter_deltas={table_ref: moved} if moved else {}, trace_rule_events={table_ref: seen})
    assert result.counters_agree is agree


def test_a_leg_back_in_through_lo_shows_its_second_pass():
    """A SYN sent over lo meets mangle again on the way in: those hops follow POSTROUTING -> PREROUTING;
    a built-in chain's jump is no hop, its MARK is."""
    lines = {"mangle:OUTPUT#3": "-A OUTPUT ! -d 127.0.0.1/32 -o lo -p tcp -m owner --gid-owner 1337 -j MARK --set-xmark 0x53a/0xffffffff",
             "mangle:PREROUTING#1": "-A PREROUTING -p tcp -j ISTIO_INBOUND",
             "OUTPUT#1": "-A OUTPUT -j ISTIO_OUTPUT"}
    counts = {"mangle:OUTPUT": 4, "mangle:PREROUTING": 2, "mangle:ISTIO_INBOUND": 8, "mangle:ISTIO_TPROXY": 1,
              "OUTPUT": 1, "ISTIO_OUTPUT": 9}
    events = [_event("raw", "OUTPUT", 1), _event("mangle", "OUTPUT", 3), _event("mangle", "OUTPUT", 5, "policy"),
              _event("nat", "OUTPUT", 1), _event("nat", "ISTIO_OUTPUT", 3), _event("nat", "POSTROUTING", 1, "policy"),
              _event("mangle", "PREROUTING", 1), _event("mangle", "ISTIO_INBOUND", 8),
              _event("mangle", "ISTIO_TPROXY", 1)]
    hops = path.leg_hops(events, path.Leg("10.244.0.10:40000", "10.244.0.10:8080", 15006), counts, lines)
    assert " -> ".join(map(str, hops)) == (
        "OUTPUT -> OUTPUT RULE 3 (mangle) -> ISTIO_OUTPUT RULE 3 -> POSTROUTING -> PREROUTING"
        " -> ISTIO_INBOUND RULE 8 (mangle) -> ISTIO_TPROXY (mangle) -> Envoy 15006 (Inbound)")


@pytest.mark.parametrize("s", SCENARIOS.values(), ids=SCENARIOS)
def test_article_words_are_quoted_verbatim(s):
    if not ARTICLE.exists():
        pytest.skip(f"the article is not beside this checkout ({ARTICLE})")
    article = ARTICLE.read_text()
    assert s.article_claim in article
    if s.article_path:
        assert s.article_path in article.splitlines()
