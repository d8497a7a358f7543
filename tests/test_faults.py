"""Faults: the harness killed at each stage, signals, a proxy that dies or freezes mid-run.

Each harness runs in a sandbox (tests/sandbox.py): its own /run/netns and state dir, so
"the next command reaps everything" is checked exactly, and no other test's command can
reap the lab first.  A stage is found by watching real state -- a namespace appears, an
ISTIO chain appears in the sidecar's `iptables-legacy-save`, the record names the
processes, a TRACE rule appears in the sidecar's raw table -- never by sleeping.  Once
seen, the harness is frozen (SIGSTOP), the stage is confirmed, and then it is killed.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from lab import api, plan, processes, scenario
from lab.rules import ruleset

from .sandbox import GUARD, Sandbox

pytestmark = pytest.mark.kernel
SIDECAR = "sidecar"
NAMESPACES = 1 + len(plan.PODS)  # node + sidecar, remote, istiod, prometheus, kube-dns
NEXT = ("run", "type2-local-to-remote")  # "the next command": any command that builds a lab reaps first
# Interrupted: 130, or killed by SIGINT (a shell shows both as 130).  CPython exits by SIGINT
# when a KeyboardInterrupt once escaped code it ran from a string (dataclasses and namedtuple
# build their methods so, at import), even though the harness caught it and tore down.
EXIT_INTERRUPTED = (130, -signal.SIGINT)


def _ns(labid: str, pod: str) -> str:
    return f"ilab-{labid}-{pod}"


def many_scenarios(directory: Path, copies: int) -> Path:
    """The repository's scenarios copied `copies` times under new ids: a run long enough
    that a mid-scenario moment can be caught by watching, not by luck."""
    directory.mkdir()
    for file in scenario.SCENARIO_DIR.glob("*.yaml"):
        doc = yaml.safe_load(file.read_text())
        for i in range(copies):
            copy = dict(doc, id=f"{doc['id']}-{i}")
            if doc.get("variant_of"):
                copy["variant_of"] = f"{doc['variant_of']}-{i}"
            (directory / f"{copy['id']}.yaml").write_text(yaml.safe_dump(copy, sort_keys=False))
    return directory


# -- watching the stages --------------------------------------------------------------------

def the_lab(box: Sandbox) -> str | None:
    labs = box.records()
    return labs[0] if labs else None


def _on_nft(box: Sandbox, labid: str) -> bool:
    """The lab's rules went into nf_tables: its legacy tables are never asked (asking makes them)."""
    return (box.record(labid) or {}).get("backend") == "nft"


def nat_chains(box: Sandbox, labid: str) -> bool:
    if _on_nft(box, labid):
        return "chain ISTIO_OUTPUT" in box.in_pod(_ns(labid, SIDECAR), "nft", "list", "ruleset")
    return ":ISTIO_OUTPUT" in box.in_pod(_ns(labid, SIDECAR), "iptables-legacy-save", "-t", "nat")


def trace_rule(box: Sandbox, labid: str) -> bool:
    """A flow's trace rule is in the sidecar pod: nftrace in the lab's own nf_tables table, or TRACE in raw."""
    if _on_nft(box, labid):
        return "nftrace set 1" in box.in_pod(_ns(labid, SIDECAR), "nft", "list", "ruleset")
    return "-j TRACE" in box.in_pod(_ns(labid, SIDECAR), "iptables-legacy-save", "-t", "raw")


def proxies_listening(box: Sandbox, labid: str) -> bool:
    listening = box.in_pod(_ns(labid, SIDECAR), "ss", "-Hltn")
    return all(f"0.0.0.0:{port} " in listening for port in (15001, 15006, 15020))


def catch(box: Sandbox, proc: subprocess.Popen, what: str, seen, confirm=None) -> None:
    """Watch until `seen()` holds, then freeze the harness (SIGSTOP) and check `confirm()`
    on the frozen state; if the moment passed meanwhile, let it go on and watch again."""
    end = time.monotonic() + GUARD
    while True:
        while not seen():
            assert proc.poll() is None, f"the harness ended before {what}: {proc.communicate()}"
            assert time.monotonic() < end, f"never saw {what}"
        os.kill(proc.pid, signal.SIGSTOP)
        if confirm is None or confirm():
            return
        os.kill(proc.pid, signal.SIGCONT)
        assert time.monotonic() < end, f"never caught {what}"


# stage -> (command, how it is seen, how it is confirmed once frozen, whether it recurs: a
# moment that passed can be waited for again)
STAGES = {
    "making namespaces": (
        lambda box, labid, d, *options: box.popen("up", "--hold", "--id", labid, *options),
        lambda box, labid: box.namespaces(),
        lambda box, labid: len(box.namespaces()) < NAMESPACES,
        False,
    ),
    "after the rules": (
        lambda box, labid, d, *options: box.popen("up", "--hold", "--id", labid, *options),
        lambda box, labid: len(box.namespaces()) == NAMESPACES and nat_chains(box, labid),
        lambda box, labid: "prometheus" not in box.record(labid)["pids"],  # the processes are not all up
        False,
    ),
    "with the proxies up": (
        lambda box, labid, d, *options: box.popen("up", "--hold", "--id", labid, *options),
        lambda box, labid: "prometheus" in (box.record(labid) or {}).get("pids", {}) and proxies_listening(box, labid),
        lambda box, labid: proxies_listening(box, labid) and not trace_rule(box, labid),
        False,
    ),
    "mid-scenario": (
        lambda box, labid, d, *options: box.popen("run", *options, "--scenarios", str(many_scenarios(d / "many", 4))),
        lambda box, labid: (lab := the_lab(box)) and len(box.namespaces()) == NAMESPACES and trace_rule(box, lab),
        lambda box, labid: trace_rule(box, the_lab(box)),
        True,  # each scenario places and removes its TRACE rules
    ),
}


