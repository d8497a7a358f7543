"""IPv6: the dual-stack lab, TRACE and Envoy over IPv6, and the scenarios run again over IPv6.

Pure logic first (address twins, [v6]:port, /proc/net/tcp6), then the kernel: a lab built
dual-stack, an IPv6 TRACE event, an IPv6 original destination, and `istio-lab run --profile
istio-1.25-ipv6` with every IPv6 twin on its recorded path and its ip6tables counters
agreeing with TRACE.
"""

from __future__ import annotations

import ipaddress
import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from lab import addr, api, dualstack, join, netns, plan, procfs, proxylogs, scenario, traffic
from lab.addr import Address
from lab.netfilter import RuleRef
from lab.observe import trace_plan
from lab.proxylogs import ProxyLine
from lab.rules import profiles, ruleset, xtables
from lab.sidecar import envoy
from lab.trace import TraceReader
from lab.world import IFA_F_NODAD, Lab, ipr

from .sandbox import Sandbox

REPO = Path(__file__).resolve().parent.parent
PROFILE = "istio-1.25-ipv6"
SCENARIOS = [s for s in scenario.load_all() if s.traffic.protocol != "dns" and s.group != "problems"]  # DNS is IPv4 only: no twin (test_dns.py); the problems: test_problems.py
IFA_F_TENTATIVE = 0x40


# ---------------------------------------------------------------- pure logic

def test_every_address_a_scenario_dials_has_an_ipv6_twin():
    assert plan.ipv6_twin("10.244.0.10") == "fd00:10:244::10"
    assert plan.ipv6_twin("10.96.0.90") == "fd00:10:96::90"
    assert plan.ipv6_twin("127.0.0.1") == "::1"
    assert plan.ipv6_twin("127.0.0.6") == "::6"
    assert {plan.ipv6_twin(s.traffic.to.ip) for s in SCENARIOS} <= set(plan.PODS6.values()) | {s.vip6 for s in plan.SERVICES} | {"::1"}
    with pytest.raises(ValueError, match="no IPv6 twin"):
        plan.ipv6_twin("127.0.0.2")  # IPv6 has one loopback address, not a /8


def test_the_ipv6_plan_sits_in_its_ranges():
    pods, services = ipaddress.ip_network(plan.POD_SUBNET6), ipaddress.ip_network(plan.SERVICE_RANGE6)
    assert all(ipaddress.ip_address(ip) in pods for ip in plan.PODS6.values())
    assert ipaddress.ip_address(plan.GATEWAY6) in pods
    assert all(ipaddress.ip_address(s.vip6) in services for s in plan.SERVICES)


def test_services_and_pods_are_found_by_either_address():
    remote = plan.service_at("fd00:10:96::90", 9080)
    assert remote is plan.service_at("10.96.0.90", 9080) and remote.pod == "remote"
    assert plan.service_at("fd00:10:96::90", 80) is None
    assert plan.pod_at("fd00:10:244::30") == plan.pod_at("10.244.0.30") == "istiod"
    assert plan.pod_at("::1") is None


@pytest.mark.parametrize("s", SCENARIOS, ids=[s.id for s in SCENARIOS])
def test_an_ipv6_twin_is_the_same_traffic(s):
    twin = dualstack.over_ipv6(s)
    assert (twin.id, twin.traffic.family, twin.traffic.to) == (
        s.id + "@ipv6", 6, Address(plan.ipv6_twin(s.traffic.to.ip), s.traffic.to.port))
    assert (twin.traffic.endpoint_pod, trace_plan(twin.traffic)) == (s.traffic.endpoint_pod, trace_plan(s.traffic))
    assert dualstack.both_families([s]) == [s, twin]


@pytest.mark.parametrize("sockaddr, text", [
    (("10.244.0.10", 8080), "10.244.0.10:8080"),
    (("fd00:10:244::10", 8080, 0, 0), "[fd00:10:244::10]:8080"),  # asyncio's IPv6 peername is a 4-tuple
    (("::6", 40000), "[::6]:40000"),
])
def test_addresses_round_trip_through_the_access_log_form(sockaddr, text):
    assert addr.text(sockaddr) == text
    assert Address.parse(text) == Address.of(sockaddr) == Address(*sockaddr[:2])
    assert str(Address.parse(text)) == text


