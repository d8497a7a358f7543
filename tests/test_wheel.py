"""The built wheel is the whole lab: installed into a fresh virtual environment outside the
checkout (the pinned build backend and dependencies from scripts/, the wheel with --no-deps),
`istio-lab list` and a run of scenarios work from there, under every Python 3.11 - 3.13
this machine has."""

from __future__ import annotations

import glob
import zipfile
import json
import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
LOCK = REPO / "scripts" / "requirements.lock"
BUILD_LOCK = REPO / "scripts" / "build-requirements.lock"  # what pip builds python-iptables' sdist with
MINORS = (11, 12, 13)


def _interpreters() -> dict[str, str]:
    """One working interpreter per Python 3.x this machine has (PATH, /usr/bin, pyenv's)."""
    candidates = [sys.executable]
    for minor in MINORS:
        candidates += [shutil.which(f"python3.{minor}") or "", f"/usr/bin/python3.{minor}"]
        candidates += sorted(glob.glob(os.path.expanduser(f"~/.pyenv/versions/3.{minor}.*/bin/python3.{minor}")))
    found = {}
    for exe in filter(None, candidates):
        try:
            done = subprocess.run([exe, "-c", "import sys, venv, ensurepip; print('%d.%d' % sys.version_info[:2])"],
                                  capture_output=True, text=True, timeout=30)
        except OSError:
            continue
        version = done.stdout.strip()
        if done.returncode == 0 and version in {f"3.{m}" for m in MINORS}:
            found.setdefault(version, exe)
    return found


INTERPRETERS = _interpreters()


# What a build leaves in a checkout, and what is not the project's source.
NOT_SOURCE = shutil.ignore_patterns(".git", ".venv", "build", "*.egg-info", "__pycache__", ".hypothesis",
                                    ".pytest_cache", "out", ".vagrant", "bench.json")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """Built from a copy of the source: setuptools builds in the tree it is given (build/), which
    would leave a directory in the checkout, and reuses what an earlier build left there (a
    module since renamed or removed would ride along in the wheel)."""
    source, out = tmp_path_factory.mktemp("source") / "lab", tmp_path_factory.mktemp("wheel")
    shutil.copytree(REPO, source, ignore=NOT_SOURCE)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(out), str(source)],
                   check=True, capture_output=True, timeout=300)
    (built,) = out.glob("istio_iptables_lab-*.whl")
    return built


def test_the_build_backend_is_pinned_alike_for_pip_wheel_and_for_setup() -> None:
    """pyproject.toml's [build-system] (pip wheel, isolated) and the build lock setup installs
    (with hashes) name one setuptools."""
    wanted = tomllib.loads((REPO / "pyproject.toml").read_text())["build-system"]["requires"]
    assert all("==" in w for w in wanted), wanted  # exact pins, not ranges PyPI can move under
    pins = {line.split(" ")[0] for line in BUILD_LOCK.read_text().splitlines() if "==" in line and not line.startswith(" ")}
    assert set(wanted) <= pins, (wanted, pins)


def test_the_wheel_carries_the_scenarios_the_profiles_and_every_module(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    modules = {str(f.relative_to(REPO)) for f in (REPO / "lab").rglob("*.py")}
    assert sorted(modules - set(names)) == []  # pyproject.toml lists the packages: a new one must be there
    assert sorted({n for n in names if n.endswith(".py")} - modules) == []  # and nothing the source no longer has
    for scenario in (REPO / "scenarios").glob("*.yaml"):
        assert f"lab/scenarios/{scenario.name}" in names
    assert "lab/rules/profiles.yaml" in names and "lab/rules/profiles/istio-1.13.rules" in names


@pytest.mark.kernel
@pytest.mark.parametrize("version", sorted(INTERPRETERS))
def test_the_installed_wheel_lists_and_runs_scenarios_outside_the_checkout(wheel, tmp_path, version):
    venv = tmp_path / "venv"
    subprocess.run([INTERPRETERS[version], "-m", "venv", str(venv)], check=True, timeout=120)
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "-q", "--disable-pip-version-check"]
    subprocess.run([*pip, "--require-hashes", "-r", str(BUILD_LOCK)], check=True, capture_output=True, timeout=120)
    subprocess.run([*pip, "--require-hashes", "--no-build-isolation", "-r", str(LOCK)], check=True,
                   capture_output=True, timeout=600)
    subprocess.run([*pip, "--no-deps", str(wheel)], check=True, capture_output=True, timeout=120)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    istio_lab = str(venv / "bin" / "istio-lab")
    listed = subprocess.run([istio_lab, "list"], cwd=elsewhere, capture_output=True, text=True, timeout=60)
    assert listed.returncode == 0, listed.stderr
    assert "type2-local-to-remote" in listed.stdout and "dns-udp" in listed.stdout
    ran = subprocess.run([istio_lab, "run", "--json", "type2-local-to-remote", "type6-sidecar-to-istiod"],
                         cwd=elsewhere, capture_output=True, text=True, timeout=120)
    assert ran.returncode == 0, ran.stderr
    document = json.loads(ran.stdout)
    assert [s["verdict"] for s in document["scenarios"]] == ["pass", "pass"]
    assert str(REPO) not in ran.stdout + ran.stderr, "the installed lab read something of the checkout"
