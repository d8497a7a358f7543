"""Test-suite plumbing for istio-iptables-lab.

* Tests marked ``@pytest.mark.kernel`` need root (network namespaces, legacy
  xtables).  Without root they are skipped with the reason "needs root (run with
  sudo)" -- unless ``ISTIO_LAB_REQUIRE_KERNEL=1`` (CI), where they fail with that
  reason instead, and where the session fails if any kernel test ends up
  skipped for any reason (e.g. a ``pytest.skip`` inside the test).
* When run as root, the session fails if the suite left anything behind: a
  network namespace named ``ilab-*`` (in /run/netns), a process running as uid
  1337, an ``ISTIO*`` chain in the host namespace's legacy iptables, or the
  pytest process itself sitting in another network namespace than it started
  in.  Only what appeared during the session counts; what was already there at
  the start is reported as a warning.
* Under pytest-xdist (``-n 4``) the controller does both: it takes the snapshots
  before the workers start and after they end, and counts the kernel tests from
  the reports the workers send it.
"""

from __future__ import annotations

import dataclasses
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

NEEDS_ROOT = "needs root (run with sudo)"
REQUIRE_ENV = "ISTIO_LAB_REQUIRE_KERNEL"
NETNS_DIR = Path("/run/netns")
NETNS_PREFIX = "ilab-"
PROXY_UID = 1337
CHAIN_PREFIX = "ISTIO"


def require_kernel() -> bool:
    return os.environ.get(REQUIRE_ENV, "") == "1"


def is_root() -> bool:
    return os.geteuid() == 0


# --------------------------------------------------------------- bookkeeping
@dataclasses.dataclass
class _State:
    kernel_ids: set[str] = dataclasses.field(default_factory=set)
    kernel_ran: set[str] = dataclasses.field(default_factory=set)
    kernel_skipped: dict[str, str] = dataclasses.field(default_factory=dict)
    baseline: dict[str, dict[str, str]] | None = None
    start_netns: str = "?"
    leftovers: dict[str, list[str]] = dataclasses.field(default_factory=dict)
    preexisting: dict[str, list[str]] = dataclasses.field(default_factory=dict)
    notes: list[str] = dataclasses.field(default_factory=list)


_STATE = pytest.StashKey[_State]()


def _state(config: pytest.Config) -> _State:
    if _STATE not in config.stash:
        config.stash[_STATE] = _State()
    return config.stash[_STATE]


# --------------------------------------------------------------- leftovers
# Each probe returns {key: description}; keys identify a thing across the two
# snapshots (start and end of the session), descriptions are what is printed.
def _netns_names() -> dict[str, str]:
    try:
        names = [p.name for p in NETNS_DIR.iterdir() if p.name.startswith(NETNS_PREFIX)]
    except FileNotFoundError:
        return {}
    return {name: name for name in names}


