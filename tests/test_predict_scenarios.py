"""predict against the kernel's recorded answers: every profile x every scenario's flow.

Each scenario file records the path the kernel measured under each profile
(`expected.path`, `expected.profiles`); the lab's run fails when the kernel disagrees, so
these are measured truth.  predict must write exactly those paths, with no root and no
namespaces; over IPv6 too, for the dual-stack profile (each scenario's `@ipv6` twin takes
its IPv4 path).  The scenario files are read as data, so this test follows the files.
"""

from __future__ import annotations

import pytest

from lab import dualstack, scenario
from lab.predict import Predictor
from lab.rules import features, profiles

from .predict_flows import scenario_flow

# The problems bring rules, pods and the node's DNAT of their own (tests/test_problems.py).
SCENARIOS = [s for s in scenario.load_all() if s.group != "problems"]
CASES = [(profile, s) for profile in profiles.names() for s in SCENARIOS]


@pytest.mark.parametrize("profile,s", CASES, ids=[f"{p}:{s.id}" for p, s in CASES])
def test_predict_writes_the_path_the_kernel_measured(profile: str, s) -> None:
    dumps = profiles.dumps(profile)
    mode = features.inbound_mode(dumps)
    predictor = Predictor(dumps)
    twins = [s, dualstack.over_ipv6(s)] if profiles.dual_stack(profile) and s.traffic.protocol != "dns" else [s]
    for twin in twins:
        predicted = str(predictor.predict(scenario_flow(twin, mode)).path)
        assert predicted == str(s.expected.path(profile)), f"{profile} {twin.id}"
