"""TPROXY inbound mode on the real kernel: policy routing, a transparent Envoy, the client's address kept."""

import json
import socket

import pytest

from lab import api, backend, html_report, netns, plan, scenario, world
from lab.addr import Address
from lab.rules import features, nftset, profiles, routing, ruleset

from .test_sidecar import proc_status

TPROXY = "istio-1.25-tproxy"
SCENARIOS = [s for s in scenario.load_all() if s.group != "problems"]  # the problems run in labs of their own (test_problems.py)
NET_ADMIN = 1 << netns.CAPABILITIES["NET_ADMIN"]


def test_the_mark_and_mode_come_from_the_rules():
    assert features.tproxy_mark(profiles.load(TPROXY)) == 1337
    assert features.tproxy_mark(profiles.load(profiles.DEFAULT)) is None
    assert features.inbound_mode(profiles.dumps(TPROXY)) == "TPROXY"
    assert features.inbound_mode(profiles.dumps(profiles.DEFAULT)) == "REDIRECT"
    assert (ruleset.profile(TPROXY).inbound_mode, ruleset.profile().inbound_mode) == ("TPROXY", "REDIRECT")


@pytest.mark.parametrize("statement,mark", [
    ("meta mark set 0x539", 1337), ("meta mark set 1337 accept", 1337), ("", None),
    ("meta mark set ct mark", None), ("meta mark set mark or 0x1", None),  # no number: no route to set up for it
])
def test_the_mark_a_native_tproxy_rule_sets(statement, mark):
    rules = nftset.parse("table inet m {\n chain p {\n  type filter hook prerouting priority -150;\n"
                         f"  meta l4proto tcp tproxy ip to :15006 {statement}\n }}\n}}\n")
    assert features.nft_tproxy_mark(rules) == mark


def test_every_scenario_has_a_measured_tproxy_path():
    assert [s.id for s in SCENARIOS if TPROXY not in dict(s.expected.by_profile)] == []


@pytest.fixture(scope="module")
def tproxy_lab():
    with api.Session(ruleset.profile(TPROXY)) as session:
        results = {r.scenario.id: r for r in session.run_all(SCENARIOS)}
        yield session.lab, results, session.backend.name


@pytest.mark.kernel
@pytest.mark.parametrize("s", SCENARIOS, ids=[s.id for s in SCENARIOS])
def test_scenario_under_tproxy(tproxy_lab, s):
    r = tproxy_lab[1][s.id]
    assert r.failure is None
    assert r.measured_path == str(s.expected.path(TPROXY))
    assert r.measurement.counters_agree, (r.measurement.counters, r.measurement.trace_counts)
    assert r.passed


def _policy_routing(ns: str) -> tuple[list, list]:
    with world.ipr(ns) as ipr:
        rules = [(r.get_attr("FRA_FWMARK"), r.get_attr("FRA_TABLE")) for r in ipr.get_rules(family=socket.AF_INET)
                 if r.get_attr("FRA_FWMARK")]
        routes = [(r["type"], r["dst_len"], r.get_attr("RTA_OIF")) for r in ipr.route("dump", table=routing.ROUTE_TABLE)]
    return rules, routes


@pytest.mark.kernel
def test_the_fwmark_rule_and_local_route_are_in_the_sidecar_pod_only(tproxy_lab):
    lab, *_ = tproxy_lab
    rtn_local = 2
    assert _policy_routing(lab.pod("sidecar").ns) == ([(1337, 133)], [(rtn_local, 0, 1)])
    assert _policy_routing(lab.pod("remote").ns) == ([], [])


@pytest.mark.kernel
@pytest.mark.parametrize("name", ["envoy", "pilot-agent"])
def test_the_sidecar_runs_as_uid_0_gid_1337_with_net_admin_only(tproxy_lab, name):
    """Istio's injection template for TPROXY: runAsUser 0, runAsGroup 1337, capabilities drop ALL, add NET_ADMIN."""
    status = proc_status(tproxy_lab[0].record.pids[name])
    assert status["Uid"].split() == ["0"] * 4 and status["Gid"].split() == ["1337"] * 4
    assert status["Groups"].split() == []
    for caps in ("CapEff", "CapPrm", "CapBnd"):
        assert int(status[caps], 16) == NET_ADMIN, caps
    assert int(status["CapInh"], 16) == 0


@pytest.mark.kernel
def test_the_app_sees_the_clients_own_address(tproxy_lab):
    """original_src: Envoy's inbound side dials the app from the remote pod's address (REDIRECT
    mode dials from 127.0.0.6), and the reply finds its way back by the mark and table 133."""
    _, results, _ = tproxy_lab
    body = json.loads(results["type1-remote-to-local"].measurement.response.body)
    assert body["peer"].split(":")[0] == plan.PODS["remote"]
    inbound = results["type1-remote-to-local"].measurement.legs[-1]
    assert inbound.client.ip == plan.PODS["remote"] and inbound.server == Address(plan.PODS["sidecar"], 8080)


@pytest.mark.kernel
def test_envoy_reaches_its_own_app_through_the_1338_mark_and_tproxy(tproxy_lab):
    """Type 4: uid 0 is not the -u 1337 the nat rules exempt, so rule 3 returns Envoy's dial to
    the pod IP; mangle OUTPUT marks it 1338 (gid 1337), and back in, ISTIO_INBOUND lets that
    mark through to TPROXY and Envoy's inbound listener."""
    path = tproxy_lab[1]["type4-local-to-local"].measured_path
    assert ("Envoy 15001 (Outbound) -> OUTPUT -> OUTPUT RULE 3 (mangle) -> ISTIO_OUTPUT RULE 3 -> POSTROUTING"
            " -> PREROUTING -> ISTIO_INBOUND RULE 8 (mangle) -> ISTIO_TPROXY (mangle) -> Envoy 15006 (Inbound)") in path


@pytest.mark.kernel
def test_the_report_names_the_sidecars_uid_as_the_lab_runs_it(tproxy_lab):
    r = tproxy_lab[1]["type5-envoy-localhost"]
    assert r.measurement.sidecar.uid == 0
    assert html_report._box_label("sidecar", html_report.PROXY, r.view) == "Envoy (uid 0)"
    assert html_report._box_label("sidecar", "pilot-agent", r.view) == "pilot-agent (uid 0)"  # the scenario's source
    owners = [h.owner for h in r.measurement.path.hops if h.owner]  # what legacy TRACE reported; nftrace has none
    assert owners == ([(0, 1337)] if tproxy_lab[2] == backend.LEGACY else [])
