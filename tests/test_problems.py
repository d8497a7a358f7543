"""The problems people hit: the node's Service DNAT, paths that die or loop, pods that run
otherwise (an init container's time, an app on localhost, another proxy user, a VM), the
scenario files that show each problem, and a pod's annotations as input."""

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest

from lab import api, backend, dualstack, path, plan, podspec, result, runner, scenario
from lab.addr import Address
from lab.observe import Observation
from lab.errors import LabError
from lab.rules import annotations, kubeproxy, profiles, ruleset, xtables

from .record_observations import PROBLEMS as RECORDED_PROBLEMS, load
from .test_report_html import SVG, parse_page

REPO = Path(__file__).resolve().parents[1]
EVERY = scenario.load_all()
PROBLEMS = [s for s in EVERY if s.group == "problems"]
ARTICLE = [s for s in EVERY if s.group in ("types", "variants")]
BY_ID = {s.id: s for s in EVERY}


def _cli(*args: str, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lab.cli", *args], capture_output=True, text=True, cwd=REPO,
                          timeout=300, **kwargs)


# --- the notation: deaths, loops, the node ---------------------------------------------------

@pytest.mark.parametrize("text, ending, last", [
    ("Local Pod -> OUTPUT -> ISTIO_OUTPUT RULE 9 -> ISTIO_REDIRECT -> 15001: no listener, refused", "died",
     ("end", "15001: no listener, refused")),
    ("Remote Pod -> PREROUTING -> ISTIO_INBOUND RULE 5 -> ISTIO_IN_REDIRECT -> Envoy 15006 (Inbound) -> OUTPUT"
     " -> ISTIO_OUTPUT RULE 1 -> POSTROUTING -> Local Pod 8080: no listener, refused", "died",
     ("end", "Local Pod 8080: no listener, refused")),
    ("Local Pod -> OUTPUT -> ISTIO_OUTPUT RULE 2 -> ISTIO_IN_REDIRECT -> Envoy 15006 (loop)", "loop",
     ("proxy", "Envoy 15006 (loop)")),
    ("Local Pod -> OUTPUT -> ISTIO_OUTPUT RULE 4 -> POSTROUTING -> KUBE-SEP-REMOTE RULE 2 (node) -> Remote Pod",
     "reached", ("endpoint", "Remote Pod")),
])
def test_deaths_loops_and_the_nodes_rules_read_back_as_written(text, ending, last):
    p = path.parse(text)
    assert str(p) == text and p.ending == ending
    assert (p.hops[-1].kind, p.hops[-1].name) == last


def test_a_node_hop_says_where_it_is_and_compares_by_it():
    p = path.parse("Local Pod -> OUTPUT -> ISTIO_OUTPUT RULE 4 -> POSTROUTING -> KUBE-SEP-REMOTE RULE 2 (node) -> Remote Pod")
    node = p.hops[-2]
    assert (node.name, node.number, node.table, node.where) == ("KUBE-SEP-REMOTE", 2, "nat", plan.NODE)
    assert p.short() == "ISTIO_OUTPUT 4 › KUBE-SEP-REMOTE 2 (node)"
    sidecar = path.parse("A -> KUBE-SEP-REMOTE RULE 2 -> B").hops[1]
    assert sidecar.where == "" and str(sidecar) == "KUBE-SEP-REMOTE RULE 2"
    from lab import compare
    assert not compare.same(sidecar, node)


def test_a_loop_and_a_death_are_short_too():
    loop = path.parse("Local Pod -> OUTPUT -> ISTIO_OUTPUT RULE 2 -> ISTIO_IN_REDIRECT -> Envoy 15006 (loop)")
    assert loop.short() == "ISTIO_OUTPUT 2 › 15006 (loop)"
    died = path.parse("init container -> OUTPUT -> ISTIO_OUTPUT RULE 9 -> ISTIO_REDIRECT -> 15001: no listener, refused")
    assert died.short() == "ISTIO_OUTPUT 9 › 15001: no listener, refused"


# --- kube-proxy's rules, as data --------------------------------------------------------------

