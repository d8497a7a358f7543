"""pytest fixtures for writing your own scenario tests against a real lab.

    @pytest.mark.istio_profile("istio-1.13")
    def test_app_to_remote_service(traced_request):
        result = traced_request("sidecar", "10.96.0.90", 9080, uid=1000)
        assert result.rule_hits[1:3] == ["ISTIO_OUTPUT#9", "ISTIO_REDIRECT#1"]

Fixtures: `istio_lab` (a lab.world.Lab with its processes up), `sidecar_pod` (its
sidecar pod and rule profile) and `traced_request` (fire one flow, get its
lab.result.Result).  The profile comes from `@pytest.mark.istio_profile(NAME)` or from
parametrizing `sidecar_pod` indirectly; default istio-1.13.  One lab per profile serves
the whole session and is torn down at its end.  Needs root: without it the tests skip
(they fail instead with ISTIO_LAB_REQUIRE_KERNEL=1).

Loaded through the `pytest11` entry point by every pytest run in the environment, so this
module imports nothing of the lab until a fixture is used: the imports inside functions
here are on purpose.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import pytest

MARKER = "istio_profile"
DEFAULT_PROFILE = "istio-1.13"  # lab.rules.profiles.DEFAULT, without importing it here


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
    """One lab per profile, brought up on first use (a lab.api.Session)."""

    def __init__(self):
        self.sessions: dict[str, Any] = {}  # profile -> lab.api.Session

    def get(self, profile: str):
        if profile not in self.sessions:
            self.sessions[profile] = self._bring_up(profile)
        return self.sessions[profile]

    @staticmethod
    def _bring_up(profile: str):
        from lab import api, preflight
        from lab.errors import LabError
        from lab.rules import ruleset

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
            rules = ruleset.profile(profile)
        except LabError as e:  # failed outside the handler: no "During handling" chain in the report
            unknown = str(e)
        if unknown:
            pytest.fail(f"@pytest.mark.{MARKER}: {unknown}", pytrace=False)
        return api.Session(rules).open()

    def close(self) -> None:
        for session in self.sessions.values():
            session.close()
        self.sessions.clear()


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
    lab = _istio_labs.get(profile).lab
    pod = lab.pod("sidecar")
    return SidecarPod(pod.name, pod.ns, pod.ip, profile, lab)


@pytest.fixture
def istio_lab(sidecar_pod: SidecarPod):
    """A lab.world.Lab with Istio's rules in the sidecar pod and every process up."""
    return sidecar_pod.lab


@pytest.fixture
def traced_request(sidecar_pod: SidecarPod, _istio_labs: _Labs):
    """fire(source_pod, address, port, *, uid=1000, gid=uid, protocol="http", expect="") -> Result.

    Sends one flow (protocol "http": one GET; "tcp": a stream opened and half-closed) from
    the pod as uid/gid, with TRACE on, and returns its lab.result.Result: `passed`,
    `measured_path` in the article's notation (pods named Local Pod, Remote Pod, Istiod,
    Prometheus), `rule_hits` ("ISTIO_OUTPUT#9", ...), `failure` (None, or why the flow was
    not measured), `agreement` with the article ("no claim": it says nothing about a flow of
    your own), `measurement` (legs, hops, counters, TRACE events) and `as_json()`.  With
    `expect` (a path), it passes only if the kernel took that path.
    """
    session = _istio_labs.get(sidecar_pod.profile)
    return session.request
