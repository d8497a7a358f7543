"""The set-up scripts, the CI runner and the test-suite plumbing (tests/conftest.py)."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
import textwrap
import uuid
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SCRIPTS = ["scripts/setup", "scripts/istio-lab", "scripts/test", ".ci/run"]
CONFTEST = Path(__file__).resolve().parent / "conftest.py"


# --------------------------------------------------------------- the scripts
@pytest.mark.parametrize("script", SCRIPTS)
def test_script_parses(script: str) -> None:
    result = subprocess.run(
        ["bash", "-n", str(REPO / script)], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("script", SCRIPTS)
def test_script_is_executable(script: str) -> None:
    mode = (REPO / script).stat().st_mode
    assert mode & 0o111 == 0o111, f"{script} is {stat.filemode(mode)}; chmod +x it"


@pytest.mark.parametrize("script", SCRIPTS)
def test_script_is_strict_bash(script: str) -> None:
    lines = (REPO / script).read_text().splitlines()
    assert lines[0] == "#!/usr/bin/env bash"
    assert "set -euo pipefail" in lines


def _as_non_root() -> list[str]:
    """A command prefix that runs its command with a non-zero euid."""
    if os.geteuid() != 0:
        return []
    # A new user namespace without a uid map: euid 65534 there, while files
    # owned by root (the repo, the venv's Python under /root) stay readable.
    probe = subprocess.run(["unshare", "--user", "id", "-u"], capture_output=True, text=True)
    if probe.returncode != 0 or probe.stdout.strip() == "0":
        pytest.skip(f"cannot drop root here (unshare --user: {probe.stderr.strip() or probe.stdout.strip()})")
    return ["unshare", "--user"]


def test_setup_refuses_to_run_without_root() -> None:
    result = subprocess.run(
        [*_as_non_root(), str(REPO / "scripts/setup")],
        capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=60,
    )
    assert result.returncode == 2, result
    assert result.stdout == "setup: run me as root (sudo scripts/setup)\n"


@pytest.mark.kernel
def test_setup_is_idempotent(tmp_path: Path) -> None:
    """Run scripts/setup twice (from an unrelated directory): the second run
    installs nothing and is quick."""
    outputs = []
    for _ in range(2):
        result = subprocess.run(
            [str(REPO / "scripts/setup")], cwd=tmp_path,
            capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=1800,
        )
        assert result.returncode == 0, f"stdout:\n{result.stdout}\nstderr:\n{result.stderr}"
        outputs.append(result.stdout)
    second = outputs[1].splitlines()
    assert not [line for line in second if "installing" in line.lower()], outputs[1]
    assert "setup: iptables already installed" in second
    assert "setup: iproute2 already installed" in second
    assert any(line.startswith("setup: .venv already present") for line in second), outputs[1]
    assert "setup: istio-iptables-lab already installed in .venv (pyproject.toml unchanged)" in second


# --------------------------------------------------------------- conftest.py
def _run_inner_session(
    tmp_path: Path, test_source: str, *, require: bool, prefix: list[str] = ()
) -> subprocess.CompletedProcess:
    """Run a separate pytest session over `test_source` with a copy of
    tests/conftest.py and the kernel marker declared."""
    (tmp_path / "conftest.py").write_text(CONFTEST.read_text())
    (tmp_path / "pytest.ini").write_text(
        "[pytest]\nmarkers =\n    kernel: needs root\n"
    )
    (tmp_path / "test_inner.py").write_text(textwrap.dedent(test_source))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST_", "ISTIO_LAB_"))}
    if require:
        env["ISTIO_LAB_REQUIRE_KERNEL"] = "1"
    result = subprocess.run(
        [*prefix, sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-rs", str(tmp_path)],
        cwd=tmp_path, env=env, capture_output=True, text=True,
        stdin=subprocess.DEVNULL, timeout=300,
    )
    print(result.stdout, result.stderr)  # shown when the outer test fails
    return result


# A root inner session runs alone: in its own network, PID and mount namespaces, with
# an empty /run/netns.  Its conftest snapshots "the host" at start and end, and must not
# see the labs of the tests running alongside it (pytest -n) come and go.
ALONE = ["unshare", "--net", "--pid", "--fork", "--mount-proc", "sh", "-ec",
         'mkdir -p /run/netns; mount -t tmpfs ilab-inner /run/netns; exec "$@"', "sh"]

INNER_KERNEL_TEST = """
    import pytest

    @pytest.mark.kernel
    def test_needs_the_kernel():
        pass

    def test_plain():
        pass