def test_every_service_but_a_held_vip_is_dnatted_to_its_endpoint():
    text = kubeproxy.dump(4).text()
    for s in plan.SERVICES:
        rule = f"-A KUBE-SERVICES -d {s.vip}/32 -p tcp -m tcp --dport {s.port} -j {kubeproxy.svc_chain(s)}"
        assert (rule in text) is (s.vip not in plan.HELD_VIPS["kube-dns"]), s.name
    assert "-A KUBE-SEP-REMOTE -p tcp -m tcp -j DNAT --to-destination 10.244.0.20:9080" in text
    assert "-A KUBE-SEP-REMOTE -p udp -m udp -j DNAT --to-destination 10.244.0.20:9080" in text  # TCP and UDP
    assert "-A KUBE-SEP-APP -s 10.244.0.10/32 -j KUBE-MARK-MASQ" in text  # hairpin: a pod calling its own Service


def test_the_ipv6_dnat_is_the_ipv4_one_with_the_twins():
    four, six = kubeproxy.dump(4).text(), kubeproxy.dump(6).text()
    for s in kubeproxy.dnatted():
        four = four.replace(f"{s.vip}/32", f"{s.vip6}/128")
    for pod in plan.PODS:
        four = four.replace(f"{plan.PODS[pod]}/32", f"{plan.PODS6[pod]}/128")
        four = four.replace(f"{plan.PODS[pod]}:", f"[{plan.PODS6[pod]}]:")
    assert four == six


# --- scenario files ---------------------------------------------------------------------------

def test_every_problem_names_its_upstream_issue_and_explains_itself():
    assert len(PROBLEMS) >= 12
    for s in PROBLEMS:
        assert s.issues and all(scenario.ISSUE_RE.match(i) for i in s.issues), s.id
        assert s.article is None and s.article_note, s.id
        assert len(s.explanation.split()) > 60, s.id


def test_the_groups_are_the_articles_types_their_variants_dns_and_the_problems():
    groups = {s.group for s in EVERY}
    assert groups == {"types", "variants", "dns", "problems"}
    assert {s.id for s in EVERY if s.group == "types"} == {
        "type1-remote-to-local", "type2-local-to-remote", "type3-prometheus-to-local", "type4-local-to-local",
        "type5-envoy-localhost", "type6-sidecar-to-istiod"}
    assert len(ARTICLE) == 9


def test_the_problems_ask_for_the_pods_they_need():
    assert BY_ID["problem-init-container-before-envoy"].pod.stage == podspec.INIT
    assert BY_ID["problem-app-on-localhost"].pod == podspec.PodSpec(envoy_inbound=podspec.AS_RELEASED, app_localhost=True)
    assert BY_ID["problem-tproxy-envoy-as-1337"].pod.proxy == plan.Identity(1337, 1337, ("NET_ADMIN",))
    assert BY_ID["problem-kubevirt-vm"].pod.vm and BY_ID["problem-kubevirt-vm"].traffic.source.pod == plan.VM
    assert BY_ID["problem-excluded-outbound-port"].annotations.values == {annotations.EXCLUDE_OUTBOUND_PORTS: "9080"}


def test_as_released_is_each_eras_envoy():
    spec = podspec.PodSpec(envoy_inbound=podspec.AS_RELEASED)
    assert spec.resolved((1, 7)).envoy_inbound == podspec.LOCALHOST
    assert spec.resolved((1, 10)).envoy_inbound == podspec.ORIGINAL_DST
    assert spec.resolved(None).envoy_inbound == podspec.ORIGINAL_DST  # a dump: today's Envoy


GOOD = {"id": "x", "title": "x", "group": "problems", "issue": "istio/istio#1",
        "article": {"note": "none"},
        "traffic": {"from": {"pod": "sidecar", "label": "Local Pod", "uid": 1000, "gid": 1000},
                    "to": {"pod": "remote", "port": 9080, "label": "Remote Pod"}},
        "expected": {"path": "Local Pod -> OUTPUT -> Remote Pod"}, "explanation": "x"}


