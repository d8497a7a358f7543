"""The six traffic types on the real kernel: measured path == expected, witnesses agree."""

import pytest

import json
import os
import signal

from lab import api, backend, compare, scenario
from lab.netfilter import RuleRef
from lab.observe import trace_plan
from lab.rules import ruleset

pytestmark = pytest.mark.kernel
SCENARIOS = [s for s in scenario.load_all() if s.group != "problems"]  # the problems run in labs of their own (test_problems.py)
# What the kernel showed, scenario by scenario, against the article's claim.
AGREES_WITH_ARTICLE = {
    "type1-remote-to-local": True,
    "type2-local-to-remote": True,
    "type3-prometheus-to-local": False,  # replies never enter nat OUTPUT; rule 2, not "15002"
    "type4-local-to-local": True,
    "type4-own-pod-ip": False,  # rule 3: a pod calling its own IP is not intercepted
    "type5-envoy-localhost": False,  # rule 4, not rule 8
    "type5-app-localhost": False,
    "type6-sidecar-to-istiod": False,  # uid 1337 returns at rule 4, never reaches Envoy
    "type6-app-to-istiod": False,  # the article's shape, plus the ISTIO_REDIRECT hop it leaves out
    # DNS: the article makes no claim.  Named under the default rules they run, uncaptured.
    "dns-udp": None,
    "dns-udp-forwarded": None,
    "dns-tcp": None,
    "dns-tcp-forwarded": None,
}


@pytest.fixture(scope="module")
def session():
    with api.Session(ruleset.profile()) as session:
        yield session


@pytest.fixture(scope="module")
def results(session):
    return {r.scenario.id: r for r in session.run_all(SCENARIOS)}


@pytest.mark.parametrize("s", SCENARIOS, ids=[s.id for s in SCENARIOS])
def test_scenario(results, s):
    r = results[s.id]
    assert r.failure is None
    assert r.measured_path == str(s.expected.default)
    assert r.measurement.counters_agree, r.measurement.disagreements
    assert r.measurement.reached, "the last leg's SYN never reached INPUT"
    assert r.article.matches is AGREES_WITH_ARTICLE[s.id], r.article.differences
    assert r.passed


def test_every_scenario_has_an_agreement_entry():
    assert set(AGREES_WITH_ARTICLE) == {s.id for s in SCENARIOS}


def test_expectations_that_differ_from_the_article_are_not_copies_of_it():
    for s in SCENARIOS:
        if s.article and s.article.path and not AGREES_WITH_ARTICLE[s.id]:
            assert compare.differences(s.article.path, s.expected.default)


def test_istio_output_rule_8_never_matches(results):
    """Rules 3 and 4 return everything on lo first: the article's type 5 rule is unreachable."""
    assert all(r.counter(RuleRef("nat", "ISTIO_OUTPUT", 8)) == 0 for r in results.values())


def test_nat_judges_only_the_syn(results):
    """Type 3's replies: TRACE sees them in other tables, never in nat."""
    r = results["type3-prometheus-to-local"]
    sidecar = [e for e in r.measurement.events if e.pod == "sidecar"]
    replies = [e for e in sidecar if e.sport == 15090]
    assert any(e.tcp_flags == "SA" for e in replies), "the SYN-ACK was traced"
    assert replies and not [e for e in replies if e.table == "nat"]
    assert not [e for e in sidecar if e.table == "nat" and e.tcp_flags != "S"]


def test_the_kernel_names_the_sender_of_each_leg(session, results):
    """Legacy TRACE reports the socket's uid/gid on locally sent SYNs: who really sent each
    leg.  nftrace carries no uid: under nf_tables no hop claims an owner."""
    owners = [h.owner for h in results["type2-local-to-remote"].measurement.path.hops if h.owner]
    agent = [h.owner for h in results["type6-sidecar-to-istiod"].measurement.path.hops if h.owner]
    if session.backend.name == backend.LEGACY:
        assert owners == [(1000, 1000), (1337, 1337)]  # the app, then Envoy
        assert agent == [(1337, 1337)]  # the real pilot-agent's re-dial
    else:
        assert owners == agent == []


def test_the_app_sees_envoys_inbound_passthrough_source(results):
    body = json.loads(results["type1-remote-to-local"].measurement.response.body)
    assert body["peer"].startswith("127.0.0.6:")
    own_ip = json.loads(results["type4-own-pod-ip"].measurement.response.body)
    assert own_ip["peer"].startswith("10.244.0.10:"), "no proxy between the app and itself"


def test_two_labs_tracing_at_once_see_only_their_own_events():
    chosen = scenario.select(SCENARIOS, ["type2-local-to-remote"])[0]
    with api.Session(ruleset.profile()) as a, api.Session(ruleset.profile()) as b:
        with b.witnesses.tracing(trace_plan(chosen.traffic), 4):  # b traces the same pods and ports, but sends nothing
            ra = a.run(chosen)
            quiet = b.witnesses.events()
    assert ra.passed
    assert all(events == [] for events in quiet.values())


def test_a_dead_envoy_is_a_clear_failure_not_a_hang():
    with api.Session(ruleset.profile()) as session:
        os.kill(session.lab.record.pids["envoy"], signal.SIGKILL)
        [r] = session.run_all(scenario.select(SCENARIOS, ["type2-local-to-remote"]))
    assert not r.passed
    assert r.failure.startswith("envoy ")
