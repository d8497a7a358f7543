"""The two netfilter backends: every iptables profile's scenarios take the same path rule for
rule on legacy xtables and on nf_tables (iptables-nft, traced with nftrace), and a pod under
the nft backend holds no legacy table."""

from __future__ import annotations

import subprocess

import pytest

from lab import api, backend, dualstack, plan, scenario
from lab.netfilter import RuleRef
from lab.rules import builder, profiles, ruleset
from lab.rules.ruleset import RuleSet

pytestmark = pytest.mark.kernel
SCENARIOS = [s for s in scenario.load_all() if s.group != "problems"]  # the problems bring rules of their own


def _paths(profile: str, name: str) -> dict[str, str]:
    rules = ruleset.profile(profile)
    chosen = scenario.for_features(SCENARIOS, rules.features)
    with api.Session(rules, name) as session:
        results = session.run_all(chosen)
        if name == backend.NFT:  # python-iptables would make legacy tables: none may exist
            legacy = subprocess.run(["ip", "netns", "exec", session.lab.pod("sidecar").ns, "iptables-legacy-save"],
                                    capture_output=True, text=True, check=True).stdout
            assert legacy == "", legacy
    assert [r.failure for r in results if not r.passed] == []
    return {r.scenario.id: r.measured_path for r in results}


@pytest.mark.parametrize("profile", profiles.names())
def test_every_iptables_profile_takes_the_same_paths_on_both_backends(profile):
    legacy, nft = _paths(profile, backend.LEGACY), _paths(profile, backend.NFT)
    assert nft == legacy
    if profiles.dual_stack(profile):
        assert any(sid.endswith(dualstack.SUFFIX) for sid in nft)


@pytest.mark.parametrize("name", [backend.LEGACY, backend.NFT])
def test_an_unconditional_return_is_a_hop_on_both_backends(name):
    """Istio up to 1.22 ends ISTIO_OUTPUT with `-j RETURN` after explicit include CIDRs.
    ip_tables' tracer names that rule as it names a chain's tail (`return`, numbered within
    the chain), nftrace as the rule it is: both must make it a hop, with its counter."""
    dump = builder.build("1.13", builder.Options(outbound_cidrs=("10.96.0.0/16",)))
    rule10 = RuleRef("nat", "ISTIO_OUTPUT", 10)
    assert str(dump.tables["nat"].chain_rules("ISTIO_OUTPUT")[9]) == "-A ISTIO_OUTPUT -j RETURN"
    with api.Session(RuleSet("include-services", (dump,), None), name) as session:
        r = session.request("sidecar", plan.PODS["remote"], plan.Port.REMOTE_APP)  # a pod IP: not included
    assert r.passed, r.failure
    assert r.measured_path == "Local Pod -> OUTPUT -> ISTIO_OUTPUT RULE 10 -> POSTROUTING -> Remote Pod"
    assert r.measurement.counters[rule10] == r.measurement.trace_counts[rule10] == 1