@pytest.mark.parametrize("change, problem", [
    ({"issue": "#4286"}, "issue: '#4286' is not an upstream issue"),
    ({"group": "bugs"}, "group: 'bugs' is not one of"),
    ({"profile": "istio-9"}, "profile: unknown profile 'istio-9'"),
    ({"pod": {"stage": "paused"}}, "pod.stage: 'paused' is not one of running, init"),
    ({"pod": {"envoy_inbound": "magic"}}, "pod.envoy_inbound: 'magic' is not one of"),
    ({"pod": {"proxy": {"uid": 1337, "gid": 1337, "capabilities": ["SYS_ADMIN"]}}}, "may keep NET_ADMIN only"),
    ({"pod": {"annotations": {"traffic.sidecar.istio.io/excludeOutboundPort": "9080"}}}, "not an annotation Istio reads"),
    ({"pod": {"annotations": {"traffic.sidecar.istio.io/excludeOutboundPorts": 9080}}}, "is not a string"),
    ({"pod": {"colour": "red"}}, "pod.colour: unknown field"),
    ({"expected": {"path": "A -> B", "not_measured": {"istio-1.4": ""}}}, "say why"),
])
def test_a_bad_problem_field_is_one_line_naming_it(change, problem):
    data = {**GOOD, **change}
    with pytest.raises(scenario.ScenarioError, match="^x.yaml: .*" + problem.replace("(", r"\(").replace(")", r"\)")) as e:
        scenario.parse(data, "x.yaml")
    assert "\n" not in str(e.value)


def test_only_a_pod_with_a_vm_sends_from_it():
    data = {**GOOD, "traffic": {**GOOD["traffic"], "from": {"pod": "vm", "label": "VM", "uid": 0, "gid": 0}}}
    with pytest.raises(scenario.ScenarioError, match="only a scenario whose pod has a VM"):
        scenario.parse(data, "x.yaml")
    assert scenario.parse({**data, "pod": {"vm": True}}, "x.yaml").traffic.source.pod == plan.VM


# --- which lab each scenario runs in ----------------------------------------------------------

def test_one_lab_per_rule_set_and_pod():
    labs, skipped = runner.plan(PROBLEMS, runner.Choice())
    keys = [(lab.rules.key(), lab.spec) for lab in labs]  # rules written by both backends are rules of their own
    assert len(keys) == len(set(keys)) and not skipped
    for lab in labs:
        for s in lab.scenarios:
            assert s.pod.resolved(lab.rules.istio) == lab.spec
            assert lab.rules_of[s.id].profile == (s.profile or profiles.DEFAULT)  # their measured paths apply


def test_a_scenario_whose_pod_cannot_be_built_is_left_out_or_refused_when_named():
    loop = [BY_ID["problem-tproxy-envoy-as-1337"]]
    labs, skipped = runner.plan(loop, runner.Choice(profile="istio-1.13"))
    assert labs == [] and skipped == ["problem-tproxy-envoy-as-1337: left out: TPROXY is modelled for Istio 1.25 "
                                      "and later, not 1.13"]
    with pytest.raises(LabError, match="TPROXY is modelled for Istio 1.25"):
        runner.plan(loop, runner.Choice(profile="istio-1.13"), named=True)


def test_a_scenario_with_no_path_under_a_profile_is_left_out_with_why():
    """(No scenario needs expected.not_measured since every ending is measured: the kubevirt VM
    under TPROXY, once left out, has its path.  The mechanism stays, for what a lab cannot build.)"""
    s = BY_ID["problem-kubevirt-vm"]
    unmeasured = dataclasses.replace(s, expected=dataclasses.replace(
        s.expected, not_measured=(("istio-1.25-tproxy", "In TPROXY mode, say why"),)))
    labs, skipped = runner.plan([unmeasured], runner.Choice(profile="istio-1.25-tproxy"))
    assert labs == [] and skipped[0] == "problem-kubevirt-vm: left out under istio-1.25-tproxy: In TPROXY mode, say why"


def test_a_pods_own_dump_cannot_take_a_scenarios_annotations(tmp_path):
    dump = ruleset.from_file(_write(tmp_path, profiles.text(profiles.DEFAULT)))
    labs, skipped = runner.plan([BY_ID["problem-excluded-outbound-port"]], runner.Choice(dump=dump))
    assert labs == [] and "need a profile's options, and --rules gives a dump" in skipped[0]


