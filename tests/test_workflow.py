"""The GitHub Actions workflow, checked offline: GitHub's schema (check-jsonschema's
vendored copy), zizmor's security audit, and the promises it makes — a job per runner and
backend, root, pinned actions, read-only token, each job's result and report kept, its
matrix on the summary page — and .ci/run running the backends it is given."""

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


def test_it_is_a_matrix_of_runners_and_backends() -> None:
    data = _load(LAB)
    (job,) = data["jobs"].values()
    axes = job["strategy"]["matrix"]
    assert axes == {"os": ["ubuntu-22.04", "ubuntu-24.04"], "backend": ["legacy", "nft"]}
    assert job["strategy"]["fail-fast"] is False  # each runner and backend reports on its own
    assert job["runs-on"] == "${{ matrix.os }}"
    assert job["env"]["BACKEND"] == "${{ matrix.backend }}"  # to run steps through env, never a template in a script
    assert "${{" not in "".join(step.get("run", "") for step in job["steps"])


def test_each_job_tests_its_backend_and_runs_every_profile_as_root_and_keeps_what_they_say() -> None:
    data = _load(LAB)
    (job,) = data["jobs"].values()
    runs = [step.get("run", "") for step in job["steps"]]
    tests = 'sudo env ISTIO_LAB_CI_BACKENDS="$BACKEND" .ci/run'
    assert tests in runs  # ./scripts/test in CI mode, on this job's backend only: a skipped kernel test fails
    assert 'sudo ./scripts/istio-lab run --profile all --backend "$BACKEND" --json --report report > result.json' in runs
    summary = next(r for r in runs if "GITHUB_STEP_SUMMARY" in r)
    assert 'cat report/summary.md >> "$GITHUB_STEP_SUMMARY"' in summary
    assert "$RUNNER, $BACKEND backend" in summary  # four jobs' tables on one page: each says whose it is
    (upload,) = [s for s in job["steps"] if s.get("uses", "").startswith("actions/upload-artifact@")]
    assert upload["with"]["path"].split() == ["result.json", "report/"]
    assert upload["with"]["name"] == "istio-lab-result-${{ matrix.os }}-${{ matrix.backend }}"  # one per job
    later = job["steps"][runs.index(tests) + 1:]
    assert all(s.get("if") == "${{ !cancelled() }}" for s in later), "report even when a test failed"


@pytest.mark.parametrize("asked,ran", [("nft", ["nft"]), ("legacy", ["legacy"]), ("", ["legacy", "nft"])])
def test_ci_run_runs_the_backends_it_is_given(tmp_path: Path, asked: str, ran: list[str]) -> None:
    """.ci/run with a stand-in for ./scripts/test: the suite runs once per backend asked for."""
    (tmp_path / ".ci").mkdir()
    (tmp_path / "scripts").mkdir()
    (tmp_path / ".ci" / "run").write_text((REPO / ".ci" / "run").read_text())
    (tmp_path / ".ci" / "run").chmod(0o755)
    stub = tmp_path / "scripts" / "test"
    stub.write_text('#!/bin/sh\necho "suite on $ISTIO_LAB_BACKEND"\necho "istio-lab: 1 kernel test ran, none skipped"\n')
    stub.chmod(0o755)
    done = subprocess.run(["bash", str(tmp_path / ".ci" / "run")], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "ISTIO_LAB_CI_BACKENDS": asked})
    assert done.returncode == 0, done.stdout + done.stderr
    assert re.findall(r"^suite on (\w+)$", done.stdout, re.M) == ran


def test_ci_run_refuses_a_backend_it_does_not_know(tmp_path: Path) -> None:
    done = subprocess.run(["bash", str(REPO / ".ci" / "run")], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "ISTIO_LAB_CI_BACKENDS": "iptables"})
    assert done.returncode == 2 and "no backend 'iptables'" in done.stdout


def test_istio_lab_run_has_the_options_the_workflow_gives() -> None:
    usage = subprocess.run([sys.executable, "-m", "lab.cli", "run", "--help"], cwd=REPO, capture_output=True,
                           text=True, check=True).stdout
    assert "--json" in usage and "--report DIR" in usage and "--backend" in usage and "`all`" in usage


def test_ci_judges_predict_on_2000_flows_on_one_backend():
    """The differential kernel test's size in CI is what .ci/run exports, not a default."""
    text = (REPO / ".ci" / "run").read_text()
    assert "flows=2000" in text and 'export PREDICT_FLOWS="$flows"' in text
    assert text.index("flows=2000") < text.index("./scripts/test")
