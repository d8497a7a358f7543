"""The lab core on the real kernel: namespaces, wiring, rules, teardown, the host untouched."""

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from lab import netns, plan, record
from lab.errors import LabError
from lab.rules import profiles, xtables
from lab.world import Lab

from . import hoststate
from .sandbox import Sandbox

pytestmark = pytest.mark.kernel
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _ip(ns, *argv):
    return subprocess.run(["ip", "-n", ns, *argv], capture_output=True, text=True, check=True).stdout


def test_lab_builds_pods_on_a_bridge_and_leaves_nothing():
    with Lab() as lab:
        assert sorted(record.lab_namespaces(lab.labid)) == sorted(lab.namespaces())
        for pod in lab.pods.values():
            assert pod.ns == f"ilab-{lab.labid}-{pod.name}"
            assert f"inet {pod.ip}/24" in _ip(pod.ns, "-o", "addr", "show", "dev", "eth0")
            assert "state UP" in _ip(pod.ns, "link", "show", "eth0")
            assert "UNKNOWN" in _ip(pod.ns, "link", "show", "lo") or "UP" in _ip(pod.ns, "link", "show", "lo")
            routes = _ip(pod.ns, "route")
            assert f"default via {plan.GATEWAY} dev eth0" in routes
            assert f"{plan.SERVICE_RANGE} via {plan.GATEWAY} dev eth0" in routes
        assert f"inet {plan.GATEWAY}/24" in _ip(lab.node, "-o", "addr", "show", "dev", "br0")
        bridged = _ip(lab.node, "-o", "link", "show", "master", "br0")
        assert all(name in bridged for name in lab.pods)
        labid = lab.labid
    assert record.lab_namespaces(labid) == []
    assert not os.path.exists(os.path.join(record.STATE_DIR, labid))


def test_pods_reach_each_other_over_the_bridge():
    import socket

    with Lab() as lab:
        remote = lab.pod("remote")
        with netns.entered(remote.ns):
            server = socket.create_server((remote.ip, 7000))
        with netns.entered(lab.pod("sidecar").ns):
            client = socket.create_connection((remote.ip, 7000), timeout=2)
        conn, peer = server.accept()
        assert peer[0] == plan.PODS["sidecar"]
        for s in (conn, client, server):
            s.close()


def test_a_closed_port_is_refused_every_time_not_after_a_burst():
    """A pod owes an ICMP port unreachable for every datagram to a closed port; with the
    kernel's default rate limit only the first 7 in a row got one (measured), so a flow's
    ending hung on the flows before it."""
    import socket

    with Lab() as lab, netns.entered(lab.pod("sidecar").ns):
        refused = 0
        for _ in range(20):
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as client:
                client.settimeout(1)
                client.connect((plan.PODS["istiod"], 9))  # nobody listens on istiod's port 9
                client.send(b"x")
                try:
                    client.recv(1)
                except ConnectionRefusedError:
                    refused += 1
                except TimeoutError:  # silence: no ICMP error came
                    pass
        assert refused == 20


def test_several_labs_at_once_are_independent():
    with Lab() as a, Lab() as b:
        assert a.labid != b.labid
        assert set(a.namespaces()).isdisjoint(b.namespaces())
        assert plan.PODS["sidecar"] in _ip(b.pod("sidecar").ns, "-o", "addr")


def test_a_failure_while_building_tears_down():
    lab = Lab()
    lab._build_pod = lambda node, bridge, pod: (_ for _ in ()).throw(RuntimeError("boom"))  # after the fabric
    with pytest.raises(RuntimeError):
        lab.create()
    assert record.lab_namespaces(lab.labid) == []


def test_bad_lab_id_is_refused():
    with pytest.raises(LabError, match="bad lab id"):
        Lab("Bad;id")


def test_rules_read_back_equal_the_profile_line_for_line():
    with Lab() as lab:
        ns = lab.pod("sidecar").ns
        xtables.apply(ns, profiles.load())
        saved = subprocess.run(["ip", "netns", "exec", ns, "iptables-legacy-save", "-t", "nat"],
                               capture_output=True, text=True, check=True).stdout
        kernel_lines = [l for l in saved.splitlines() if l.startswith("-A ")]
        assert kernel_lines == profiles.load().lines()
        listed = xtables.listing(ns, "nat")
        assert [r.line for r in listed] == kernel_lines
        istio_output = [r for r in listed if r.ref.chain == "ISTIO_OUTPUT"]
        assert [r.ref.number for r in istio_output] == list(range(1, 10))
        # other pods got no rules
        other = subprocess.run(["ip", "netns", "exec", lab.pod("remote").ns, "iptables-legacy-save"],
                               capture_output=True, text=True).stdout
        assert "ISTIO" not in other
    host = subprocess.run(["iptables-legacy-save"], capture_output=True, text=True).stdout
    assert "ISTIO" not in host


def test_counters_count_and_zero():
    import socket

    with Lab() as lab:
        ns = lab.pod("sidecar").ns
        xtables.apply(ns, profiles.load())
        with netns.entered(ns):
            server = socket.create_server(("127.0.0.1", 7001))
            client = socket.create_connection(("127.0.0.1", 7001), timeout=2)  # root on lo: ISTIO_OUTPUT rule 3
        client.close()
        server.close()
        counts = {str(r.ref): r.packets for r in xtables.listing(ns, "nat")}
        assert counts["OUTPUT#1"] == 1 and counts["ISTIO_OUTPUT#3"] == 1
        assert counts["ISTIO_OUTPUT#9"] == 0
        xtables.zero(ns, "nat")
        assert all(r.packets == 0 for r in xtables.listing(ns, "nat"))