def _proxy_uid_processes() -> dict[str, str]:
    """Processes with uid 1337 as real, effective, saved or filesystem uid."""
    found = {}
    for status in Path("/proc").glob("[0-9]*/status"):
        proc = status.parent
        try:
            fields = dict(
                line.split(":", 1) for line in status.read_text().splitlines() if ":" in line
            )
            start = proc.joinpath("stat").read_text().rsplit(")", 1)[1].split()[19]
        except (OSError, IndexError):  # the process exited meanwhile
            continue
        uids = fields.get("Uid", "").split()
        if str(PROXY_UID) not in uids:
            continue
        name = fields.get("Name", "?").strip()
        try:
            cmd = proc.joinpath("cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
        except OSError:
            cmd = ""
        state = fields.get("State", "?").strip().rpartition("(")[2].rstrip(")") or "?"
        found[f"{proc.name}@{start}"] = (
            f"pid {proc.name}: {cmd or '[' + name + ']'} ({state}; uids {' '.join(uids)})"
        )
    return found


def _istio_chains(notes: list[str]) -> dict[str, str]:
    """ISTIO* chains in this (the host's) network namespace, legacy xtables and iptables-nft,
    and nf_tables tables of Istio's (`istio-proxy-*`) or the lab's (`ilab-*`)."""
    found = {}
    nft = shutil.which("nft")
    if nft:
        tables = subprocess.run([nft, "list", "tables"], capture_output=True, text=True, timeout=60,
                                stdin=subprocess.DEVNULL).stdout
        for line in tables.splitlines():
            if "istio" in line or " ilab-" in line:
                found[f"nft: {line.strip()}"] = f"nft: {line.strip()}"
    for tool in ("iptables-legacy-save", "ip6tables-legacy-save", "iptables-nft-save", "ip6tables-nft-save"):
        exe = shutil.which(tool) or next(
            (p for p in (f"/usr/sbin/{tool}", f"/sbin/{tool}") if os.access(p, os.X_OK)), None
        )
        if exe is None:
            continue
        try:
            out = subprocess.run(
                [exe], capture_output=True, text=True, timeout=60, check=True,
                stdin=subprocess.DEVNULL,
            ).stdout
        except (OSError, subprocess.SubprocessError) as exc:
            notes.append(f"could not run {tool}: {exc}")
            continue
        table = "?"
        for line in out.splitlines():
            if line.startswith("*"):
                table = line[1:].strip()
            m = re.match(r":(\S+)", line)
            if m and m.group(1).startswith(CHAIN_PREFIX):
                entry = f"{tool}: table {table}: chain {m.group(1)}"
                found[entry] = entry
    return found


def _own_netns() -> str:
    """The network namespace of the thread running the session."""
    try:
        return f"net:[{os.stat('/proc/thread-self/ns/net').st_ino}]"
    except OSError:
        return "?"


def _snapshot(notes: list[str]) -> dict[str, dict[str, str]]:
    return {
        f"network namespaces named {NETNS_PREFIX}* in {NETNS_DIR}": _netns_names(),
        f"processes running as uid {PROXY_UID}": _proxy_uid_processes(),
        f"{CHAIN_PREFIX}* chains and Istio's or the lab's nft tables in the host namespace": _istio_chains(notes),
    }


# --------------------------------------------------------------- hooks
def pytest_report_header(config: pytest.Config) -> str:
    mode = (
        f"{REQUIRE_ENV}=1: kernel tests must run (never skipped)"
        if require_kernel()
        else f"kernel tests {'run' if is_root() else 'skipped: ' + NEEDS_ROOT}"
    )
    return f"istio-lab: uid {os.geteuid()}; {mode}"


def _become_subreaper() -> None:
    """Orphans of the CLIs the tests SIGKILL become ours, so we can reap them:
    otherwise they wait as zombies for PID 1, which may take its time."""
    import ctypes

    PR_SET_CHILD_SUBREAPER = 36
    ctypes.CDLL(None).prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)


def _reap_zombies() -> None:
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


_CONFIG: list[pytest.Config] = []  # the session's config, for hooks that are not given it


def pytest_configure(config: pytest.Config) -> None:
    _CONFIG[:] = [config]


def pytest_sessionstart(session: pytest.Session) -> None:
    state = _state(session.config)
    if is_root():
        _become_subreaper()
    if is_root() and not _is_worker_or_collect_only(session.config):
        state.baseline = _snapshot(state.notes)
        state.start_netns = _own_netns()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    skip = pytest.mark.skip(reason=NEEDS_ROOT)
    for item in items:
        if item.get_closest_marker("kernel") is None:
            continue
        if not is_root() and not require_kernel():
            item.add_marker(skip)


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    if item.get_closest_marker("kernel") is not None and require_kernel() and not is_root():
        pytest.fail(NEEDS_ROOT, pytrace=False)


# Reports, not items, are counted: under pytest-xdist the tests run in workers and
# only their reports reach the controller, which prints the summary and judges the
# session.  A marker's name is among a report's keywords.
def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if "kernel" not in report.keywords:
        return
    state = _state(_CONFIG[0])
    state.kernel_ids.add(report.nodeid)
    if report.when == "call":
        state.kernel_ran.add(report.nodeid)
    if report.skipped and not hasattr(report, "wasxfail"):
        reason = ""
        if isinstance(report.longrepr, tuple) and len(report.longrepr) == 3:
            reason = str(report.longrepr[2])
        elif report.longrepr is not None:
            reason = str(report.longrepr)
        reason = reason.removeprefix("Skipped: ")
        state.kernel_skipped.setdefault(report.nodeid, f"{reason} (at {report.when})")
        state.kernel_ran.discard(report.nodeid)


