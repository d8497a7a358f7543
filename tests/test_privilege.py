"""Privilege: who the lab's processes are, where they listen, and what runs through a shell.

  - every stub process runs as its own uid/gid with no supplementary groups and no
    capability in any set, the bounding set included;
  - nothing the lab starts listens in the host's network namespace (`ss` there, before
    and during a run);
  - lab/ executes nothing through a shell.
"""

from __future__ import annotations

import ast
import os
import signal
import subprocess
from pathlib import Path

import pytest

from lab import api, backend, plan, processes
from lab.rules import ruleset
from lab.world import Lab

from .sandbox import GUARD, Sandbox
from .test_faults import catch, the_lab, trace_rule

LAB = Path(__file__).resolve().parent.parent / "lab"
NO_CAPS = "0000000000000000"
IDENTITIES = {  # process -> uid/gid: the proxies and istiod 1337, the apps 1000, Prometheus nobody,
    # kube-dns CoreDNS's nonroot
    "envoy": plan.PROXY_UID, "pilot-agent": plan.PROXY_UID, "istiod": processes.ISTIOD_UID,
    "app-sidecar": plan.APP_UID, "app-remote": plan.APP_UID, "prometheus": processes.PROMETHEUS_UID,
    "kube-dns": processes.KUBE_DNS_UID,
}
LAB_PORTS = {plan.Port.OUTBOUND, plan.Port.INBOUND, plan.Port.ADMIN, plan.Port.STATS, plan.Port.AGENT,
             plan.Port.READY, plan.Port.ISTIOD, plan.Port.SIDECAR_APP, plan.Port.REMOTE_APP,
             plan.Port.DNS, plan.Port.DNS_PROXY}


def _status(pid: int) -> dict[str, str]:
    with open(f"/proc/{pid}/status") as f:
        return dict(line.rstrip("\n").split(":\t", 1) for line in f if ":\t" in line)


@pytest.mark.kernel
def test_every_process_has_its_identity_no_groups_and_no_capabilities():
    with Lab() as lab:
        api.bring_up(lab, ruleset.profile(), backend.BACKENDS[backend.LEGACY])
        assert set(lab.record.pids) == set(IDENTITIES)
        for name, pid in lab.record.pids.items():
            status = _status(pid)
            want = str(IDENTITIES[name])
            assert status["Uid"].split() == [want] * 4, (name, status["Uid"])  # real, effective, saved, fs
            assert status["Gid"].split() == [want] * 4, (name, status["Gid"])
            assert status["Groups"].strip() == "", (name, status["Groups"])
            for caps in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"):
                assert status[caps] == NO_CAPS, (name, caps, status[caps])


def _host_listeners() -> dict[tuple[str, str], str]:
    """Listening TCP and UDP sockets of the host namespace: (proto, local address) -> owner."""
    found = {}
    for proto, flag in (("tcp", "-t"), ("udp", "-u")):
        out = subprocess.run(["ss", "-Hlnp", flag], capture_output=True, text=True, check=True,
                             timeout=GUARD).stdout
        for line in out.splitlines():
            fields = line.split()
            found[(proto, fields[3])] = " ".join(fields[5:])
    return found


def _port(address: str) -> int:
    return int(address.rsplit(":", 1)[1]) if address.rsplit(":", 1)[1].isdigit() else 0


@pytest.mark.kernel
def test_the_lab_never_listens_in_the_host_namespace(tmp_path):
    """`ss` in the host namespace before a run and in the middle of one (a TRACE rule placed,
    every process up): nothing new listens on a lab port or belongs to a lab process."""
    from .test_faults import many_scenarios

    before = _host_listeners()
    with Sandbox() as box:
        proc = box.popen("run", "--scenarios", str(many_scenarios(tmp_path / "many", 2)))
        catch(box, proc, "a scenario", lambda: (lab := the_lab(box)) and trace_rule(box, lab),
              lambda: trace_rule(box, the_lab(box)))
        try:
            during = _host_listeners()
            pids = {proc.pid, *box.record(the_lab(box))["pids"].values()}
        finally:
            os.kill(proc.pid, signal.SIGCONT)
        proc.communicate(timeout=GUARD)
        assert proc.returncode == 0
    new = {where: owner for where, owner in during.items() if where not in before}
    ours = {where: owner for where, owner in new.items()
            if _port(where[1]) in LAB_PORTS or any(f"pid={pid}," in owner for pid in pids)}
    assert ours == {}, f"the lab listens in the host namespace: {ours}"


# -- no shell ------------------------------------------------------------------------------

SHELL_CALLS = {("os", "system"), ("os", "popen"), ("subprocess", "getoutput"),
               ("subprocess", "getstatusoutput"), ("pty", "spawn")}
SPAWNS = {"run", "Popen", "call", "check_call", "check_output"}


def _shell_uses(tree: ast.AST) -> list[tuple[int, str]]:
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        func = node.func
        name = (func.value.id, func.attr) if isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name) else None
        if name in SHELL_CALLS:
            found.append((node.lineno, f"{name[0]}.{name[1]}"))
        for kw in node.keywords:
            if kw.arg == "shell" and not (isinstance(kw.value, ast.Constant) and kw.value.value is False):
                found.append((node.lineno, "shell=..."))
        if name and name[0] == "subprocess" and name[1] in SPAWNS and node.args \
                and isinstance(node.args[0], (ast.Constant, ast.JoinedStr, ast.BinOp)):
            found.append((node.lineno, "a command line as one string"))
        if name and name[0] == "os" and name[1].startswith(("exec", "spawn")) and node.args \
                and isinstance(node.args[0], ast.Constant) and str(node.args[0].value).split("/")[-1] in ("sh", "bash"):
            found.append((node.lineno, "a shell exec'ed"))
    return found


def test_lab_runs_nothing_through_a_shell():
    """Rule files, scenario files and command-line values reach commands (iptables-legacy-restore,
    say) only as argv elements or stdin, never as shell text."""
    files = sorted(LAB.rglob("*.py"))
    assert len(files) > 10
    found = {f"{path.relative_to(LAB.parent)}:{line}: {what}"
             for path in files for line, what in _shell_uses(ast.parse(path.read_text(), str(path)))}
    text = {f"{path.relative_to(LAB.parent)}: {word}" for path in files
            for word in ("shell=True", "os.system", "os.popen") if word in path.read_text()}
    assert found == set() and text == set(), sorted(found | text)


def test_the_shell_check_sees_what_it_looks_for():
    bad = ast.parse("import os, subprocess\nos.system(x)\nsubprocess.run(cmd, shell=True)\n"
                    "subprocess.check_output(f'iptables {x}')\nos.execl('/bin/sh', 'sh', '-c', x)\n")
    assert [what for _, what in _shell_uses(bad)] == ["os.system", "shell=...", "a command line as one string",
                                                    "a shell exec'ed"]
