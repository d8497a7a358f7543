"""DNS capture for real: the wire format, the scenarios' schema, and the kernel's paths.

Offline: the DNS messages kube-dns, pilot-agent and the client exchange; how a DNS scenario
is written and picked; how raw-table and agent hops read back.  On the kernel: each DNS
scenario under istio-1.25-dns (path, raw zone counters, who answered), the same queries
under the default rules (no capture), and what the conntrack zones are for.
"""

import asyncio
import json
import struct
import subprocess

import pytest
import yaml

from lab import api, commands, compare, dns, dualstack, html_report, join, path, plan, proxylogs, report, scenario
from lab import backend, traffic, view
from lab.addr import Address
from lab.netfilter import RuleRef
from lab.observe import trace_plan
from lab.proxylogs import ProxyLine
from lab.result import Result
from lab.rules import features, profiles, ruleset, save, xtables
from lab.sidecar import dnsproxy
from lab.trace import TraceEvent
from lab.world import Lab

from .test_report_html import assert_diagram_draws, parse_page

DNS = "istio-1.25-dns"
SCENARIOS = [s for s in scenario.load_all() if s.group != "problems"]  # the problems run in labs of their own (test_problems.py)
DNS_SCENARIOS = [s for s in SCENARIOS if s.traffic.protocol == "dns"]
SERVICE = "remote.default.svc.cluster.local"
POD_NAME = "10-244-0-20.default.pod.cluster.local"


# --- the wire -----------------------------------------------------------------------------

def test_a_query_reads_back():
    q = dns.parse(dns.query("Remote.Default.svc.cluster.local.", id=4660))
    assert (q.id, q.name, q.qtype, q.response) == (4660, SERVICE, dns.TYPE_A, False)


def test_a_known_name_gets_its_a_record():
    answer = dns.parse(dns.answer(dns.query(SERVICE, id=7), dns.Resolver(dns.service_names()), ttl=30))
    assert (answer.id, answer.response, answer.rcode_name, answer.addresses) == (7, True, "NOERROR", ("10.96.0.90",))


def test_an_unknown_name_is_nxdomain_and_another_type_gets_no_records():
    resolve = dns.Resolver(dns.service_names())
    assert dns.parse(dns.answer(dns.query("nowhere.example", id=1), resolve, 30)).rcode_name == "NXDOMAIN"
    aaaa = dns.parse(dns.answer(dns.query(SERVICE, id=2, qtype=28), resolve, 30))
    assert (aaaa.rcode_name, aaaa.addresses) == ("NOERROR", ())


def test_a_message_that_cannot_be_read_gets_formerr_with_its_id():
    reply = dns.answer(b"\x12\x34\x00", dns.Resolver({}), 30)
    assert struct.unpack_from("!H", reply)[0] == 0x1234
    assert dns.describe(reply) == {"name": None, "rcode": "FORMERR", "answers": []}
    with pytest.raises(dns.DnsFormatError):
        dns.parse(b"\x00" * 5)


def test_compressed_names_are_followed():
    # the answer's name is a pointer to the question's (0xc00c), as every server writes it
    answer = dns.answer(dns.query(SERVICE, id=3), dns.Resolver(dns.service_names()), 30)
    assert b"\xc0\x0c" in answer and dns.parse(answer).addresses == ("10.96.0.90",)


def test_tcp_messages_carry_their_length():
    message = dns.query(SERVICE, id=9)
    assert dns.unframe(dns.frame(message) + b"more") == message
    with pytest.raises(dns.DnsFormatError):
        dns.unframe(dns.frame(message)[:-1])


def test_kube_dns_knows_services_and_pod_names_the_agent_does_not():
    cluster, mesh = dns.cluster_resolver(), dns.Resolver(dns.service_names())
    assert cluster("kube-dns.kube-system.svc.cluster.local") == mesh("kube-dns.kube-system.svc.cluster.local") \
        == plan.RESOLVER
    assert cluster(POD_NAME) == "10.244.0.20" and mesh(POD_NAME) is None
    assert cluster("10-244-0-999.default.pod.cluster.local") is None