def test_the_host_is_untouched_by_a_whole_lab_life():
    before = hoststate.snapshot()
    result = subprocess.run([sys.executable, "-m", "lab.cli", "run"], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    after = hoststate.snapshot()
    for key in before:
        assert after[key] == before[key], f"host {key} changed"


def _spawn_cli(*argv):
    return subprocess.Popen([sys.executable, "-m", "lab.cli", *argv], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for_lab(owner_pid, timeout=10.0):
    """The labid of the lab owned by `owner_pid`, once its processes are up."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        for labid in record.known_labids():
            rec = record.Record.load(labid)
            if rec and rec.owner_pid == owner_pid and rec.pids:
                return labid
        time.sleep(0.02)
    raise AssertionError("the lab never came up")


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_sigint_and_sigterm_tear_down_at_once(sig):
    proc = _spawn_cli("up", "--hold")
    labid = _wait_for_lab(proc.pid)
    proc.send_signal(sig)
    proc.wait(timeout=10)
    assert record.lab_namespaces(labid) == []
    assert proc.returncode != 0


def test_a_sigkilled_owners_lab_is_reaped_by_the_next_command():
    """In a sandbox, so that no other test's command reaps the lab first."""
    with Sandbox() as box:
        proc = box.popen("up", "--hold", "--id", "killed")
        _until(lambda: (box.record("killed") or {}).get("pids", {}).get("prometheus"))
        proc.kill()
        proc.wait(timeout=10)
        assert box.namespaces(), "the namespaces outlive a SIGKILLed owner"
        result = box.run("run", "type2-local-to-remote")
        assert result.returncode == 0, result.stderr
        assert "removed lab killed left behind" in result.stderr
        assert box.leftovers() == {}


def _until(condition, timeout: float = 10.0):
    """Poll `condition` until it holds; the timeout only guards against a hang."""
    end = time.monotonic() + timeout
    while not (result := condition()):
        assert time.monotonic() < end, "gave up waiting"
        time.sleep(0.005)
    return result


def test_up_leaves_a_lab_and_down_removes_it():
    result = subprocess.run([sys.executable, "-m", "lab.cli", "up"], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    import re

    labid = re.search(r"ip netns exec ilab-([a-z0-9]+)-sidecar", result.stdout).group(1)
    assert record.Record.load(labid).detached
    rules = subprocess.run([sys.executable, "-m", "lab.cli", "rules", labid], cwd=REPO, capture_output=True, text=True)
    assert rules.returncode == 0
    assert "Chain ISTIO_OUTPUT" in rules.stdout and "-j ISTIO_REDIRECT" in rules.stdout
    # a later command does not reap a lab left up on purpose
    subprocess.run([sys.executable, "-m", "lab.cli", "preflight"], cwd=REPO, check=True, capture_output=True)
    assert record.lab_namespaces(labid)
    down = subprocess.run([sys.executable, "-m", "lab.cli", "down", labid], cwd=REPO, capture_output=True, text=True)
    assert down.returncode == 0
    assert record.lab_namespaces(labid) == []


def test_down_all_removes_every_lab():
    """In a sandbox: there `--all` means these two labs, not those of tests running alongside."""
    with Sandbox() as box:
        for _ in range(2):
            assert box.run("up").returncode == 0
        assert len(box.namespaces()) == 2 * (1 + len(plan.PODS))  # a node and the pods, per lab
        result = box.run("down", "--all")
        assert result.returncode == 0
        assert result.stdout.count("istio-lab: removed lab ") == 2
        assert box.leftovers() == {}


def test_down_of_an_unknown_lab_is_one_line_and_status_2():
    result = subprocess.run([sys.executable, "-m", "lab.cli", "down", "zzzz"], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "no lab 'zzzz'" in result.stderr


def test_a_lab_name_that_points_at_the_host_namespace_kills_nothing():
    """Defence in depth: if a lab's name ever named our own namespace, teardown must
    unmount the name and leave every process of that namespace alone."""
    name = "ilab-zzhost-sidecar"
    open(netns.path(name), "w").close()
    subprocess.run(["mount", "--bind", "/proc/self/ns/net", netns.path(name)], check=True)
    bystander = subprocess.Popen(["sleep", "30"])
    try:
        record.destroy("zzhost")
        assert bystander.poll() is None, "teardown killed a process of the host namespace"
        assert not netns.exists(name)
    finally:
        bystander.kill()
        bystander.wait()
        if netns.exists(name):
            netns.remove(name)


def test_namespaces_are_made_on_the_main_thread_only():
    import threading

    failure = []
    worker = threading.Thread(target=lambda: failure.append(_try_create("ilab-zzthread-x")))
    worker.start()
    worker.join()
    assert failure == ["must run on the main thread"]
    assert not netns.exists("ilab-zzthread-x")


def _try_create(name):
    try:
        netns.create(name)
    except RuntimeError as e:
        return str(e).split("netns.create ")[-1]
    netns.remove(name)
    return "created"


def test_a_record_with_fields_of_a_newer_version_is_still_a_live_labs(tmp_path, monkeypatch):
    """A record another istio-lab version wrote, with a field this one does not know, reads
    back (and so is never reaped as a record its writer died writing)."""
    monkeypatch.setattr(record, "STATE_DIR", str(tmp_path))
    (tmp_path / "abc123").mkdir()
    data = {**dataclasses.asdict(record.Record.new("abc123")), "from_the_future": {"x": 1}}
    (tmp_path / "abc123" / "record.json").write_text(json.dumps(data))
    loaded = record.Record.load("abc123")
    assert loaded is not None and loaded.owner_alive() and loaded.labid == "abc123"
    (tmp_path / "abc123" / "record.json").write_text('{"labid": "abc1')  # a writer that died mid-write
    assert record.Record.load("abc123") is None
