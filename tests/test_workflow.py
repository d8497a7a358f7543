"""The GitHub Actions workflow, checked offline: GitHub's schema (check-jsonschema's
vendored copy), zizmor's security audit, and the promises it makes — root, pinned
actions, read-only token, the result and report kept, the table on the summary page."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
WORKFLOWS = sorted((REPO / ".github" / "workflows").glob("*.yml"))
LAB = REPO / ".github" / "workflows" / "lab.yml"
BIN = Path(sys.executable).parent  # check-jsonschema and zizmor come with the `test` extra
PINNED = re.compile(r"^[\w.-]+/[\w.-]+(/[\w./-]+)?@[0-9a-f]{40}$")


def _offline(argv: list[str]) -> subprocess.CompletedProcess:
    """Run with no network at all when we can (a fresh network namespace), to prove the check needs none."""
    prefix = ["unshare", "--net"] if os.geteuid() == 0 else []
    return subprocess.run([*prefix, *argv], capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=300)


def _load(path: Path) -> dict:
    data = yaml.safe_load(path.read_text())
    data["on"] = data.pop(True, data.get("on"))  # YAML 1.1 reads a bare `on` as true
    return data


def _steps(data: dict) -> list[dict]:
    return [step for job in data["jobs"].values() for step in job.get("steps", [])]


def test_there_is_a_workflow() -> None:
    assert LAB in WORKFLOWS


@pytest.mark.parametrize("workflow", WORKFLOWS, ids=lambda p: p.name)
def test_github_schema_accepts_it(workflow: Path) -> None:
    result = _offline([str(BIN / "check-jsonschema"), "--builtin-schema", "vendor.github-workflows", str(workflow)])
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("workflow", WORKFLOWS, ids=lambda p: p.name)
def test_zizmor_finds_nothing(workflow: Path) -> None:
    result = _offline([str(BIN / "zizmor"), "--offline", "--persona", "pedantic", str(workflow)])
    assert result.returncode == 0, result.stdout + result.stderr
    assert "No findings to report" in result.stdout


def test_zizmor_would_catch_an_unpinned_action_and_a_persisted_token(tmp_path: Path) -> None:
    """The audit is not a formality: undo two of the workflow's protections and it objects."""
    text = LAB.read_text()
    text = re.sub(r"(actions/checkout)@[0-9a-f]{40}", r"\1@main", text)
    text = text.replace("persist-credentials: false", "fetch-depth: 1")
    bad = tmp_path / "lab.yml"
    bad.write_text(text)
    result = _offline([str(BIN / "zizmor"), "--offline", "--format", "json", str(bad)])
    assert result.returncode != 0
    assert {"unpinned-uses", "artipacked"} <= {finding["ident"] for finding in json.loads(result.stdout)}


@pytest.mark.parametrize("workflow", WORKFLOWS, ids=lambda p: p.name)
def test_least_privilege(workflow: Path) -> None:
    data = _load(workflow)
    triggers = data["on"] if isinstance(data["on"], (dict, list)) else [data["on"]]
    assert "pull_request_target" not in triggers and "workflow_run" not in triggers
    assert data["permissions"] == {"contents": "read"}
    for name, job in data["jobs"].items():
        assert job.get("permissions", data["permissions"]) == {"contents": "read"}, name
    for step in _steps(data):
        if "uses" in step:
            assert PINNED.match(step["uses"]), f"{step['uses']}: pin actions by full commit SHA"
        if step.get("uses", "").startswith("actions/checkout@"):
            assert step["with"]["persist-credentials"] is False
    assert "# v" in workflow.read_text(), "say which release each pinned SHA is"


def test_it_runs_the_tests_and_the_scenarios_as_root_and_keeps_what_they_say() -> None:
    data = _load(LAB)
    (job,) = data["jobs"].values()
    assert job["runs-on"].startswith("ubuntu-")
    runs = [step.get("run", "") for step in job["steps"]]
    assert "sudo .ci/run" in runs  # ./scripts/test in CI mode: a skipped kernel test fails
    assert "sudo ./scripts/istio-lab run --json --report report > result.json" in runs
    native = next(r for r in runs if "istio-1.27-nft-tproxy" in r)  # Istio's native nftables profiles too
    assert all(p in native for p in ("istio-1.27-nft ", "istio-1.27-nft-dns", "istio-1.27-nft-ipv6"))
    summary = next(r for r in runs if "GITHUB_STEP_SUMMARY" in r)
    assert 'cat report/summary.md >> "$GITHUB_STEP_SUMMARY"' in summary
    (upload,) = [s for s in job["steps"] if s.get("uses", "").startswith("actions/upload-artifact@")]
    assert upload["with"]["path"].split() == ["result.json", "report/"]
    later = job["steps"][[s.get("run") for s in job["steps"]].index("sudo .ci/run") + 1:]
    assert all(s.get("if") == "${{ !cancelled() }}" for s in later), "report even when a test failed"


def test_istio_lab_run_has_the_options_the_workflow_gives() -> None:
    usage = subprocess.run([sys.executable, "-m", "lab.cli", "run", "--help"], cwd=REPO, capture_output=True,
                           text=True, check=True).stdout
    assert "--json" in usage and "--report DIR" in usage


def test_ci_judges_predict_on_2000_flows_on_one_backend():
    """The differential kernel test's size in CI is what .ci/run exports, not a default."""
    text = (REPO / ".ci" / "run").read_text()
    assert "flows=2000" in text and 'export PREDICT_FLOWS="$flows"' in text
    assert text.index("flows=2000") < text.index("./scripts/test")