def test_the_agent_answers_a_name_in_its_table_itself_and_logs_it(tmp_path):
    log = tmp_path / "dns.jsonl"
    log.touch()
    proxy = dnsproxy.DnsProxy(dnsproxy.Config(str(log), dns.service_names()))
    request = dns.Request(dns.query(SERVICE, id=5), "udp", ("10.244.0.10", 40000), ("127.0.0.1", 15053))
    reply = asyncio.run(proxy.handle(request))
    assert dns.parse(reply).addresses == ("10.96.0.90",)
    [line] = [json.loads(x) for x in log.read_text().splitlines()]
    assert line["answered_by"] == "name table" and line["upstream_local"] is None
    assert line["original_dst"] is None  # UDP has no SO_ORIGINAL_DST
    assert join.legs(Address("10.244.0.10", 40000), Address("10.96.0.10", 53), [ProxyLine.from_json(line)]) == \
        [join.Leg(Address("10.244.0.10", 40000), Address("10.96.0.10", 53), 15053)]


# --- the notation -------------------------------------------------------------------------

def _written(s: scenario.Scenario, profile: str) -> str:
    """The path the scenario's file gives for the profile, as written there."""
    with open(s.file) as f:
        expected = yaml.safe_load(f)["expected"]
    return expected.get("profiles", {}).get(profile, expected["path"])


def test_raw_hops_and_the_agent_read_back_as_written():
    for s in DNS_SCENARIOS:
        text = _written(s, DNS)
        assert str(path.parse(text)) == text
        assert str(s.expected.path(DNS)) == text
    hops = path.parse("Local Pod -> OUTPUT -> ISTIO_OUTPUT_DNS RULE 5 (raw) -> ISTIO_OUTPUT_DNS RULE 2"
                      " -> pilot-agent 15053 (DNS)").hops
    assert (hops[2].table, hops[3].table) == ("raw", "nat")
    assert not compare.same(hops[2], path.Hop(path.CHAIN, "ISTIO_OUTPUT_DNS", "nat", 5))  # raw is not nat
    assert hops[-1].kind == "proxy"  # the agent answered: the path ends there
    aside = path.parse("A -> ISTIO_INBOUND (traffic destined for ports 15002, 15090 will go to INPUT) -> B").hops[1]
    assert aside.table == "nat"  # the article's asides are not tables


def test_a_udp_legs_later_datagrams_are_not_hops_again():
    def event(table, chain, rulenum):
        return TraceEvent("sidecar", table, chain, "rule", rulenum, None, "eth0", "10.244.0.10", "10.96.0.10",
                          "udp", 40000, 53, None, 1000, 1000, None, "")

    first = [event("raw", "ISTIO_OUTPUT_DNS", 5), event("nat", "ISTIO_OUTPUT", 8)]
    again = [event("raw", "ISTIO_OUTPUT_DNS", 5)]  # a retry: raw again, nat never
    assert join.first_packet(first + again, join.Leg(Address("10.244.0.10", 40000), Address("10.96.0.10", 53))) == first


def test_explain_shows_a_dns_scenario_under_dns_capture_with_its_raw_rules():
    s = next(s for s in DNS_SCENARIOS if s.id == "dns-udp")
    assert commands._explained_profile(s) == DNS
    text = commands.explain_rules(s.expected.path(DNS), profiles.load(DNS), DNS)
    raw = text[text.index("ISTIO_OUTPUT_DNS (raw table"):]
    assert " >  5  -d 10.96.0.10/32 -p udp -m udp --dport 53 -j CT --zone 2" in raw.split("\n\n")[0]
    assert " >  2  -d 10.96.0.10/32 -p udp -m udp --dport 53 -j REDIRECT --to-ports 15053" in \
        text[text.index("ISTIO_OUTPUT_DNS (nat table"):]


# --- the schema and the choice of scenarios ----------------------------------------------

