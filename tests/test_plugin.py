"""The pytest plugin (lab/pytest_plugin.py), used as its users use it: pytest in a directory of
their own, with the fixtures coming through the installed `pytest11` entry point."""

from __future__ import annotations

import importlib.metadata
import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from lab import api
from lab.addr import Address
from lab.errors import LabError
from lab.pytest_plugin import DEFAULT_PROFILE
from lab.rules import profiles

REPO = Path(__file__).resolve().parent.parent
EXAMPLE = REPO / "docs" / "example_test.py"


def _pytest(where: Path, *args: str, prefix: list[str] = (), env: dict[str, str] | None = None):
    """pytest in `where`: no conftest and no ini file of this project apply there."""
    env = {k: v for k, v in (env or os.environ).items() if not k.startswith("PYTEST_")}
    return subprocess.run([*prefix, sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-rfEs", *args],
                          cwd=where, env=env, capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=300)


def test_the_entry_point_names_the_plugin() -> None:
    found = [ep for ep in importlib.metadata.entry_points(group="pytest11") if ep.value == "lab.pytest_plugin"]
    assert len(found) == 1, "pyproject.toml's [project.entry-points.pytest11] is not installed (run scripts/setup)"


def test_pytest_loads_it_from_anywhere(tmp_path: Path) -> None:
    result = _pytest(tmp_path, "--markers")
    assert "@pytest.mark.istio_profile(name)" in result.stdout, result.stdout + result.stderr


def test_importing_it_loads_nothing_of_the_lab() -> None:
    """Every pytest run in the venv imports it: the lab's modules wait until a fixture runs."""
    probe = ("import sys, lab.pytest_plugin; print(sorted(m for m in sys.modules "
             "if m.split('.')[0] in {'lab', 'iptc', 'pyroute2', 'scapy', 'rich', 'yaml'}))")
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "['lab', 'lab.pytest_plugin']"


def test_a_flow_of_your_own_names_pods_as_the_article_does() -> None:
    assert DEFAULT_PROFILE == profiles.DEFAULT  # kept apart to import nothing
    s = api.Flow("sidecar", Address("10.96.0.90", 9080), 1000, 1000).scenario()
    source = s.traffic.source
    assert (source.label, s.traffic.label, source.uid, source.gid) == ("Local Pod", "Remote Pod", 1000, 1000)
    assert api.Flow("sidecar", Address("127.0.0.1", 15000), 1337, 1337).scenario().traffic.label == "Local Pod"
    assert s.article is None and s.expected is None  # no claim, no expectation unless asked


@pytest.mark.parametrize("flow, expect, problem", [
    (api.Flow("nowhere", Address("10.96.0.90", 9080)), "", "no pod 'nowhere'"),
    (api.Flow("sidecar", Address("10.96.0.10", 53), protocol="dns"), "", "a DNS query needs the name it asks"),
    (api.Flow("sidecar", Address("10.96.0.10", 53), protocol="ftp"), "", "protocol 'ftp' is not one of http, tcp"),
    (api.Flow("sidecar", Address("10.96.0.90", 9080)), "A -> ??? -> B", "expect: cannot read hop '???'"),
])
def test_a_bad_flow_is_one_line(flow, expect, problem) -> None:
    with pytest.raises(LabError, match=re.escape(problem)):
        flow.scenario(expect)


@pytest.mark.kernel
def test_the_readme_example_passes_and_prints_its_agreement_and_json(tmp_path: Path) -> None:
    shutil.copy(EXAMPLE, tmp_path / EXAMPLE.name)
    result = _pytest(tmp_path, "-s", EXAMPLE.name)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 passed" in result.stdout
    assert "agreement: no claim\n" in result.stdout
    document = json.loads(next(line for line in result.stdout.splitlines() if line.startswith("{")))
    assert (document["verdict"], document["agreement"], document["matches_article"]) == ("pass", "no claim", None)
    assert document["rule_hits"] == ["OUTPUT#1", "ISTIO_OUTPUT#9", "ISTIO_REDIRECT#1", "OUTPUT#1", "ISTIO_OUTPUT#4"]
    assert document["profile"] == "istio-1.13" and document["counters_agree"]


USER_TESTS = textwrap.dedent('''
    import pytest

    @pytest.mark.parametrize("sidecar_pod", ["istio-1.13"], indirect=True)
    def test_indirect_profile(sidecar_pod, istio_lab, traced_request):
        assert (sidecar_pod.profile, sidecar_pod.ns) == ("istio-1.13", f"ilab-{istio_lab.labid}-sidecar")
        result = traced_request("remote", "10.244.0.10", 8080)
        assert result.rule_hits[:2] == ["PREROUTING#1", "ISTIO_INBOUND#5"], result.failure
        assert result.measurement.response.status == 200 and result.measurement.counters_agree

    def test_pilot_agent_to_istiod(traced_request):
        result = traced_request("sidecar", "10.244.0.30", 15012, uid=1337, protocol="tcp",
                                expect="Local Pod -> OUTPUT -> ISTIO_OUTPUT RULE 4 -> POSTROUTING -> Istiod")
        assert result.passed, result.failure or result.measured_path

    def test_one_lab_per_profile(istio_lab, sidecar_pod):
        assert sidecar_pod.lab is istio_lab

    @pytest.mark.istio_profile("no-such-profile")
    def test_unknown_profile(sidecar_pod):
        pass
''')


@pytest.mark.kernel
def test_fixtures_in_a_users_own_tests(tmp_path: Path) -> None:
    (tmp_path / "test_mine.py").write_text(USER_TESTS)
    result = _pytest(tmp_path, "-v")
    out = result.stdout + result.stderr
    assert "test_indirect_profile[istio-1.13] PASSED" in out, out
    assert "test_pilot_agent_to_istiod PASSED" in out, out
    assert "test_one_lab_per_profile PASSED" in out, out
    assert "\n@pytest.mark.istio_profile: no rule profile 'no-such-profile' (profiles: " in out, out
    assert "During handling" not in out, out
    assert "3 passed" in out and "1 error" in out, out


def test_without_root_the_fixtures_skip_or_fail(tmp_path: Path) -> None:
    """Skip with the reason; under ISTIO_LAB_REQUIRE_KERNEL=1 (CI), fail instead."""
    prefix = []
    if os.geteuid() == 0:  # a user namespace with no uid map: euid 65534 there
        probe = subprocess.run(["unshare", "--user", "id", "-u"], capture_output=True, text=True)
        if probe.returncode != 0 or probe.stdout.strip() == "0":
            pytest.skip(f"cannot drop root here: {probe.stderr.strip() or probe.stdout.strip()}")
        prefix = ["unshare", "--user"]
    shutil.copy(EXAMPLE, tmp_path / EXAMPLE.name)
    env = {k: v for k, v in os.environ.items() if k != "ISTIO_LAB_REQUIRE_KERNEL"}
    skipped = _pytest(tmp_path, EXAMPLE.name, prefix=prefix, env=env)
    assert "1 skipped" in skipped.stdout, skipped.stdout + skipped.stderr
    assert "istio-lab needs root" in skipped.stdout
    failed = _pytest(tmp_path, EXAMPLE.name, prefix=prefix, env={**env, "ISTIO_LAB_REQUIRE_KERNEL": "1"})
    assert failed.returncode == 1 and "1 error" in failed.stdout, failed.stdout + failed.stderr
