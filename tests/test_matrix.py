"""`istio-lab run --profile all` (and a,b,c): every profile's scenarios in one process, labs
side by side, one report.  Checked against the separate runs it stands for: each profile's
verdicts and paths in the matrix are the ones `istio-lab run --profile P` gives alone.

The matrix is run once (module fixture) with --json and --report; the separate runs once
each.  Faults (an interrupt, a killed harness, a killed worker) run in a sandbox
(tests/sandbox.py), so what they leave behind is theirs alone.  No test asserts a time.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from lab import matrix, scenario
from lab.rules import profiles

from .sandbox import GUARD, Sandbox

REPO = Path(__file__).resolve().parent.parent
CLI = [sys.executable, "-m", "lab.cli"]
EXIT_INTERRUPTED = (130, -signal.SIGINT)


def istio_lab(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, *args], cwd=REPO, capture_output=True, text=True, stdin=subprocess.DEVNULL,
                          timeout=GUARD)


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("matrix-report")


@pytest.fixture(scope="module")
def run_all(report) -> tuple[subprocess.CompletedProcess, dict]:
    done = istio_lab("run", "--profile", "all", "--json", "--report", str(report))
    return done, json.loads(done.stdout)  # --json: stdout holds the one document and nothing else


@pytest.fixture(scope="module")
def separate(run_all) -> dict[str, dict]:
    """Each profile of the matrix run on its own, as a user would before."""
    out = {}
    for name in run_all[1]["profiles"]:
        done = istio_lab("run", "--profile", name, "--json")
        assert done.returncode == 0, done.stderr
        out[name] = json.loads(done.stdout)
    return out


# -- the kernel ---------------------------------------------------------------------------


@pytest.mark.kernel
def test_every_verdict_passes_and_the_run_says_so(run_all):
    done, doc = run_all
    assert done.returncode == 0, done.stderr
    assert doc["passed"] == doc["total"] == len(doc["scenarios"]) > 0
    assert all(r["verdict"] == "pass" for r in doc["scenarios"])
    assert doc["labs"] >= len(doc["profiles"])


@pytest.mark.kernel
def test_every_result_names_its_profile(run_all):
    _, doc = run_all
    assert {r["profile"] for r in doc["scenarios"]} == set(doc["profiles"])
    assert doc["profiles"] == [p for p in profiles.profiles() if p in doc["profiles"]]  # in profiles.yaml's order


@pytest.mark.kernel
def test_a_profile_left_out_says_why(run_all):
    """Every profile there is runs, or is named with the reason it was left out."""
    _, doc = run_all
    left_out = {line.split(":", 1)[0] for line in doc["left_out"] if ": left out: " in line}
    assert set(profiles.profiles()) == set(doc["profiles"]) | left_out
    assert not set(doc["profiles"]) & left_out
    if doc["backend"] == "legacy":  # native nftables rules cannot go through legacy xtables
        assert {p for p in profiles.profiles() if profiles.get(p).native_nftables} <= left_out


@pytest.mark.kernel
def test_each_profile_takes_the_paths_it_takes_alone(run_all, separate):
    _, doc = run_all
    for name, alone in separate.items():
        together = {r["id"]: (r["verdict"], r["measured_path"], r["rule_hits"])
                    for r in doc["scenarios"] if r["profile"] == name}
        assert together == {r["id"]: (r["verdict"], r["measured_path"], r["rule_hits"]) for r in alone["scenarios"]}, name


@pytest.mark.kernel
def test_the_page_links_every_diagram(run_all, report):
    _, doc = run_all
    index = (report / "index.html").read_text()
    for r in doc["scenarios"]:
        assert f'href="{r["profile"]}.html#{r["id"]}"' in index, (r["profile"], r["id"])
    for name in doc["profiles"]:
        page = (report / f"{name}.html").read_text()
        sections = dict(re.findall(r'<section class="scenario" id="([^"]+)">(.*?)</section>', page, re.S))
        for r in (r for r in doc["scenarios"] if r["profile"] == name):
            assert "<svg" in sections[r["id"]], (name, r["id"])  # the measured path, drawn


@pytest.mark.kernel
def test_the_summary_is_the_matrix(run_all, report):
    _, doc = run_all
    summary = (report / "summary.md").read_text()
    header = next(line for line in summary.splitlines() if line.startswith("| scenario |"))
    assert [cell.strip() for cell in header.strip("|").split("|")][1:] == [p.removeprefix("istio-") for p in doc["profiles"]]
    for r in doc["scenarios"]:
        assert f"| `{r['id']}` |" in summary


@pytest.mark.kernel
def test_the_terminal_report_is_the_table(run_all):
    _, doc = run_all
    some = doc["profiles"][:2]
    done = istio_lab("run", "--profile", ",".join(some), "type2-local-to-remote")
    assert done.returncode == 0, done.stderr
    row = next(line for line in done.stdout.splitlines() if "type2-local-to-remote " in line and "│" in line)
    assert row.count("pass") == 2
    assert "Paths by profile" in done.stdout


@pytest.mark.kernel
def test_one_failing_verdict_fails_the_run_and_only_its_cell(tmp_path):
    """A scenario whose recorded path under istio-1.4 is wrong: that cell fails, exit 1."""
    source = yaml.safe_load((scenario.SCENARIO_DIR / "type2-local-to-remote.yaml").read_text())
    source["expected"]["profiles"]["istio-1.4"] = source["expected"]["path"]  # 1.4's rules are numbered otherwise
    (tmp_path / "type2-local-to-remote.yaml").write_text(yaml.safe_dump(source, sort_keys=False))
    done = istio_lab("run", "--profile", "istio-1.4,istio-1.13", "--scenarios", str(tmp_path), "--json")
    assert done.returncode == 1, done.stderr
    verdicts = {r["profile"]: r["verdict"] for r in json.loads(done.stdout)["scenarios"]}
    assert verdicts == {"istio-1.4": "fail", "istio-1.13": "pass"}


@pytest.mark.kernel
def test_a_named_profile_the_backend_cannot_run_is_an_error():
    native = [p for p in profiles.profiles() if profiles.get(p).native_nftables]
    if not native:
        pytest.fail("profiles.yaml has no native nftables profile to name")
    done = istio_lab("run", "--profile", f"istio-1.13,{native[0]}", "--backend", "legacy")
    assert done.returncode == 2
    assert done.stderr.startswith(f"istio-lab: --profile {native[0]}: ") and done.stderr.count("\n") == 1


# -- faults, in a sandbox -------------------------------------------------------------------


def _workers(harness: int) -> list[int]:
    found = []
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{entry}/stat") as f:
                name, rest = f.read().split("(", 1)[1].rsplit(")", 1)
        except (OSError, IndexError, ValueError):
            continue
        if name == matrix.WORKER and int(rest.split()[1]) == harness:
            found.append(int(entry))
    return found


def _until(what: str, check, proc: subprocess.Popen | None = None, deadline: float = GUARD, show=lambda: ""):
    end = time.monotonic() + deadline
    while not (got := check()):
        assert proc is None or proc.poll() is None, f"the harness ended before {what}: {proc.communicate()}"
        assert time.monotonic() < end, f"never saw {what} {show()}"
        time.sleep(0.002)
    return got


def _describe(pids: list[int]) -> list[str]:
    out = []
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                out.append(f"{pid} {f.read().split(')')[0].split('(')[1]} {open(f'/proc/{pid}/wchan').read()}")
        except OSError:
            pass
    return out


@pytest.mark.kernel
def test_labs_run_side_by_side_and_an_interrupt_tears_all_down():
    with Sandbox() as box:
        proc = box.popen("run", "--profile", "all", "--jobs", "3")
        _until("two labs at once", lambda: len(box.records()) >= 2, proc)
        os.kill(proc.pid, signal.SIGINT)
        out, err = proc.communicate(timeout=GUARD)
        assert proc.returncode in EXIT_INTERRUPTED, err
        assert "interrupted" in err
        assert box.leftovers() == {}


@pytest.mark.kernel
def test_a_killed_harness_takes_its_workers_and_their_labs_with_it():
    with Sandbox() as box:
        proc = box.popen("run", "--profile", "all", "--jobs", "2")
        _until("a lab", lambda: box.records(), proc)
        os.kill(proc.pid, signal.SIGKILL)
        proc.communicate(timeout=GUARD)
        _until("the workers tearing their labs down", lambda: not box.leftovers(), deadline=30,
               show=lambda: f"{box.leftovers()} {_describe(box.leftovers().get('processes', []))}")


@pytest.mark.kernel
def test_a_dead_worker_fails_its_lab_only():
    with Sandbox() as box:
        proc = box.popen("run", "--profile", "all", "--jobs", "2", "--json")
        victim = _until("a worker", lambda: _workers(proc.pid), proc)[0]
        _until("a lab", lambda: box.records(), proc)
        os.kill(victim, signal.SIGKILL)
        out, err = proc.communicate(timeout=GUARD)
        assert proc.returncode == 1, err
        doc = json.loads(out)
        failed = [r for r in doc["scenarios"] if r["verdict"] == "fail"]
        assert failed and all("killed by SIGKILL" in r["failure"] for r in failed)
        assert len({r["profile"] for r in failed}) == 1  # one lab: one profile's column
        assert {r["profile"] for r in doc["scenarios"]} == set(doc["profiles"])  # the others all ran
        assert box.leftovers() == {}  # its lab reaped


# -- bad input: one line, exit 2, before any lab ------------------------------------------


@pytest.mark.parametrize("args,says", [
    (("--profile", "istio-1.13,nosuch"), "no rule profile 'nosuch'"),
    (("--profile", "istio-1.13,"), "an empty name between commas"),
    (("--profile", "all", "--jobs", "0"), "--jobs 0: at least one lab at a time"),
    (("--jobs", "2"), "--jobs sets how many labs run side by side"),
])
def test_bad_input(args, says):
    done = istio_lab("run", *args)
    assert done.returncode == 2
    assert says in done.stderr and done.stderr.count("\n") == 1, done.stderr