GOOD = {"id": "q", "title": "q", "feature": "dns-capture", "article": {"note": "no word on DNS"},
        "traffic": {"from": {"pod": "sidecar", "process": "app", "label": "Local Pod", "uid": 1000, "gid": 1000},
                    "to": {"service": "kube-dns", "port": 53, "protocol": "dns", "transport": "udp",
                           "label": "kube-dns"},
                    "query": SERVICE},
        "expected": {"path": "Local Pod -> OUTPUT -> POSTROUTING -> kube-dns"}, "explanation": "x"}


def _with(change):
    data = json.loads(json.dumps(GOOD))
    change(data)
    return data


def test_a_dns_scenario_parses():
    s = scenario.parse(GOOD, "q.yaml")
    flow = s.traffic
    assert (flow.protocol, flow.transport, flow.query, s.feature, s.type) == ("dns", "udp", SERVICE, "dns-capture", None)
    assert s.article is None and s.article_note == "no word on DNS" and trace_plan(flow).ports.udp == (53, 15053)
    assert plan.Port.DNS_PROXY in trace_plan(flow).ports.tcp and flow.endpoint_pod == "kube-dns"


@pytest.mark.parametrize("change, field, problem", [
    (lambda d: d["traffic"]["to"].pop("transport"), "traffic.to.transport", "missing"),
    (lambda d: d["traffic"]["to"].update(transport="sctp"), "traffic.to.transport", "not one of"),
    (lambda d: d["traffic"].pop("query"), "traffic.query", "missing"),
    (lambda d: d["traffic"].update(query="a..b"), "traffic.query", "not a DNS name"),
    (lambda d: d["traffic"]["to"].update(protocol="http"), "traffic.to.transport", "only a DNS scenario"),
    (lambda d: d.update(feature="teleport"), "feature", "not one of"),
    (lambda d: d["article"].update(claim="c"), "article.note", "give it alone"),
    (lambda d: d.update(article={"path": "A -> B"}, type=2), "article.claim", "missing"),
])
def test_a_bad_dns_scenario_names_its_field(change, field, problem):
    with pytest.raises(scenario.ScenarioError) as e:
        scenario.parse(_with(change), "q.yaml")
    assert str(e.value).startswith(f"q.yaml: {field}: ") and problem in str(e.value)


def test_run_picks_dns_scenarios_only_for_rules_that_capture_dns():
    assert features.of(profiles.dumps(DNS)) == {features.DNS_CAPTURE}
    assert all(features.of(profiles.dumps(name)) == set() for name in profiles.names() if name != DNS)
    default = scenario.for_features(SCENARIOS, features.of(profiles.dumps(profiles.DEFAULT)))
    captured = scenario.for_features(SCENARIOS, features.of(profiles.dumps(DNS)))
    assert {s.id for s in captured} - {s.id for s in default} == {s.id for s in DNS_SCENARIOS}
    assert [s.type for s in captured][-len(DNS_SCENARIOS):] == [None] * len(DNS_SCENARIOS)  # after the article's


def test_the_repository_has_answered_and_forwarded_queries_over_both_transports():
    kinds = {(s.traffic.transport, s.traffic.query == SERVICE) for s in DNS_SCENARIOS}
    assert kinds == {("udp", True), ("udp", False), ("tcp", True), ("tcp", False)}
    for s in DNS_SCENARIOS:  # measured with and without capture, and they differ
        assert s.feature == features.DNS_CAPTURE and str(s.expected.path(DNS)) != str(s.expected.default)


def test_a_dns_query_has_no_ipv6_twin():
    assert dualstack.both_families(DNS_SCENARIOS) == DNS_SCENARIOS  # the resolver is IPv4 only


# --- on the kernel ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def captured():
    with api.Session(ruleset.profile(DNS)) as session:
        results = {r.scenario.id: r for r in session.run_all(DNS_SCENARIOS)}
        run_dir = session.lab.run_dir
        yield (results, proxylogs.read(run_dir, proxylogs.DNS_PROXY_LOG), proxylogs.read(run_dir, proxylogs.KUBE_DNS_LOG),
               session.backend.name)


