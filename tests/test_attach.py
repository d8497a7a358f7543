"""`istio-lab probe --netns PATH`: one flow traced in a namespace the lab does not own.

A namespace is made here outside the lab (`ip netns add`, links made inside it, a rule set
loaded by iptables-restore); every probe must leave it exactly as it found it: its
iptables-save (counters aside), its nft ruleset, its loggers.  Also after a probe killed
with SIGKILL once its trace rule is in: the next istio-lab command puts it back.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lab import attached
from lab.rules import profiles

pytestmark = pytest.mark.kernel

REPO = Path(__file__).resolve().parent.parent
RESTORE = {"legacy": "iptables-legacy-restore", "nft": "iptables-nft-restore"}
SAVE = {"legacy": "iptables-legacy-save", "nft": "iptables-nft-save"}


def _in(name: str, *argv: str, text: str | None = None) -> str:
    return subprocess.run(["ip", "netns", "exec", name, *argv], input=text, capture_output=True, text=True,
                          check=True).stdout


def _state(name: str, tables: str) -> dict:
    """What a probe must leave as it was: the rules (counters aside), nft's ruleset, the loggers."""
    saved = [re.sub(r"\[\d+:\d+\]", "[-]", line) for line in _in(name, SAVE[tables]).splitlines()
             if not line.startswith("#")]
    loggers = _in(name, "sysctl", "-n", "net.netfilter.nf_log.2", "net.netfilter.nf_log.10")
    ruleset = re.sub(r"packets \d+ bytes \d+", "packets - bytes -", _in(name, "nft", "list", "ruleset"))
    return {"rules": saved, "nft": ruleset, "loggers": loggers}


@pytest.fixture(params=["legacy", "nft"])
def pod(request):
    """A pod of our own: lo, a veth pair inside it (10.1.0.5/24, the gateway answers nobody),
    Istio 1.13's rules loaded by the chosen iptables-restore."""
    name = f"attachtest-{secrets.token_hex(3)}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        _in(name, "ip", "link", "set", "lo", "up")
        _in(name, "ip", "link", "add", "veth0", "type", "veth", "peer", "name", "veth1")
        for link in ("veth0", "veth1"):
            _in(name, "ip", "link", "set", link, "up")
        _in(name, "ip", "addr", "add", "10.1.0.5/24", "dev", "veth0")
        _in(name, "ip", "route", "add", "default", "via", "10.1.0.1", "dev", "veth0")
        _in(name, RESTORE[request.param], text=profiles.text(profiles.DEFAULT))
        yield name, request.param
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)


def _probe(*argv: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lab.cli", "probe", *argv], cwd=REPO, capture_output=True,
                          text=True, timeout=timeout)


