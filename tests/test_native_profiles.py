"""Istio's native nftables profiles (1.27+, `nativeNftables`): the rules go in as one nft -f
transaction with a counter in every rule, only on the nft backend; every scenario passes
with its measured path; paths read in nft's words; explain says where the nft rules part
from the iptables ones.  The offline half reads recorded runs (tests/data/observations)."""

from __future__ import annotations

import subprocess

import pytest

from lab import api, backend, compare, dualstack, path, result, scenario
from lab.errors import LabError
from lab.netfilter import Layout, RuleRef
from lab.observe import Observation
from lab.rules import nftcompare, profiles, ruleset

from .record_observations import load

NATIVE = profiles.names(native_nftables=True)
SCENARIOS = [s for s in scenario.load_all() if s.group != "problems"]
BY_ID = {s.id: s for s in scenario.load_all()}


def in_pod(ns: str, *argv: str) -> str:
    return subprocess.run(["ip", "netns", "exec", ns, *argv], capture_output=True, text=True, check=True).stdout


# ------------------------------------------------------------------ offline
def test_the_native_profiles_are_listed_and_built_as_nft_rules():
    assert NATIVE == ["istio-1.27-nft", "istio-1.27-nft-tproxy", "istio-1.27-nft-dns", "istio-1.27-nft-ipv6"]
    assert not set(NATIVE) & set(profiles.names())  # `names()` is the iptables profiles
    rules = ruleset.profile("istio-1.27-nft")
    assert rules.native and rules.dumps == () and not rules.dual_stack and rules.inbound_mode == "REDIRECT"
    assert all(r.counter for r in rules.nft.counted().table("istio-proxy-nat").chains["istio-output"].rules)
    assert rules.script.count("counter") == sum(1 for _ in rules.nft.numbered())  # the lab's counter in each
    assert ruleset.profile("istio-1.27-nft-tproxy").inbound_mode == "TPROXY"
    assert "dns-capture" in ruleset.profile("istio-1.27-nft-dns").features
    assert ruleset.profile("istio-1.27-nft-ipv6").dual_stack


def test_legacy_refuses_native_rules_in_one_line_and_auto_picks_nft(monkeypatch):
    with pytest.raises(LabError, match="native nftables rules go into nf_tables: use --backend nft"):
        backend.choose(backend.LEGACY, native=True)
    monkeypatch.setenv(backend.ENVIRONMENT, "legacy")  # how CI runs the legacy half of the suite
    chosen, why = backend.choose(backend.AUTO, native=True)
    assert chosen.name == backend.NFT and why == "auto: nft (native nftables rules)"


def test_the_notation_reads_nft_chains_and_tables():
    text = ("Remote Pod -> PREROUTING -> istio-inbound RULE 8 (istio-proxy-mangle) -> istio-tproxy (istio-proxy-mangle)"
            " -> Envoy 15006 (Inbound) -> OUTPUT -> output RULE 1 (istio-proxy-mangle) -> istio-output RULE 3"
            " -> POSTROUTING -> Local Pod")
    p = path.parse(text)
    assert str(p) == text
    assert [(h.name, h.table) for h in p.chains] == [
        ("istio-inbound", "istio-proxy-mangle"), ("istio-tproxy", "istio-proxy-mangle"),
        ("output", "istio-proxy-mangle"), ("istio-output", "nat")]
    assert p.short() == "istio-inbound 8 (istio-proxy-mangle) › istio-tproxy (istio-proxy-mangle) › 15006 › " \
                        "output 1 (istio-proxy-mangle) › istio-output 3"
    assert RuleRef.parse("istio-proxy-nat:istio-output#4") == RuleRef("istio-proxy-nat", "istio-output", 4)


@pytest.mark.parametrize("profile", NATIVE)
def test_recorded_native_runs_judge_again_offline(profile):
    for sid, seen in load(profile).items():
        base = BY_ID[sid.removesuffix(dualstack.SUFFIX)]
        s = dualstack.over_ipv6(base) if sid.endswith(dualstack.SUFFIX) else base
        r = result.conclude(s, profile, Observation.from_json(seen))
        assert r.passed, (sid, r.failure, r.measured_path)
        assert r.measurement.layout.role("istio-proxy-nat") == "nat"


def test_a_native_hop_names_its_nft_rule_and_its_table():
    seen = Observation.from_json(load("istio-1.27-nft-tproxy")["type1-remote-to-local"])
    r = result.conclude(BY_ID["type1-remote-to-local"], "istio-1.27-nft-tproxy", seen)
    hops = {str(h): h for h in r.measurement.path.chains}
    tproxy = hops["istio-tproxy (istio-proxy-mangle)"]
    assert tproxy.line == "meta l4proto tcp ip daddr != 127.0.0.1 tproxy ip to :15006 meta mark set 0x00000539 counter accept"
    assert tproxy.plays == "mangle" and hops["istio-output RULE 3"].plays == "nat"
    assert hops["istio-output RULE 3"].qualifier == ""  # istio-proxy-nat plays nat: no table said
    assert r.agreement == compare.AGREES  # the article's picture: Envoy 15006 once
    rows = {str(row.rule): row for row in r.view.counters}
    assert rows["istio-proxy-mangle:istio-tproxy#1"].plays == "mangle"