def test_legs_chain_through_ipv6_access_log_lines():
    log = [{"listener": 15001, "downstream_peer": "[fd00:10:244::10]:40000", "original_dst": "[fd00:10:96::80]:8080",
            "upstream_local": "[fd00:10:244::10]:40002", "upstream_peer": "[fd00:10:244::10]:8080"},
           {"listener": 15006, "downstream_peer": "[fd00:10:244::10]:40002", "original_dst": "[fd00:10:244::10]:8080",
            "upstream_local": "[::6]:40004", "upstream_peer": "[fd00:10:244::10]:8080"}]
    legs = join.legs(Address.parse("[fd00:10:244::10]:40000"), Address.parse("[fd00:10:96::80]:8080"),
                     [ProxyLine.from_json(line) for line in log])
    assert [(str(leg.client), leg.proxy) for leg in legs] == [
        ("[fd00:10:244::10]:40000", 15001), ("[fd00:10:244::10]:40002", 15006), ("[::6]:40004", None)]


def test_proc_net_tcp6_addresses_are_read():
    # as /proc/net/tcp6 prints them on a little-endian machine: four 32-bit words, each in host order
    assert procfs.hexaddr("00000000000000000000000001000000:3A98") == Address("::1", 15000)
    assert procfs.hexaddr("00000000000000000000000000000000:1F90") == Address("::", 8080)
    assert procfs.hexaddr("100000FD000044020000000010000000:1F90") == Address("fd00:10:244::10", 8080)
    assert procfs.hexaddr("0A00F40A:1F90") == Address("10.244.0.10", 8080)


def test_envoy_sends_an_ipv6_vip_to_the_endpoints_ipv6_address():
    endpoints = envoy.endpoints_from()
    assert endpoints["fd00:10:96::90", 9080].ip == "fd00:10:244::20"
    assert endpoints["10.96.0.90", 9080].ip == "10.244.0.20"
    proxy = envoy.Envoy.__new__(envoy.Envoy)  # route() reads only the config
    proxy.config = envoy.Config("/dev/null", endpoints)
    client = ("fd00:10:244::20", 40000)
    assert proxy.route(plan.Port.INBOUND, ("fd00:10:244::10", 8080), client) == (
        envoy.Endpoint("fd00:10:244::10", 8080, "InboundPassthroughClusterIpv6"), ("::6", 0))
    assert proxy.route(plan.Port.INBOUND, ("10.244.0.10", 8080), ("10.244.0.20", 40000))[1] == ("127.0.0.6", 0)


def test_a_plugin_request_to_an_ipv6_address_is_traced_as_ipv6():
    request = api.Flow("sidecar", Address("fd00:10:96::90", 9080), uid=1000, gid=1000, protocol="http").scenario()
    flow = request.traffic
    # the node too: a Service VIP that Envoy does not take is DNATed there (kube-proxy's rules)
    assert (flow.family, flow.label, trace_plan(flow).pods) == (6, "Remote Pod", ("sidecar", "remote", "node"))
    assert api.Flow("sidecar", Address("10.96.0.90", 9080), uid=1000, gid=1000).scenario().traffic.family == 4


# ---------------------------------------------------------------- the kernel

def _addresses(ns: str) -> dict[str, list[tuple[str, int]]]:
    """ifname -> [(IPv6 address, flags)] inside `ns`."""
    with ipr(ns) as sock:
        names = {link["index"]: link.get_attr("IFLA_IFNAME") for link in sock.get_links()}
        out: dict[str, list[tuple[str, int]]] = {}
        for a in sock.get_addr(family=socket.AF_INET6):
            flags = a.get_attr("IFA_FLAGS") or a["flags"]
            out.setdefault(names[a["index"]], []).append((a.get_attr("IFA_ADDRESS"), flags))
    return out


def _tcp_exchange(server_ns: str, client_ns: str, address: str) -> tuple[int, str]:
    """Listen in one pod, connect from another over IPv6: (client port, what the server saw)."""
    with netns.entered(server_ns):
        listener = socket.create_server((address, 0), family=socket.AF_INET6)
    with listener:
        with netns.entered(client_ns):
            client = socket.socket(socket.AF_INET6)
        with client:
            client.settimeout(2)
            client.connect((address, listener.getsockname()[1]))
            conn, peer = listener.accept()
            conn.close()
            return client.getsockname()[1], peer[0]