def reach(box: Sandbox, tmp_path: Path, stage: str, *options: str) -> subprocess.Popen:
    """Start the harness in the sandbox and freeze it at `stage`, confirmed."""
    start, seen, confirm, recurs = STAGES[stage]
    labid = "faulty"
    proc = start(box, labid, tmp_path, *options)
    catch(box, proc, stage, lambda: seen(box, labid), (lambda: confirm(box, the_lab(box))) if recurs else None)
    assert confirm(box, the_lab(box)), f"frozen too late for {stage!r}"
    return proc


def _gone(pid: int) -> bool:
    """The process has ended; collects it if it became our child (pytest is a subreaper)."""
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except OSError:
        return True


@pytest.mark.parametrize("stage", list(STAGES))
def test_sigkill_at_each_stage_then_the_next_command_reaps_everything(tmp_path, stage):
    with Sandbox() as box:
        proc = reach(box, tmp_path, stage)
        labid = the_lab(box)
        recorded = list((box.record(labid) or {}).get("pids", {}).values())
        proc.kill()
        proc.wait(timeout=GUARD)
        assert box.records() == [labid], "the record outlives a SIGKILLed owner, so the lab can be found"

        after = box.run(*NEXT)
        assert after.returncode == 0, after.stderr
        assert f"istio-lab: removed lab {labid} left behind by a process that died" in after.stderr
        assert box.leftovers() == {}
        assert [pid for pid in recorded if not _gone(pid)] == []


def test_namespaces_no_istio_lab_recorded_are_not_reaped():
    """`ilab-` namespaces with no record are someone else's (tests/test_trace.py makes such):
    the next command's reaping leaves them, `down` removes them when asked."""
    with Sandbox() as box:
        subprocess.run(box.argv("ip", "netns", "add", "ilab-foreign-x"), check=True, timeout=GUARD)
        after = box.run(*NEXT)
        assert after.returncode == 0, after.stderr
        assert "removed lab" not in after.stderr and box.namespaces() == ["ilab-foreign-x"]
        assert box.run("down", "foreign").returncode == 0
        assert box.leftovers() == {}


SIGNALS = [(stage, sig) for stage in STAGES for sig in (signal.SIGINT, signal.SIGTERM)] + [("mid-scenario", signal.SIGHUP)]


@pytest.mark.parametrize("stage, sig", SIGNALS, ids=[f"{sig.name}-{stage}" for stage, sig in SIGNALS])
def test_a_signal_at_each_stage_tears_down_at_once(tmp_path, stage, sig):
    with Sandbox() as box:
        proc = reach(box, tmp_path, stage)
        proc.send_signal(sig)  # held while frozen, delivered on SIGCONT
        os.kill(proc.pid, signal.SIGCONT)
        out, err = proc.communicate(timeout=GUARD)  # a deadline against a hang, not a measurement
        assert proc.returncode in EXIT_INTERRUPTED, err
        assert err.endswith("istio-lab: interrupted; the lab was torn down\n"), err
        assert "Traceback" not in err and "Exception ignored" not in err, err  # never swallowed
        assert box.leftovers() == {}  # at once: no later command needed


# -- a proxy that dies or freezes ---------------------------------------------------------

def test_envoy_killed_mid_run_fails_the_rest_by_name_without_a_hang(tmp_path):
    with Sandbox() as box:
        proc = reach(box, tmp_path, "mid-scenario", "--json")
        os.kill(box.record(the_lab(box))["pids"]["envoy"], signal.SIGKILL)
        os.kill(proc.pid, signal.SIGCONT)
        out, err = proc.communicate(timeout=GUARD)  # a deadline against a hang, not a measurement
        assert proc.returncode == 1, err
        results = json.loads(out)["scenarios"]
        failed = [i for i, r in enumerate(results) if r["verdict"] == "fail"]
        assert failed, "no scenario noticed the dead proxy"
        first = failed[0]
        assert failed == list(range(first, len(results))), "a scenario after the kill passed"
        assert all(r["verdict"] == "pass" for r in results[:first])
        for r in results[first:]:
            assert r["failure"].startswith("envoy was killed by SIGKILL"), r["failure"]
        assert box.leftovers() == {}


def test_a_frozen_envoy_is_a_failure_within_the_clients_deadline():
    """A proxy that accepts (the kernel does) but never answers: the client's deadline ends it."""
    with api.Session(ruleset.profile()) as session:
        envoy = session.lab.record.pids["envoy"]
        os.kill(envoy, signal.SIGSTOP)
        try:
            [r] = session.run_all(scenario.select(scenario.load_all(), ["type2-local-to-remote"]))
        finally:
            os.kill(envoy, signal.SIGCONT)
        processes.check_alive(session.lab)
    assert not r.passed and str(r.verdict) == "fail"
    assert r.failure.startswith("GET http://10.96.0.90:9080/: no answer within"), r.failure
