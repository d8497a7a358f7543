"""The Vagrant VM, as far as it can be checked without a hypervisor: the Vagrantfile
passes `vagrant validate`, and scripts/provision sets up a fresh copy of the repository
from nothing (a new .venv) and then has nothing left to do."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PROVISION = REPO / "scripts" / "provision"
VAGRANTFILE = REPO / "Vagrantfile"
# What a fresh clone does not have: made by set-up, tests and vagrant.
NOT_COPIED = shutil.ignore_patterns(".git", ".venv", ".vagrant", ".pytest_cache", "__pycache__", "*.egg-info",
                                    "build", "out")


def test_provision_is_strict_executable_bash() -> None:
    lines = PROVISION.read_text().splitlines()
    assert lines[0] == "#!/usr/bin/env bash" and "set -euo pipefail" in lines
    assert PROVISION.stat().st_mode & 0o111 == 0o111, f"{PROVISION} is {stat.filemode(PROVISION.stat().st_mode)}"
    result = subprocess.run(["bash", "-n", str(PROVISION)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_the_vagrantfile_provisions_with_the_script() -> None:
    text = VAGRANTFILE.read_text()
    assert 'config.vm.provision "shell", inline: "/vagrant/scripts/provision"' in text
    assert '".venv/"' in text  # the host's venv must not reach the VM


# --------------------------------------------------------------- vagrant validate
@pytest.fixture(scope="module")
def vagrant() -> str:
    """Debian's vagrant, installed on first use (about 20 s and 60 packages, ruby among them)."""
    found = shutil.which("vagrant")
    if found:
        return found
    if os.geteuid() != 0:
        pytest.skip("vagrant is not installed, and installing it needs root")

    def install() -> subprocess.CompletedProcess:
        return subprocess.run(["apt-get", "install", "-y", "-q", "--no-install-recommends",
                               "-o", "DPkg::Lock::Timeout=600", "vagrant"],
                              env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"},
                              capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=900)

    print("test_vagrant: vagrant not found: apt-get install -y --no-install-recommends vagrant")
    result = install()
    if result.returncode != 0:  # stale or missing package lists on a fresh machine
        print("test_vagrant: apt-get update, then again")
        subprocess.run(["apt-get", "update", "-q", "-o", "DPkg::Lock::Timeout=600"], capture_output=True,
                       stdin=subprocess.DEVNULL, timeout=900)
        policy = subprocess.run(["apt-cache", "policy", "vagrant"], capture_output=True, text=True).stdout
        if "Candidate: (none)" in policy or not policy.strip():
            pytest.skip("this distribution has no vagrant package (apt-cache policy vagrant)")
        result = install()
    assert result.returncode == 0, f"apt-get install vagrant failed:\n{result.stdout[-3000:]}{result.stderr}"
    return shutil.which("vagrant") or pytest.fail("apt-get installed vagrant, but it is not on PATH")


def _validate(vagrant: str, vagrantfile_dir: Path, tmp_path: Path, *args: str, **extra_env: str):
    """`vagrant validate` with every file Vagrant writes kept in tmp_path, and no update check."""
    env = {**os.environ, "VAGRANT_CWD": str(vagrantfile_dir), "VAGRANT_HOME": str(tmp_path / "vagrant.d"),
           "VAGRANT_DOTFILE_PATH": str(tmp_path / "dot"), "VAGRANT_CHECKPOINT_DISABLE": "1", **extra_env}
    return subprocess.run([vagrant, "validate", *args], cwd=tmp_path, env=env, capture_output=True,
                          text=True, stdin=subprocess.DEVNULL, timeout=300)


def test_vagrant_validates_the_vagrantfile(vagrant: str, tmp_path: Path) -> None:
    """Without a provider here, --ignore-provider checks everything but the provider blocks."""
    result = _validate(vagrant, REPO, tmp_path, "--ignore-provider")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Vagrantfile validated successfully." in result.stdout
    assert not (REPO / ".vagrant").exists(), "vagrant validate wrote into the repository"


def test_vagrant_validates_the_virtualbox_block(vagrant: str, tmp_path: Path) -> None:
    """VirtualBox is not installed here: a VBoxManage that only tells its version is
    enough for Vagrant to accept the provider and validate `config.vm.provider "virtualbox"`."""
    stub = tmp_path / "bin" / "VBoxManage"
    stub.parent.mkdir()
    stub.write_text("#!/bin/sh\necho 7.0.14r161095\n")
    stub.chmod(0o755)
    path = f"{stub.parent}{os.pathsep}{os.environ.get('PATH', '')}"
    result = _validate(vagrant, REPO, tmp_path, PATH=path, VAGRANT_DEFAULT_PROVIDER="virtualbox")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Vagrantfile validated successfully." in result.stdout


def test_vagrant_validate_catches_a_broken_vagrantfile(vagrant: str, tmp_path: Path) -> None:
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "Vagrantfile").write_text(VAGRANTFILE.read_text().replace("config.vm.box =", "config.vm.boxx ="))
    result = _validate(vagrant, broken, tmp_path, "--ignore-provider")
    assert result.returncode != 0
    assert "The following settings shouldn't exist: boxx" in result.stdout + result.stderr


# --------------------------------------------------------------- scripts/provision
@pytest.mark.kernel
def test_provision_sets_up_a_fresh_copy_then_has_nothing_to_do(tmp_path: Path) -> None:
    """A copy of the repository without .venv, provisioned twice, as `vagrant up` and
    `vagrant provision` would: the first run creates .venv and installs the project,
    the second installs nothing, and both end with preflight passing."""
    copy = tmp_path / "istio-iptables-lab"
    shutil.copytree(REPO, copy, ignore=NOT_COPIED, symlinks=True)
    try:
        runs = []
        for _ in range(2):
            result = subprocess.run([str(copy / "scripts" / "provision")], cwd=tmp_path, capture_output=True,
                                    text=True, stdin=subprocess.DEVNULL, timeout=1800)
            assert result.returncode == 0, f"stdout:\n{result.stdout}\nstderr:\n{result.stderr}"
            runs.append(result.stdout.splitlines())
        first, second = runs
        assert "setup: creating .venv with" in "\n".join(first)
        assert any(line.startswith("setup: installed istio-iptables-lab ") for line in first), first
        assert not [line for line in second if "install" in line and "already installed" not in line], second
        assert any(line.startswith("setup: .venv already present") for line in second), second
        for run in runs:
            assert "istio-lab: this machine can run the lab" in " ".join(run), run
            assert run[-1].startswith("provision: ready"), run
        installed = subprocess.run([str(copy / ".venv" / "bin" / "istio-lab"), "list"], capture_output=True,
                                   text=True, check=True).stdout
        assert "type1-remote-to-local" in installed
    finally:
        shutil.rmtree(copy, ignore_errors=True)  # a venv is a few hundred MB