def _write(tmp_path, text: str, name: str = "pod.rules") -> str:
    (tmp_path / name).write_text(text)
    return str(tmp_path / name)


def test_a_pods_annotations_on_a_profile_build_its_rules(tmp_path):
    pod = annotations.read(_write(tmp_path, 'traffic.sidecar.istio.io/excludeOutboundPorts="5432"\n', "pod.txt"))
    rules = ruleset.from_annotations(pod, "istio-1.25")
    assert rules.command.endswith("-d 15090,15021,15020 -o 5432")
    assert rules.profile is None  # these rules were never measured: no expectation
    assert rules.dumps[0].tables["nat"].chain_rules("ISTIO_OUTPUT")[0].spec == "-p tcp -m tcp --dport 5432 -j RETURN"
    same = annotations.read(_write(tmp_path, 'traffic.sidecar.istio.io/includeInboundPorts="*"\n', "same.txt"))
    assert ruleset.from_annotations(same, "istio-1.25").profile == "istio-1.25"  # no rule changed: its paths apply


def test_the_files_annotations_under_a_scenarios_own(tmp_path):
    pod = annotations.read(_write(tmp_path, 'traffic.sidecar.istio.io/excludeOutboundPorts="5432"\n', "pod.txt"))
    s = BY_ID["problem-excluded-outbound-port"]
    merged = runner.rules_for(s, runner.Choice(annotations=pod))
    assert merged.command.endswith("-o 9080")  # the scenario's own value wins
    assert merged.profile == profiles.DEFAULT  # and the rules are the scenario's: its paths apply
    other = annotations.read(_write(tmp_path, 'traffic.sidecar.istio.io/excludeOutboundIPRanges="10.0.0.0/8"\n', "o.txt"))
    assert runner.rules_for(s, runner.Choice(annotations=other)).profile is None


# --- recorded runs, judged again without root -------------------------------------------------

RECORDED = load(RECORDED_PROBLEMS)


@pytest.mark.parametrize("sid", sorted(RECORDED))
def test_a_recorded_problem_joins_into_its_measured_path(sid):
    s, run = BY_ID[sid], RECORDED[sid]
    r = result.conclude(s, run["profile"], Observation.from_json(run["observation"]))
    assert r.passed, (r.failure, r.view.problems)
    assert r.measured_path == str(s.expected.path(run["profile"]))


def _recorded(sid: str):
    run = RECORDED[sid]
    return result.conclude(BY_ID[sid], run["profile"], Observation.from_json(run["observation"])).measurement


def test_a_refused_flow_ends_where_its_syn_met_no_listener():
    init = _recorded("problem-init-container-before-envoy")
    assert init.ending == "died" and init.error.startswith("ECONNREFUSED: ")
    assert [leg.proxy for leg in init.legs] == [None] and init.reached.address == Address("127.0.0.1", 15001)
    local = _recorded("problem-app-on-localhost")  # the client saw its connection closed; Envoy's dial was refused
    assert local.ending == "died" and local.legs[-1].error.endswith("failed: Connection refused")
    assert local.legs[-1].client.ip == "127.0.0.6"  # Envoy's upstream, logged from its SYN on


def test_a_loop_ends_at_the_listener_it_came_back_to():
    loop = _recorded("problem-tproxy-envoy-as-1337")
    assert loop.ending == "loop" and [leg.proxy for leg in loop.legs] == [15001, 15006, 15006]
    assert [leg.loop for leg in loop.legs] == [False, False, True]
    assert loop.legs[2].client == Address(loop.legs[1].client.ip, loop.legs[2].client.port)  # original_src: the same IP


def test_the_nodes_dnat_is_read_from_the_nodes_own_events():
    m = _recorded("problem-excluded-outbound-port")
    node = [e for e in m.events if e.pod == plan.NODE and e.kind == "rule" and e.table == "nat"]
    assert {str(e.rule) for e in node} >= {"PREROUTING#1", "KUBE-SERVICES#2", "KUBE-SVC-REMOTE#1", "KUBE-SEP-REMOTE#2"}
    assert [h.where for h in m.path.hops].count(plan.NODE) == 1
    assert m.path.hops[-1].packet.dst == Address("10.244.0.20", 9080)  # what the endpoint got: the DNATed SYN