def _raw(r: Result) -> dict[str, int]:
    """The raw table's counters that moved, as "CHAIN#N"."""
    return {f"{ref.chain}#{ref.number}": n for ref, n in r.measurement.counters.items() if ref.table == "raw"}


@pytest.mark.kernel
@pytest.mark.parametrize("s", DNS_SCENARIOS, ids=[s.id for s in DNS_SCENARIOS])
def test_dns_scenario_under_capture(captured, s):
    results, *_ = captured
    r = results[s.id]
    assert r.failure is None, r.failure
    assert r.measured_path == str(s.expected.path(DNS))
    assert r.measurement.counters_agree, (r.measurement.counters, r.measurement.trace_counts)
    assert r.passed and str(r.verdict) == "pass"
    assert json.loads(r.measurement.response.body)["answers"] == [dns.cluster_resolver()(s.traffic.query)]
    assert r.measurement.legs[0].proxy == plan.Port.DNS_PROXY
    assert r.article.matches is None and r.agreement == "no claim"  # the article makes no claim about DNS


@pytest.mark.kernel
def test_the_zone_rules_counted_the_queries_and_the_answers(captured):
    results, *_ = captured
    # the app's query (zone 2), the agent's answer from 15053 (zone 2; its gid twin, a no-op),
    # and that answer looping back over lo past ISTIO_INBOUND (a no-op: it has its conntrack)
    assert _raw(results["dns-udp"]) == {"ISTIO_OUTPUT_DNS#5": 1, "ISTIO_OUTPUT_DNS#2": 1,
                                        "ISTIO_OUTPUT_DNS#4": 1, "ISTIO_INBOUND#1": 1}
    forwarded = _raw(results["dns-udp-forwarded"])
    assert forwarded["ISTIO_OUTPUT_DNS#1"] == 1  # the agent's query upstream: zone 1
    assert forwarded["ISTIO_INBOUND#1"] == 2  # kube-dns's answer (zone 1), and the agent's to the app
    assert _raw(results["dns-tcp"]) == {} and _raw(results["dns-tcp-forwarded"]) == {}  # zones are for UDP
    agent_leg = results["dns-udp-forwarded"].measurement.path.hops[7:10]
    assert [h.line.rsplit(" ", 1)[1] for h in agent_leg] == ["1", "1", "2"]  # zone 1 twice, then zone 2
    sent = results["dns-udp-forwarded"].measurement.path.hops[6].owner  # legacy TRACE names the sender, nftrace no one
    assert sent == ((1337, 1337) if captured[3] == backend.LEGACY else None)


@pytest.mark.kernel
def test_the_agent_answered_or_forwarded_as_it_logged(captured):
    results, agent, kube, _ = captured
    by_client = {line["downstream_peer"]: line for line in agent}
    asked_kube = {line["peer"] for line in kube}
    for sid, r in results.items():
        line = by_client[str(r.measurement.response.local)]
        flow = r.scenario.traffic
        assert line["protocol"] == flow.transport and line["name"] == flow.query
        if flow.query == SERVICE:
            assert line["answered_by"] == "name table" and line["upstream_local"] is None
        else:
            assert line["answered_by"] == "upstream" and line["upstream_peer"] == f"{plan.RESOLVER}:53"
            assert line["upstream_local"] in asked_kube
            assert r.measurement.legs[1].client == Address.parse(line["upstream_local"])
        assert line["original_dst"] == (f"{plan.RESOLVER}:53" if flow.transport == "tcp" else None)
    assert len(kube) == 2  # only the forwarded names reached kube-dns


