"""predict against the kernel's recorded answers: every profile x every scenario's flow.

Each scenario file records the path the kernel measured under each profile
(`expected.path`, `expected.profiles`); the lab's run fails when the kernel disagrees, so
these are measured truth.  predict must write exactly those paths, with no root and no
namespaces: under the iptables profiles and Istio's native nftables ones, in pods whose
rules both backends wrote (`backends:`), and over IPv6 too for the dual-stack profiles (each
scenario's `@ipv6` twin takes its IPv4 path, or the one its file records for IPv6).  The
scenario files are read as data, so this test follows the files.
"""

from __future__ import annotations

import pytest

from lab import dualstack, runner, scenario
from lab.errors import LabError
from lab.predict import Predictor
from lab.rules import profiles

from .predict_flows import scenario_flow

SCENARIOS = scenario.load_all()


def _cases():
    """Every profile x every scenario the kernel measured under it: the problems with their own
    pod (its annotations on the profile's options, how it runs, the backends that wrote its
    rules) and the node's DNAT."""
    for profile in profiles.names(native_nftables=None):
        for s in SCENARIOS:
            try:
                rules = runner.rules_for(s, runner.Choice(profile))
            except LabError:  # options that profile's Istio cannot build, or a pod it cannot hold: never measured
                continue
            if s.expected and dict(s.expected.not_measured).get(profile):
                continue
            yield profile, s, rules


CASES = list(_cases())


def test_every_kind_of_case_is_here() -> None:
    """Native profiles, pods both backends wrote, IPv6 twins: none left out by a filter."""
    assert {p for p, _, _ in CASES} == set(profiles.names(native_nftables=None))
    assert {s.backends for _, s, _ in CASES} >= {(), ("legacy",), ("legacy", "nft"), ("nft", "legacy")}
    assert sum(1 for p, _, _ in CASES if profiles.get(p).native_nftables) >= 4 * 25


@pytest.mark.parametrize("profile,s,rules", CASES, ids=[f"{p}:{s.id}" for p, s, _ in CASES])
def test_predict_writes_the_path_the_kernel_measured(profile: str, s, rules) -> None:
    predictor = Predictor.of(rules, s.pod.resolved(rules.istio))
    twins = [s, dualstack.over_ipv6(s)] if profiles.dual_stack(profile) and s.traffic.protocol != "dns" else [s]
    for twin in twins:
        predicted = str(predictor.predict(scenario_flow(twin, rules.inbound_mode)).path)
        assert predicted == str(twin.expected.path(profile)), f"{profile} {twin.id}"
