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

from lab import path as paths
from lab import plan
from lab.predict import Flow, Predictor
from lab.rules import profiles, routing

SCENARIOS = sorted((Path(__file__).resolve().parent.parent / "scenarios").glob("*.yaml"))


def _scenario(file: Path) -> dict:
    return yaml.safe_load(file.read_text())


def flow_of(data: dict, mode: str, family: int = 4) -> Flow:
    """The scenario's traffic as a Flow, the sidecar's own processes as the inbound mode runs them."""
    src, to = data["traffic"]["from"], data["traffic"]["to"]
    if "pod" in to:
        address = plan.PODS[to["pod"]]
    elif "service" in to:
        address = next(s.vip for s in plan.SERVICES if s.name == to["service"])
    else:
        address = to["address"]
    if family == 6:
        address = plan.ipv6_twin(address)
    identity = plan.SIDECAR_IDENTITY[mode] if src.get("process") in plan.SIDECAR_PROCESSES else None
    uid, gid = (identity.uid, identity.gid) if identity else (src["uid"], src["gid"])
    dns = to.get("protocol") == "dns"
    return Flow(src["pod"], address, to["port"], uid, gid, transport=to["transport"] if dns else "tcp",
                query=data["traffic"].get("query"), source_label=src["label"], destination_label=to["label"])


def expected(data: dict, profile: str) -> str:
    text = (data["expected"].get("profiles") or {}).get(profile, data["expected"]["path"])
    return str(paths.parse(text))


CASES = [(profile, file) for profile in profiles.names() for file in SCENARIOS]


@pytest.mark.parametrize("profile,file", CASES, ids=[f"{p}:{f.stem}" for p, f in CASES])
def test_predict_writes_the_path_the_kernel_measured(profile: str, file: Path) -> None:
    data = _scenario(file)
    dumps = profiles.dumps(profile)
    mode = routing.inbound_mode(dumps)
    predictor = Predictor(dumps)
    families = (4, 6) if profiles.dual_stack(profile) and data["traffic"]["to"].get("protocol") != "dns" else (4,)
    for family in families:
        predicted = str(predictor.predict(flow_of(data, mode, family)).path)
        assert predicted == expected(data, profile), f"{profile} {file.stem} over IPv{family}"