@pytest.mark.kernel
def test_without_capture_the_same_queries_go_to_kube_dns(captured):
    """The path changes between versions: the default rules (1.13) send UDP DNS past every Istio
    rule and TCP DNS through Envoy; istio-1.25-dns sends both to pilot-agent's 15053."""
    results, *_ = captured
    with api.Session(ruleset.profile()) as session:
        default = {r.scenario.id: r for r in session.run_all(DNS_SCENARIOS)}
        kube = proxylogs.read(session.lab.run_dir, proxylogs.KUBE_DNS_LOG)
        assert proxylogs.read(session.lab.run_dir, proxylogs.DNS_PROXY_LOG) == []  # no capture, no DNS proxy
    for s in DNS_SCENARIOS:
        r = default[s.id]
        assert r.passed and r.measured_path == str(s.expected.default), r.failure or r.measured_path
        assert "pilot-agent" not in r.measured_path and r.measurement.reached.pod == "kube-dns"
        assert r.measured_path != results[s.id].measured_path
    assert default["dns-udp"].measured_path == "Local Pod -> OUTPUT -> POSTROUTING -> kube-dns"
    assert "Envoy 15001 (Outbound)" in default["dns-tcp"].measured_path
    assert len(kube) == len(DNS_SCENARIOS)


@pytest.mark.kernel
def test_the_zones_keep_an_app_query_from_riding_the_agents_flow():
    """istio/istio#33469: an app's UDP query from the source port the agent's upstream query
    just used.  With the zones it is a new flow (zone 2) and is redirected to the agent; with
    the raw rules gone it matches the agent's conntrack entry, the nat table never sees it,
    and it goes straight to kube-dns."""
    rule8 = RuleRef("nat", "ISTIO_OUTPUT", 8)

    def who_answers(lab) -> tuple[str, int]:
        ns = lab.pod("sidecar").ns
        traffic.dns_query(ns, plan.RESOLVER, 53, POD_NAME, transport="udp", uid=plan.APP_UID, gid=plan.APP_GID)
        agent_port = Address.parse(proxylogs.read(lab.run_dir, proxylogs.DNS_PROXY_LOG)[-1]["upstream_local"]).port
        asked = len(proxylogs.read(lab.run_dir, proxylogs.DNS_PROXY_LOG))
        before = xtables.packet_counts(ns, "nat")[rule8]
        traffic.dns_query(ns, plan.RESOLVER, 53, SERVICE, transport="udp", uid=plan.APP_UID, gid=plan.APP_GID,
                          src_port=agent_port)
        captured = xtables.packet_counts(ns, "nat")[rule8] - before
        return ("pilot-agent" if len(proxylogs.read(lab.run_dir, proxylogs.DNS_PROXY_LOG)) > asked else "kube-dns"), captured

    with Lab() as lab:
        api.bring_up(lab, ruleset.profile(DNS), backend.BACKENDS[backend.LEGACY])
        with_zones = who_answers(lab)
        xtables.apply(lab.pod("sidecar").ns, save.parse("*raw\nCOMMIT\n"))  # the zone rules gone
        without_zones = who_answers(lab)
    assert with_zones == ("pilot-agent", 1)
    assert without_zones == ("kube-dns", 0)


@pytest.mark.kernel
def test_kube_dns_holds_the_resolver_address_and_the_node_forwards_to_it():
    host_forwarding = open("/proc/sys/net/ipv4/ip_forward").read()
    with Lab() as lab:
        def ip(ns, *argv):
            return subprocess.run(["ip", "-n", ns, *argv], capture_output=True, text=True, check=True).stdout

        assert f"inet {plan.RESOLVER}/32" in ip(lab.pod("kube-dns").ns, "-o", "addr", "show", "dev", "eth0")
        assert f"{plan.RESOLVER} via {plan.PODS['kube-dns']} dev br0" in ip(lab.node, "route")
    assert open("/proc/sys/net/ipv4/ip_forward").read() == host_forwarding  # the host's own is untouched


@pytest.mark.kernel
def test_the_html_report_draws_the_dns_paths(captured):
    results, *_ = captured
    ordered = [results[s.id] for s in DNS_SCENARIOS]
    tree = parse_page(html_report.page(view.run([r.view for r in ordered], profile=DNS)))
    for r in ordered:
        assert_diagram_draws(tree, r.scenario.id, [report.hop_json(h) for h in r.measurement.path.hops])