@pytest.mark.kernel
def test_a_dual_stack_lab_has_every_ipv6_address_usable_at_once():
    with Lab(ipv6=True) as lab:
        node = _addresses(lab.node)
        assert (plan.GATEWAY6, IFA_F_NODAD) in [(a, f & IFA_F_NODAD) for a, f in node["br0"]]
        for pod in lab.pods.values():
            found = _addresses(pod.ns)
            eth0 = dict(found["eth0"])
            assert pod.ip6 == plan.PODS6[pod.name] and not eth0[pod.ip6] & IFA_F_TENTATIVE, found
            lo = {a for a, _ in found["lo"]}
            assert lo == ({"::1", "::6"} if pod.name == "sidecar" else {"::1"})
        # right after the build, no wait for DAD: pod to pod, and the gateway answers for the Service range
        port, seen = _tcp_exchange(lab.pod("sidecar").ns, lab.pod("remote").ns, plan.PODS6["sidecar"])
        assert seen == plan.PODS6["remote"]
        routes = subprocess.run(["ip", "-n", lab.pod("remote").ns, "-6", "route", "get", "fd00:10:96::90"],
                                capture_output=True, text=True, check=True).stdout
        assert f"via {plan.GATEWAY6} dev eth0" in routes


@pytest.mark.kernel
def test_an_ipv4_lab_stays_ipv4_only():
    with Lab() as lab:
        assert all(pod.ip6 is None for pod in lab.pods.values())
        found = _addresses(lab.pod("sidecar").ns)
        assert {a for a, _ in found.get("lo", [])} == {"::1"}
        assert all(a.startswith("fe80:") for a, _ in found.get("eth0", []))


@pytest.mark.kernel
def test_a_trace_reader_sees_ipv6_events():
    trace = ("-p", "tcp", "-j", "TRACE")
    with Lab(ipv6=True) as lab:
        remote = lab.pod("remote").ns
        xtables.touch(remote, 6)
        xtables.insert(remote, "raw", [("OUTPUT", trace)], family=6)
        with TraceReader(remote, "remote") as reader:
            port, _ = _tcp_exchange(lab.pod("sidecar").ns, remote, plan.PODS6["sidecar"])
            events = reader.drain()
        xtables.delete(remote, "raw", [("OUTPUT", trace)], family=6)
        assert xtables.packet_counts(remote, "raw", 6) == {}
    syn = [e for e in events if e.tcp_flags == "S"]
    assert syn and all((e.src, e.sport, e.dst) == (plan.PODS6["remote"], port, plan.PODS6["sidecar"]) for e in syn)
    assert [(e.table, e.chain) for e in syn][:1] == [("raw", "OUTPUT")]
    # no nat events: a pod with no nat rule has no conntrack, for IPv4 alike
    assert {(e.table, e.chain) for e in syn} >= {("mangle", "OUTPUT"), ("filter", "OUTPUT"), ("mangle", "POSTROUTING")}


@pytest.fixture(scope="module")
def dual_stack():
    with api.Session(ruleset.profile(PROFILE)) as session:
        assert session.lab.ipv6
        yield session


@pytest.mark.kernel
@pytest.mark.parametrize("dst, original, upstream", [
    ("fd00:10:244::20", "[fd00:10:244::20]:9080", "[fd00:10:244::20]:9080"),  # PassthroughCluster
    ("fd00:10:96::90", "[fd00:10:96::90]:9080", "[fd00:10:244::20]:9080"),  # the Service's IPv6 VIP
])
def test_envoy_recovers_an_ipv6_original_destination(dual_stack, dst, original, upstream):
    lab = dual_stack.lab
    logged = len(proxylogs.read(lab.run_dir, proxylogs.ACCESS_LOG))
    response = traffic.request(lab.pod("sidecar").ns, dst, 9080, uid=plan.APP_UID, gid=plan.APP_GID)
    assert response.status == 200 and response.json()["local"] == "[fd00:10:244::20]:9080"
    (line,) = proxylogs.read(lab.run_dir, proxylogs.ACCESS_LOG)[logged:]
    assert (line["listener"], line["downstream_peer"]) == (15001, str(response.local))
    assert (line["original_dst"], line["upstream_peer"]) == (original, upstream)