"""


def test_kernel_tests_are_skipped_without_root(tmp_path: Path) -> None:
    result = _run_inner_session(tmp_path, INNER_KERNEL_TEST, require=False, prefix=_as_non_root())
    assert result.returncode == 0
    assert "1 passed, 1 skipped" in result.stdout
    assert "needs root (run with sudo)" in result.stdout


def test_kernel_tests_fail_without_root_in_require_mode(tmp_path: Path) -> None:
    result = _run_inner_session(tmp_path, INNER_KERNEL_TEST, require=True, prefix=_as_non_root())
    assert result.returncode == 1
    assert "skipped" not in result.stdout.splitlines()[-1]
    assert "needs root (run with sudo)" in result.stdout


@pytest.mark.kernel
def test_require_mode_confirms_kernel_tests_ran(tmp_path: Path) -> None:
    result = _run_inner_session(tmp_path, INNER_KERNEL_TEST, require=True, prefix=ALONE)
    assert result.returncode == 0
    assert "istio-lab: 1 kernel test ran, none skipped (ISTIO_LAB_REQUIRE_KERNEL=1)" in result.stdout


@pytest.mark.kernel
@pytest.mark.parametrize("require", [False, True])
def test_require_mode_fails_on_a_skipped_kernel_test(tmp_path: Path, require: bool) -> None:
    source = """
        import pytest

        @pytest.mark.kernel
        def test_gives_up():
            pytest.skip("no legacy xtables here")

        @pytest.mark.kernel
        def test_fine():
            pass
    """
    result = _run_inner_session(tmp_path, source, require=require, prefix=ALONE)
    if not require:
        assert result.returncode == 0
        return
    assert result.returncode == 1
    assert "ISTIO_LAB_REQUIRE_KERNEL=1 but kernel tests were skipped" in result.stdout
    assert "SKIPPED kernel test test_inner.py::test_gives_up: no legacy xtables here" in result.stdout


@pytest.mark.kernel
def test_leftovers_fail_the_session(tmp_path: Path) -> None:
    """A session that leaves a netns, a uid-1337 process and an ISTIO chain
    behind fails and names them.  The inner session runs ALONE, so its "host"
    iptables, its /run/netns and its uid-1337 process vanish with it."""
    for tool in ("unshare", "ip", "setpriv", "iptables-legacy"):
        if shutil.which(tool) is None:
            pytest.fail(f"{tool} not found")
    name = f"ilab-conftest-{uuid.uuid4().hex[:8]}"
    source = f"""
        import subprocess
        import time

        def test_leaks():
            subprocess.run(["ip", "netns", "add", "{name}"], check=True)
            leak = subprocess.Popen(["setpriv", "--reuid=1337", "--regid=1337", "--clear-groups",
                                     "sleep", "600"], start_new_session=True)
            # until setpriv has exec'd sleep: the session's check names what it finds then
            deadline = time.monotonic() + 10
            while b"sleep" not in open(f"/proc/{{leak.pid}}/cmdline", "rb").read() and time.monotonic() < deadline:
                time.sleep(0.01)
            subprocess.run(["iptables-legacy", "-t", "nat", "-N", "ISTIO_LEAK"], check=True)
    """
    result = _run_inner_session(tmp_path, source, require=True, prefix=ALONE)
    assert result.returncode == 1
    out = result.stdout
    assert "1 passed" in out
    assert "istio-lab: the test session left things behind" in out
    assert f"    {name}" in out
    assert "processes running as uid 1337" in out and "sleep 600" in out
    assert "iptables-legacy-save: table nat: chain ISTIO_LEAK" in out
