"""predict against the kernel's recorded answers: every profile x every scenario's flow.

Each scenario file records the path the kernel measured under each profile
(`expected.path`, `expected.profiles`); the lab's run fails when the kernel disagrees, so
these are measured truth.  predict must write exactly those paths, with no root and no
namespaces; over IPv6 too, for the dual-stack profile (each scenario's `@ipv6` twin takes
its IPv4 path).  The scenario files are read as data, so this test follows the files.
"""

from __future__ import annotations

import pytest

from lab import dualstack, runner, scenario
from lab.errors import LabError
from lab.predict import Predictor
from lab.rules import features, profiles

from .predict_flows import scenario_flow

SCENARIOS = scenario.load_all()


def _cases():
    """Every profile x every scenario the kernel measured under it: the problems with their own
    pod (its annotations on the profile's options, how it runs) and the node's DNAT."""
    for profile in profiles.names():
        for s in SCENARIOS:
            try:
                rules = runner.rules_for(s, runner.Choice(profile))
            except LabError:  # options that profile's Istio cannot build: never measured
                continue
            if s.expected and dict(s.expected.not_measured).get(profile):
                continue
            if s.backends:  # a pod written by two backends: predict reads one rule set (to come)
                continue
            yield profile, s, rules


CASES = list(_cases())


@pytest.mark.parametrize("profile,s,rules", CASES, ids=[f"{p}:{s.id}" for p, s, _ in CASES])
def test_predict_writes_the_path_the_kernel_measured(profile: str, s, rules) -> None:
    dumps = rules.dumps
    mode = features.inbound_mode(dumps)
    predictor = Predictor(dumps, s.pod.resolved(rules.istio))
    twins = [s, dualstack.over_ipv6(s)] if profiles.dual_stack(profile) and s.traffic.protocol != "dns" else [s]
    for twin in twins:
        predicted = str(predictor.predict(scenario_flow(twin, mode)).path)
        assert predicted == str(s.expected.path(profile)), f"{profile} {twin.id}"