# --- on the kernel ----------------------------------------------------------------------------

@pytest.mark.kernel
@pytest.mark.parametrize("name", profiles.names(native_nftables=None))
def test_every_problem_takes_its_measured_path_under_every_profile(name):
    labs, skipped = runner.plan(PROBLEMS, runner.Choice(profile=name))
    results, _ = runner.run(labs, PROBLEMS, backend.choose(backend.AUTO, any(lab.rules.native for lab in labs))[0])
    for r in results:
        assert r.passed, f"{r.scenario.id} under {name}: {r.failure or r.view.problems} ({r.measured_path})"
    ran = {r.scenario.id.removesuffix(dualstack.SUFFIX) for r in results}
    assert ran | {line.split(":")[0] for line in skipped} == {s.id for s in PROBLEMS}


@pytest.mark.kernel
@pytest.mark.parametrize("name", profiles.names())
def test_the_article_scenarios_keep_their_paths_with_the_nodes_dnat(name):
    rules = ruleset.profile(name)
    with api.Session(rules) as session:
        node = {r.line for r in session.backend.listing(session.lab.node, "nat")}
        assert "-A KUBE-SERVICES -d 10.96.0.90/32 -p tcp -m tcp --dport 9080 -j KUBE-SVC-REMOTE" in node
        results = session.run_all(ARTICLE)
    for r in results:
        assert r.passed, f"{r.scenario.id} under {name}: {r.failure or r.view.problems}"
        assert not [h for h in r.measurement.path.hops if h.where], "Envoy resolves the VIPs it takes: no node hop"


@pytest.mark.kernel
def test_a_vip_works_for_traffic_envoy_does_not_capture_over_both_families():
    with api.Session(ruleset.profile("istio-1.25-ipv6")) as session:
        for vip in ("10.96.0.90", "fd00:10:96::90"):
            r = session.request("sidecar", vip, 9080, uid=1337)
            assert r.passed and r.view.reached.port == 9080 and r.view.reached_pod == "remote", r.failure
            assert str(r.measurement.path.hops[-2]) == "KUBE-SEP-REMOTE RULE 2 (node)"
            assert r.measurement.path.hops[-1].packet.dst == Address(plan.PODS["remote"] if "." in vip
                                                                      else plan.PODS6["remote"], 9080)
            udp = session.request("sidecar", vip, 9080, uid=1000, protocol="udp")
            assert udp.passed and json.loads(udp.measurement.response.body)["pod"] == "remote"
            assert str(udp.measurement.path.hops[-2]) == "KUBE-SEP-REMOTE RULE 3 (node)"


@pytest.mark.kernel
def test_a_pod_calling_its_own_service_unproxied_is_hairpinned_and_captured_as_inbound():
    """uid 1337 to its own pod's Service: not redirected on the way out, DNATed and masqueraded
    by the node, and back in through eth0 it is inbound traffic like any other: Envoy's 15006."""
    with api.Session(ruleset.profile()) as session:
        r = session.request("sidecar", "10.96.0.80", 8080, uid=1337)
    assert r.passed, r.failure
    assert r.measured_path == (
        "Local Pod -> OUTPUT -> ISTIO_OUTPUT RULE 4 -> POSTROUTING -> KUBE-SEP-APP RULE 2 (node) -> "
        "KUBE-POSTROUTING RULE 3 (node) -> PREROUTING -> ISTIO_INBOUND RULE 5 -> ISTIO_IN_REDIRECT -> "
        "Envoy 15006 (Inbound) -> OUTPUT -> ISTIO_OUTPUT RULE 1 -> POSTROUTING -> Local Pod")
    assert r.measurement.legs[1].client.ip == plan.GATEWAY  # the masquerade: the node's address, the port kept
    assert json.loads(r.measurement.response.body)["peer"].startswith("127.0.0.6:")  # Envoy's inbound passthrough