def test_the_article_compares_with_nft_chains_as_the_iptables_ones_they_mirror():
    seen = Observation.from_json(load("istio-1.27-nft")["type2-local-to-remote"])
    r = result.conclude(BY_ID["type2-local-to-remote"], "istio-1.27-nft", seen)
    assert r.measured_path == ("Local Pod -> OUTPUT -> istio-output RULE 9 -> istio-redirect -> Envoy 15001 (Outbound)"
                               " -> OUTPUT -> istio-output RULE 4 -> POSTROUTING -> Remote Pod")
    assert r.agreement == compare.AGREES
    assert r.rule_hits == ["istio-proxy-nat:output#1", "istio-proxy-nat:istio-output#9",
                           "istio-proxy-nat:istio-redirect#1", "istio-proxy-nat:output#1",
                           "istio-proxy-nat:istio-output#4"]


def test_an_ipv6_twin_keeps_its_own_path_where_one_inet_chain_numbers_it_apart():
    s = BY_ID["type1-remote-to-local"]
    v4, v6 = s.expected.path("istio-1.27-nft-ipv6"), dualstack.over_ipv6(s).expected.path("istio-1.27-nft-ipv6")
    assert "istio-output RULE 1 ->" in str(v4) and "istio-output RULE 2 ->" in str(v6)
    assert dualstack.over_ipv6(s).expected.path("istio-1.25-ipv6") == s.expected.path("istio-1.25-ipv6")


def test_what_nft_changes_is_read_from_the_two_rule_sets():
    def differences(name):
        return nftcompare.differences(profiles.nft_rules(name), tuple(profiles.iptables_counterpart(name)))

    default = differences("istio-1.27-nft")
    assert default[0] == "tables: nft writes inet istio-proxy-nat (one table per part, IPv4 and IPv6 in each); " \
                         "iptables writes nat"
    assert any(line.startswith("owner: `skuid`/`skgid`") for line in default)
    assert not any(line.startswith(("numbering", "istio-output")) for line in default)  # the same numbers
    dual = differences("istio-1.27-nft-ipv6")
    assert "numbering: IPv4's rules of iptables' ISTIO_OUTPUT 1-9 are istio-output 1, 3, 5, 6, 7, 9, 10, 11, 13 " \
           "(each IPv4 address rule has its IPv6 twin after it, in one chain)" in dual
    assert "numbering: IPv6's rules of ip6tables' ISTIO_OUTPUT 1-9 are istio-output 2, 4, 5, 6, 8, 9, 10, 12, 13 " \
           "(each IPv4 address rule has its IPv6 twin after it, in one chain)" in dual
    assert not any("do not pair" in line for name in NATIVE for line in differences(name))
    assert any(line.startswith("TPROXY: one nft rule") for line in differences("istio-1.27-nft-tproxy"))


def test_the_default_layout_is_xtables_own_names():
    assert Layout().role("nat") == "nat" and Layout().hook("mangle", "PREROUTING") == "PREROUTING"
    assert Layout().hook("nat", "ISTIO_OUTPUT") is None


# ------------------------------------------------------------------ kernel
@pytest.mark.kernel
@pytest.mark.parametrize("profile", NATIVE)
def test_every_scenario_passes_under_the_native_profile_on_nft(profile):
    rules = ruleset.profile(profile)
    chosen = scenario.for_features(SCENARIOS, rules.features)
    host = subprocess.run(["nft", "list", "ruleset"], capture_output=True, text=True, check=True).stdout
    with api.Session(rules, backend.AUTO) as session:  # auto: nft, whatever ISTIO_LAB_BACKEND says
        assert session.backend.name == backend.NFT
        results = session.run_all(chosen)
        sidecar = session.lab.pod("sidecar").ns
        assert in_pod(sidecar, "iptables-legacy-save") == ""  # legacy xtables untouched
        assert in_pod(sidecar, "iptables-nft-save") == ""  # no iptables-nft table: native only
        tables = {line.split()[-1] for line in in_pod(sidecar, "nft", "list", "tables").splitlines()}
        assert tables == {t.name for t in rules.nft.tables.values()} | {"ilab-trace"}
    assert [(r.scenario.id, r.failure or r.measured_path) for r in results if not r.passed] == []
    assert all(r.measurement.counters_agree and r.measurement.counters for r in results)
    assert subprocess.run(["nft", "list", "ruleset"], capture_output=True, text=True, check=True).stdout == host
    if rules.dual_stack:
        assert sum(r.scenario.id.endswith(dualstack.SUFFIX) for r in results) == 9


def test_native_rules_under_the_legacy_backend_are_refused_before_any_lab():
    with pytest.raises(LabError, match="use --backend nft"):
        api.Session(ruleset.profile("istio-1.27-nft"), backend.LEGACY)


def test_explain_shows_nfts_chains_beside_iptables_and_what_differs():
    import sys
    out = subprocess.run([sys.executable, "-m", "lab.cli", "explain", "type4-local-to-local", "--profile",
                          "istio-1.27-nft-ipv6"], capture_output=True, text=True, check=True).stdout
    assert "istio-output (table inet istio-proxy-nat: its nat table, IPv4 and IPv6)" in out
    assert " > 13  jump istio-redirect" in out and "   iptables: ISTIO_OUTPUT (nat table)" in out
    assert "   ip6tables: ISTIO_OUTPUT (nat table)" in out
    assert "  - numbering: IPv6's rules of ip6tables' ISTIO_OUTPUT 1-9 are istio-output 2, 4, 5, 6, 8, 9, 10, 12, 13" in out
    listed = subprocess.run([sys.executable, "-m", "lab.cli", "profiles"], capture_output=True, text=True,
                            check=True).stdout.splitlines()
    assert [line.split()[:3] for line in listed if "-nft" in line.split()[0]] == [
        [name, "1.27", "nft"] for name in NATIVE]