def test_a_flow_is_traced_through_the_pods_own_rules_and_the_pod_is_left_as_it_was(pod) -> None:
    name, tables = pod
    before = _state(name, tables)
    path = f"/run/netns/{name}"
    done = _probe("--netns", path, "--from", "app:1000", "--to", "10.1.0.9:9080", "--json")
    assert done.returncode == 0, done.stderr
    found = json.loads(done.stdout)
    assert found["tables"] == [tables]
    assert found["measured_path"] == ("Local Pod -> OUTPUT -> ISTIO_OUTPUT RULE 9 -> ISTIO_REDIRECT -> "
                                      "15001: no listener, refused")
    assert found["trace_rule_events"]["ISTIO_OUTPUT#9"] == 1 and found["counters_cover_trace"]
    assert _state(name, tables) == before

    done = _probe("--netns", path, "--from", "1000", "--to", "127.0.0.1:8080", "--json")
    assert json.loads(done.stdout)["measured_path"] == ("Local Pod -> OUTPUT -> ISTIO_OUTPUT RULE 3 -> POSTROUTING -> "
                                                        "Local Pod 8080: no listener, refused")
    listener = subprocess.Popen(["ip", "netns", "exec", name, sys.executable, "-c",  # someone on Envoy's port
                                 "import socket, sys; s = socket.create_server(('0.0.0.0', 15001)); print(1, flush=True); "
                                 "sys.stdin.read()"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert listener.stdout.readline().strip() == "1"
        done = _probe("--netns", path, "--from", "app:1000", "--to", "10.1.0.9:9080")
    finally:
        listener.stdin.close()
        listener.wait(timeout=10)
    assert done.returncode == 0, done.stderr
    # over lo, as the lab writes a local delivery: the hook it left by, then where it arrived
    assert "kernel : Local Pod -> OUTPUT -> ISTIO_OUTPUT RULE 9 -> ISTIO_REDIRECT -> POSTROUTING -> Local Pod" \
        in done.stdout
    assert f"(pid {listener.pid}) listens there" in done.stdout or f"pid {listener.pid} listens there" in done.stdout
    assert "ISTIO_OUTPUT RULE 9" in done.stdout and "-A ISTIO_OUTPUT -j ISTIO_REDIRECT" in done.stdout
    assert _state(name, tables) == before
    assert not list(Path(attached.ATTACH_DIR).glob(".*.lock"))  # the probe's lock went with it


def test_a_probe_killed_mid_flight_is_put_back_by_the_next_command(pod) -> None:
    name, tables = pod
    before = _state(name, tables)
    path = f"/run/netns/{name}"
    # uid 1337 is returned by the rules and goes out of veth0 to a gateway nobody answers for:
    # the client waits its 2 s while the trace rule is in
    child = subprocess.Popen([sys.executable, "-m", "lab.cli", "probe", "--netns", path, "--from", "1337",
                              "--to", "10.1.0.9:9080"], cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 20
    placed = None
    while time.monotonic() < deadline and placed is None:
        for file in (Path(attached.ATTACH_DIR).glob("*.json") if os.path.isdir(attached.ATTACH_DIR) else ()):
            rec = attached.AttachRecord.load(str(file))
            if rec is not None and rec.owner_pid == child.pid and rec.handles:
                placed = rec
        time.sleep(0.01)
    assert placed is not None, "the probe never placed its trace rule"
    child.send_signal(signal.SIGKILL)
    child.wait()
    marked = _state(name, tables)
    assert "ilab-trace" in marked["nft"]  # left behind, as a SIGKILL leaves it
    done = _probe("--netns", path, "--from", "1000", "--to", "127.0.0.1:8080")  # the next command
    # (under xdist another worker's command may have put it back first: the namespace says which did)
    assert f"put back {path}, left marked by a probe that died" in done.stderr or not Path(placed.file).exists()
    assert _state(name, tables) == before
    assert not Path(placed.file).exists()


def test_the_hosts_own_namespace_and_what_is_no_namespace_are_refused(tmp_path) -> None:
    for host in ("/proc/self/ns/net", f"/proc/{os.getpid()}/ns/net"):  # the harness's own is the host's here
        done = _probe("--netns", host, "--from", "1000", "--to", "127.0.0.1:80")
        assert done.returncode == 2 and "the host's own network namespace" in done.stderr, done.stderr
    (tmp_path / "plain").write_text("")
    done = _probe("--netns", str(tmp_path / "plain"), "--from", "1000", "--to", "127.0.0.1:80")
    assert done.returncode == 2 and "not a network namespace" in done.stderr
    done = _probe("--netns", "/nonexistent", "--from", "1000", "--to", "127.0.0.1:80")
    assert done.returncode == 2 and done.stderr.count("\n") == 1
    done = _probe("--netns", "/proc/self/ns/net", "--from", "1000", "--to", "remote:80")
    assert done.returncode == 2 and "with --netns write IP:PORT" in done.stderr
    done = _probe("--netns", "/proc/self/ns/net", "--profile", "istio-1.13", "--from", "1000", "--to", "127.0.0.1:80")
    assert done.returncode == 2 and "--profile does not apply" in done.stderr