@pytest.mark.kernel
def test_the_lab_without_envoy_refuses_at_15001_and_says_so():
    with api.Session(ruleset.profile(), spec=podspec.PodSpec(stage=podspec.INIT)) as session:
        assert set(session.lab.record.pids) == {"app-remote", "istiod", "kube-dns"}
        r = session.request("sidecar", "10.96.0.90", 9080, uid=1000)
    assert r.passed and r.measurement.ending == "died" and r.measurement.error.startswith("ECONNREFUSED")
    assert r.measured_path.endswith("ISTIO_REDIRECT -> 15001: no listener, refused")
    assert r.view.reached_text == "15001: no listener, refused"


@pytest.mark.kernel
def test_a_flow_that_dies_unexplained_still_fails_with_the_clients_words():
    with api.Session(ruleset.profile()) as session:
        r = session.request("sidecar", "10.244.0.20", 9999, uid=1337)  # nothing listens; not redirected
    assert r.measurement.ending == "died" and r.passed  # refused at the remote pod: a place, so a path
    assert r.measured_path.endswith("POSTROUTING -> Remote Pod 9999: no listener, refused")


@pytest.mark.kernel
def test_run_group_problems_draws_each_problems_path(tmp_path):
    done = _cli("run", "--group", "problems", "--report", str(tmp_path))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr
    page = parse_page((tmp_path / "index.html").read_text())
    sections = {s.get("id"): s for s in page.iter("section")}
    for s in PROBLEMS:
        assert s.id in sections, s.id
        assert list(sections[s.id].iter(f"{SVG}svg")), f"{s.id}: no diagram"
    assert "istio/istio#23369" in (tmp_path / "summary.md").read_text()
    assert "Envoy 15006 (loop)" in done.stdout and "15001: no listener, refused" in done.stdout


@pytest.mark.kernel
def test_annotations_end_to_end(tmp_path):
    manifest = tmp_path / "deploy.yaml"
    manifest.write_text("apiVersion: apps/v1\nkind: Deployment\nmetadata:\n  name: db-client\n"
                        "  annotations:\n    traffic.sidecar.istio.io/excludeOutboundPorts: \"9080\"\n"
                        "spec:\n  template:\n    metadata:\n      annotations:\n"
                        "        traffic.sidecar.istio.io/excludeOutboundIPRanges: \"10.96.0.0/16\"\n")
    done = _cli("run", "type2-local-to-remote", "--annotations", str(manifest), "--json")
    assert done.returncode == 0, done.stderr
    [v] = json.loads(done.stdout)["scenarios"]
    assert v["measured_path"] == ("Local Pod -> OUTPUT -> ISTIO_OUTPUT RULE 9 -> POSTROUTING -> "
                                  "KUBE-SEP-REMOTE RULE 2 (node) -> Remote Pod")
    text = _cli("run", "type2-local-to-remote", "--annotations", str(manifest))
    assert "istio-iptables -p 15001 -z 15006 -u 1337 -m REDIRECT -i '*' -x 10.96.0.0/16" in text.stdout
    assert "note: traffic.sidecar.istio.io/excludeOutboundPorts: ignored: it is on the Deployment's own metadata" \
           in text.stdout


@pytest.mark.parametrize("content, problem", [
    ('traffic.sidecar.istio.io/excludeOutboundPorts="http"\n', "is not a port (0-65535)"),
    ('traffic.sidecar.istio.io/excludeOutboundPort="80"\n', "not an annotation Istio reads"),
    ("sidecar.istio.io/interceptionMode=TPROXY\n", "TPROXY is modelled for Istio 1.25 and later, not 1.13"),
])
def test_bad_annotations_are_one_line_and_exit_2(tmp_path, content, problem):
    file = tmp_path / "pod.txt"
    file.write_text(content)
    for command in (["explain", "type2-local-to-remote"], ["run", "type2-local-to-remote"], ["up"]):
        done = _cli(*command, "--annotations", str(file))
        assert done.returncode == 2 and problem in done.stderr and done.stderr.count("\n") == 1, (command, done.stderr)
        assert done.stdout == ""