def pytest_collectreport(report: pytest.CollectReport) -> None:
    """A module skipped while being collected (``pytest.skip(allow_module_level=True)``,
    ``pytest.importorskip``) never yields items, so its kernel tests would
    vanish without a trace; count it as a skipped kernel test if its source
    mentions the kernel marker."""
    if not report.skipped or "::" in report.nodeid or not report.nodeid.endswith(".py"):
        return
    config = _CONFIG[0]
    try:
        mentions_kernel = "mark.kernel" in (config.rootpath / report.nodeid).read_text(errors="replace")
    except OSError:
        mentions_kernel = False
    if mentions_kernel:
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        _state(config).kernel_skipped.setdefault(
            report.nodeid, f"{str(reason).removeprefix('Skipped: ')} (whole module, at collection)"
        )


def _is_worker_or_collect_only(config: pytest.Config) -> bool:
    return bool(getattr(config, "workerinput", None)) or bool(config.option.collectonly)


def _fail_session(session: pytest.Session) -> None:
    if session.exitstatus in (pytest.ExitCode.OK, pytest.ExitCode.NO_TESTS_COLLECTED):
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


# trylast: run after pytest's own sessionfinish has torn down every fixture
# (it does so late when the run stopped early, e.g. -x), so what is found
# really was left behind.
@pytest.hookimpl(trylast=True)
def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    state = _state(session.config)

    if require_kernel() and state.kernel_skipped:
        _fail_session(session)

    if state.baseline is not None:
        _reap_zombies()
        after = _snapshot(state.notes)
        now = _own_netns()
        if now != state.start_netns:
            after["the pytest process's own network namespace"] = {
                now: f"now {now}, but the session started in {state.start_netns}"
            }
        for what, items in after.items():
            before = state.baseline.get(what, {})
            new = [desc for key, desc in sorted(items.items()) if key not in before]
            old = [desc for key, desc in sorted(items.items()) if key in before]
            if new:
                state.leftovers[what] = new
            if old:
                state.preexisting[what] = old
        if state.leftovers:
            _fail_session(session)


def pytest_terminal_summary(
    terminalreporter, exitstatus: int, config: pytest.Config
) -> None:
    state = _state(config)
    tr = terminalreporter

    if require_kernel() and not _is_worker_or_collect_only(config):
        if state.kernel_skipped:
            tr.write_sep("=", f"{REQUIRE_ENV}=1 but kernel tests were skipped", red=True, bold=True)
            for nodeid, reason in sorted(state.kernel_skipped.items()):
                tr.write_line(f"SKIPPED kernel test {nodeid}: {reason}")
            tr.write_line(
                f"istio-lab: {len(state.kernel_skipped)} kernel test(s) skipped; "
                f"in {REQUIRE_ENV}=1 mode that fails the session"
            )
        else:
            ran, total = len(state.kernel_ran), len(state.kernel_ids)
            if ran == total:
                tr.write_line(f"istio-lab: {ran} kernel test{'' if ran == 1 else 's'} ran, none skipped ({REQUIRE_ENV}=1)")
            else:
                tr.write_line(
                    f"istio-lab: {ran} of {total} kernel tests ran (the others failed before running), "
                    f"none skipped ({REQUIRE_ENV}=1)"
                )

    if state.leftovers:
        tr.write_sep("=", "istio-lab: the test session left things behind", red=True, bold=True)
        for what, items in state.leftovers.items():
            tr.write_line(f"{what}:")
            for entry in items:
                tr.write_line(f"    {entry}")
        tr.write_line("istio-lab: the session fails; clean these up (e.g. ip netns del NAME) and fix the test that leaked them")
    if state.preexisting:
        tr.write_sep("-", "istio-lab: already present before the session (not counted)", yellow=True)
        for what, items in state.preexisting.items():
            tr.write_line(f"{what}:")
            for entry in items:
                tr.write_line(f"    {entry}")
    for note in state.notes:
        tr.write_line(f"istio-lab: note: {note}")