@pytest.mark.kernel
def test_envoy_inbound_passthrough_binds_6_for_ipv6(dual_stack):
    lab = dual_stack.lab
    logged = len(proxylogs.read(lab.run_dir, proxylogs.ACCESS_LOG))
    response = traffic.request(lab.pod("remote").ns, plan.PODS6["sidecar"], 8080, uid=plan.APP_UID, gid=plan.APP_GID)
    (line,) = proxylogs.read(lab.run_dir, proxylogs.ACCESS_LOG)[logged:]
    assert line["listener"] == 15006 and line["upstream_cluster"] == "InboundPassthroughClusterIpv6"
    assert line["upstream_local"].startswith("[::6]:") and response.json()["peer"] == line["upstream_local"]


@pytest.mark.kernel
def test_run_with_the_ipv6_profile_takes_the_recorded_paths_over_ipv6(tmp_path):
    done = subprocess.run([sys.executable, "-m", "lab.cli", "run", "--json", "--profile", PROFILE,
                           "--report", str(tmp_path)], cwd=REPO, capture_output=True, text=True, timeout=120)
    report = json.loads(done.stdout)
    by_id = {s["id"]: s for s in report["scenarios"]}
    assert done.returncode == 0, [(i, s["failure"] or s["measured_path"]) for i, s in by_id.items() if s["verdict"] != "pass"]
    assert list(by_id) == [i for s in SCENARIOS for i in (s.id, s.id + "@ipv6")]
    for s in SCENARIOS:
        six = by_id[s.id + "@ipv6"]
        assert six["measured_path"] == six["expected_path"] == str(s.expected.path(PROFILE))
        assert six["counters"] == six["trace_rule_events"] and six["counters"], six["id"]
        assert six["endpoint"].split()[1].startswith("[fd00:10:244::") or "[::1]:" in six["endpoint"]
        assert all(":" in leg["client"].rsplit(":", 1)[0] for leg in six["legs"])
        assert six["rule_hits"] == by_id[s.id]["rule_hits"]
    page = (tmp_path / "index.html").read_text()
    assert 'id="type1-remote-to-local@ipv6"' in page and "pod sidecar &#160;fd00:10:244::10" in page


@pytest.mark.kernel
def test_ipv6_scenarios_match_the_ip6tables_rules_with_6_and_1(dual_stack):
    """The IPv6 nat rules are the ones that count: rule 1 returns ::6, rule 2 skips ::1."""
    chosen = scenario.select(SCENARIOS, ["type4-local-to-local"])
    v4, v6 = dual_stack.run_all(chosen)
    assert (v4.scenario.id, v6.scenario.id) == ("type4-local-to-local", "type4-local-to-local@ipv6")
    assert (v4.passed, v6.passed) == (True, True), (v4.failure, v6.failure)
    rule1, rule2 = RuleRef("nat", "ISTIO_OUTPUT", 1), RuleRef("nat", "ISTIO_OUTPUT", 2)
    assert v6.measurement.rules[rule1] == "-A ISTIO_OUTPUT -s ::6/128 -o lo -j RETURN"
    assert "! -d ::1/128 -o lo" in v6.measurement.rules[rule2]
    assert v4.measurement.rules[rule1] == "-A ISTIO_OUTPUT -s 127.0.0.6/32 -o lo -j RETURN"
    assert {e.src for e in v6.measurement.events if e.table == "nat"} <= {plan.PODS6["sidecar"], "::6"}
    # ip6tables counters two ways: the backend's listing (ip6tables-legacy-save -c, or
    # ip6tables-nft-save -c) and its counters (python-iptables' Table6 entries, or nf_tables')
    sidecar = dual_stack.lab.pod("sidecar").ns
    saved = {r.ref: r.packets for r in dual_stack.backend.listing(sidecar, "nat", 6)}
    assert saved == dual_stack.backend.counters(sidecar, ("nat",), 6) and saved[rule1] > 0
    assert profiles.dual_stack(PROFILE) and not profiles.dual_stack(profiles.DEFAULT)


@pytest.mark.kernel
def test_rules_shows_a_dual_stack_labs_ip6tables_rules():
    with Sandbox() as box:
        assert box.run("up", "--id", "dual", "--profile", PROFILE).returncode == 0
        shown = box.run("rules", "dual")
        assert shown.returncode == 0, shown.stderr
        ipv6 = shown.stdout.split("# ip6tables table nat", 1)[1]
        assert "-s ::6/128 -o lo -j RETURN" in ipv6 and "127.0.0.6" not in ipv6
        assert box.run("down", "dual").returncode == 0
        assert box.leftovers() == {}
