"""pytest fixtures for writing your own scenario tests against a real lab.

    @pytest.mark.istio_profile("istio-1.13")
    def test_app_to_remote_service(traced_request):
        result = traced_request("sidecar", "10.96.0.90", 9080, uid=1000)
        assert result.rule_hits[1:3] == ["ISTIO_OUTPUT#9", "ISTIO_REDIRECT#1"]

Fixtures: `istio_lab` (a lab.world.Lab with its processes up), `sidecar_pod` (its
sidecar pod and rule profile) and `traced_request` (fire one request, get the
measured lab.runner.Result).  The profile comes from `@pytest.mark.istio_profile(NAME)`
or from parametrizing `sidecar_pod` indirectly; default istio-1.13.  One lab per
profile serves the whole session and is torn down at its end.  Needs root: without
it the tests skip (they fail instead with ISTIO_LAB_REQUIRE_KERNEL=1).

Loaded through the `pytest11` entry point by every pytest run in the environment,
so this module imports nothing of the lab until a fixture is used.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import pytest

MARKER = "istio_profile"
DEFAULT_PROFILE = "istio-1.13"  # lab.rules.profiles.DEFAULT, without importing it here
LABELS = {"sidecar": "Local Pod", "remote": "Remote Pod", "istiod": "Istiod", "prometheus": "Prometheus",
          "kube-dns": "kube-dns"}


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", f"{MARKER}(name): the Istio rule profile of the lab the "
                            "istio_lab, sidecar_pod and traced_request fixtures use (default istio-1.13)")


@dataclass(frozen=True)
class SidecarPod:
    """The pod with Istio's rules: its namespace, address, profile and the lab around it."""

    name: str
    ns: str
    ip: str
    profile: str
    lab: Any  # lab.world.Lab


class _Labs:
    """One lab per profile, brought up on first use, each with its TRACE witnesses."""

    def __init__(self):
        self.labs: dict[str, tuple[Any, Any]] = {}  # profile -> (Lab, runner.Witnesses)

    def get(self, profile: str):
        if profile not in self.labs:
            self.labs[profile] = self._bring_up(profile)
        return self.labs[profile]

    @staticmethod
    def _bring_up(profile: str):
        from lab import commands, preflight, runner
        from lab.errors import LabError
        from lab.rules import profiles
        from lab.world import Lab

        problems = []
        try:
            preflight.check()
        except preflight.PreflightError as e:
            problems = e.problems
        if problems == [preflight.ROOT_MESSAGE] and os.environ.get("ISTIO_LAB_REQUIRE_KERNEL") != "1":
            pytest.skip(f"istio-lab {preflight.ROOT_MESSAGE}")
        if problems:
            pytest.fail("istio-lab: " + "\nistio-lab: ".join(problems), pytrace=False)
        unknown = ""
        try:
            profiles.preset(profile)
        except LabError as e:
            unknown = str(e)
        if unknown:
            pytest.fail(f"@pytest.mark.{MARKER}: {unknown}", pytrace=False)
        lab = Lab(ipv6=profiles.dual_stack(profile)).create()
        try:
            commands.bring_up(lab, profile)
            return lab, runner.Witnesses(lab)
        except BaseException:
            lab.destroy()
            raise

    def close(self) -> None:
        for lab, witnesses in self.labs.values():
            try:
                witnesses.close()
            finally:
                lab.destroy()
        self.labs.clear()


@pytest.fixture(scope="session")
def _istio_labs():
    labs = _Labs()
    yield labs
    labs.close()


@pytest.fixture
def sidecar_pod(request: pytest.FixtureRequest, _istio_labs: _Labs) -> SidecarPod:
    """The sidecar pod of a running lab whose rules are the requested profile."""
    marker = request.node.get_closest_marker(MARKER)
    profile = getattr(request, "param", None) or (marker.args[0] if marker else DEFAULT_PROFILE)
    lab, _ = _istio_labs.get(profile)
    pod = lab.pod("sidecar")
    return SidecarPod(pod.name, pod.ns, pod.ip, profile, lab)


@pytest.fixture
def istio_lab(sidecar_pod: SidecarPod):
    """A lab.world.Lab with Istio's rules in the sidecar pod and every process up."""
    return sidecar_pod.lab


def scenario_for(source: str, address: str, port: int, *, uid: int, gid: int, protocol: str, expect: str):
    """An ad-hoc lab.scenario.Scenario: one request from a pod as uid/gid to address:port."""
    from lab import path as paths
    from lab import plan
    from lab.errors import LabError
    from lab.scenario import PROTOCOLS, Endpoint, Scenario

    if source not in LABELS:
        raise LabError(f"no pod {source!r} (pods: {', '.join(LABELS)})")
    streams = [p for p in PROTOCOLS if p != "dns"]  # a DNS query needs a name: a scenario file says it
    if protocol not in streams:
        raise LabError(f"protocol {protocol!r} is not one of {', '.join(streams)} (DNS queries: a scenario file)")
    if expect:
        paths.parse(expect)  # a path the notation cannot read fails here, not as a wrong verdict
    service = plan.service_at(address, port)
    to = service.pod if service else plan.pod_at(address) or source
    return Scenario(
        id="traced-request", title=f"{source} as {uid}:{gid} -> {address}:{port}", type=0, variant_of=None,
        article_path="", article_claim="", article_proxies=None,
        source=Endpoint(source, LABELS[source], "", uid, gid), address=address, port=port, protocol=protocol,
        trigger="client", destination=LABELS[to], expected_path=expect, explanation="", file="traced_request",
        family=6 if ":" in address else 4,  # an IPv6 address: traced in ip6tables (a dual-stack profile's lab)
    )


@pytest.fixture
def traced_request(sidecar_pod: SidecarPod, _istio_labs: _Labs):
    """fire(source_pod, address, port, *, uid=1000, gid=uid, protocol="http", expect="") -> Result.

    Sends one request (protocol "tcp": a stream opened and half-closed) from the
    pod as uid/gid, with TRACE on, and returns the lab.runner.Result: `measured_path`
    in the article's notation (pods named Local Pod, Remote Pod, Istiod, Prometheus),
    `rule_hits` ("ISTIO_OUTPUT#9", ...), `counters_agree`, `endpoint`, `response`,
    `events`, and `failure` (None, or why the traffic did not arrive).  With `expect`
    (a path), `verdict` is "pass" when the measured path is that one.
    """
    from lab import runner

    lab, witnesses = _istio_labs.get(sidecar_pod.profile)

    def fire(source: str, address: str, port: int, *, uid: int = 1000, gid: int | None = None,
             protocol: str = "http", expect: str = ""):
        scenario = scenario_for(source, address, port, uid=uid, gid=uid if gid is None else gid,
                                protocol=protocol, expect=expect)
        return runner.run_one(lab, witnesses, scenario, sidecar_pod.profile if expect else None)

    return fire
