"""predict against the kernel's recorded answers: every profile x every scenario's flow.

Each scenario file records the path the kernel measured under each profile
(`expected.path`, `expected.profiles`); the lab's run fails when the kernel disagrees, so
these are measured truth.  predict must write exactly those paths, with no root and no
namespaces; over IPv6 too, for the dual-stack profile (each scenario's `@ipv6` twin takes
its IPv4 path).  The scenario files are read as data, so this test follows the files.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from lab.predict import Predictor
from lab.rules import profiles, routing

from .predict_flows import scenario_flow, scenario_path

SCENARIOS = sorted((Path(__file__).resolve().parent.parent / "scenarios").glob("*.yaml"))


def _scenario(file: Path) -> dict:
    return yaml.safe_load(file.read_text())


CASES = [(profile, file) for profile in profiles.names() for file in SCENARIOS]


@pytest.mark.parametrize("profile,file", CASES, ids=[f"{p}:{f.stem}" for p, f in CASES])
def test_predict_writes_the_path_the_kernel_measured(profile: str, file: Path) -> None:
    data = _scenario(file)
    dumps = profiles.dumps(profile)
    mode = routing.inbound_mode(dumps)
    predictor = Predictor(dumps)
    families = (4, 6) if profiles.dual_stack(profile) and data["traffic"]["to"].get("protocol") != "dns" else (4,)
    for family in families:
        predicted = str(predictor.predict(scenario_flow(data, mode, family)).path)
        assert predicted == scenario_path(data, profile), f"{profile} {file.stem} over IPv{family}"
