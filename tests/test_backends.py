"""The two netfilter backends: every iptables profile's scenarios take the same path rule for
rule on legacy xtables and on nf_tables (iptables-nft, traced with nftrace), and a pod under
the nft backend holds no legacy table."""

from __future__ import annotations

import subprocess

import pytest

from lab import api, backend, dualstack, scenario
from lab.rules import profiles, ruleset

pytestmark = pytest.mark.kernel
SCENARIOS = scenario.load_all()


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
