"""The sidecar's processes on a real kernel, behind Istio 1.13's real nat rules.

One lab serves the module; tests that break or tear down a lab make their own.
"""

from __future__ import annotations

import os
import signal
import socket
import time
from pathlib import Path

import pytest

from lab import netns, plan, processes, proxylogs, record, traffic
from lab.rules import save, xtables
from lab.sidecar import httpio
from lab.errors import LabError
from lab.world import Lab

pytestmark = pytest.mark.kernel

RULES = Path(__file__).resolve().parents[1] / "lab/rules/profiles/istio-1.13.rules"
SIDECAR_IP, REMOTE_IP, ISTIOD_IP = plan.PODS["sidecar"], plan.PODS["remote"], plan.PODS["istiod"]
APP = dict(uid=plan.APP_UID, gid=plan.APP_GID)
NO_CAPS = "0000000000000000"


@pytest.fixture(scope="module")
def lab():
    with Lab() as lab:
        xtables.apply(lab.pods["sidecar"].ns, save.parse(RULES.read_text(), str(RULES)))
        processes.start(lab)
        yield lab


@pytest.fixture(autouse=True)
def alive(lab):
    """Every test ends with all of the lab's processes still running."""
    yield
    processes.check_alive(lab)


def ns(lab, pod: str) -> str:
    return lab.pods[pod].ns


def access_log(lab) -> list[dict]:
    return proxylogs.read(lab.run_dir, proxylogs.ACCESS_LOG)


def istiod_log(lab) -> list[dict]:
    return proxylogs.read(lab.run_dir, proxylogs.ISTIOD_LOG)


def proxied(lab, action):
    """Run `action`; its result and the access-log lines it made, read at once (no settling wait)."""
    before = len(access_log(lab))
    result = action()
    return result, access_log(lab)[before:]


def until(condition, timeout: float = 2.0):
    end = time.monotonic() + timeout
    while not (result := condition()) and time.monotonic() < end:
        time.sleep(0.005)
    return result


def proc_status(pid: int) -> dict[str, str]:
    with open(f"/proc/{pid}/status") as f:
        return dict(line.rstrip("\n").split(":\t", 1) for line in f if ":\t" in line)


# -- listeners ---------------------------------------------------------------------------

def test_http_listeners_answer_through_the_rules(lab):
    admin = traffic.request(ns(lab, "sidecar"), "127.0.0.1", plan.Port.ADMIN,
                              uid=plan.PROXY_UID, gid=plan.PROXY_GID, path="/ready")
    assert (admin.status, admin.body) == (200, "LIVE\n")
    prom = ns(lab, "prometheus")
    stats = traffic.request(prom, SIDECAR_IP, plan.Port.STATS, **APP, path="/stats/prometheus")
    assert stats.status == 200 and 'envoy_listener_downstream_cx_total{listener="0.0.0.0_15001"}' in stats.body
    merged = traffic.request(prom, SIDECAR_IP, plan.Port.AGENT, **APP, path="/stats/prometheus")
    assert merged.status == 200
    assert "envoy_server_live 1" in merged.body and 'app_requests_total{pod="sidecar"}' in merged.body
    assert "istio_agent_xds_connected 1" in merged.body
    ready = traffic.request(prom, SIDECAR_IP, plan.Port.READY, **APP, path="/healthz/ready")
    assert ready.status == 200
    remote = traffic.request(prom, REMOTE_IP, plan.Port.REMOTE_APP, **APP)
    assert remote.json()["pod"] == "remote"


def test_admin_is_not_reachable_from_outside_the_pod(lab):
    """15000 is bound to 127.0.0.1: from another pod it is inbound traffic to 15006, which cannot connect."""
    _, lines = proxied(lab, lambda: pytest.raises(
        traffic.RequestError, traffic.request, ns(lab, "remote"), SIDECAR_IP, plan.Port.ADMIN, **APP))
    assert [(l["listener"], l["original_dst"]) for l in lines] == [(15006, f"{SIDECAR_IP}:15000")]
    assert "Connection refused" in lines[0]["error"]


# -- the article's traffic types ---------------------------------------------------------

def test_local_app_to_remote_goes_through_15001_only(lab):
    response, (leg,) = proxied(lab, lambda: traffic.request(
        ns(lab, "sidecar"), REMOTE_IP, plan.Port.REMOTE_APP, **APP, src_port=40123))
    seen = response.json()
    assert str(response.local) == f"{SIDECAR_IP}:40123" and str(response.peer) == f"{REMOTE_IP}:9080"
    assert leg["listener"] == 15001 and leg["error"] is None
    assert leg["downstream_peer"] == str(response.local)
    assert leg["original_dst"] == f"{REMOTE_IP}:9080" == leg["upstream_peer"]
    assert leg["upstream_local"] == seen["peer"] and seen["peer"].startswith(f"{SIDECAR_IP}:")
    assert leg["bytes_from_downstream"] == len(httpio.request_bytes(REMOTE_IP, 9080, "/"))
    assert leg["bytes_to_downstream"] > len(response.body.encode())


def test_local_app_to_own_service_goes_out_15001_and_back_in_15006(lab):
    response, lines = proxied(lab, lambda: traffic.request(ns(lab, "sidecar"), "10.96.0.80", 8080, **APP))
    outbound, inbound = sorted(lines, key=lambda l: l["listener"])
    assert (outbound["listener"], inbound["listener"]) == (15001, 15006)
    assert outbound["downstream_peer"] == str(response.local) and outbound["original_dst"] == "10.96.0.80:8080"
    assert outbound["upstream_cluster"] == "outbound|8080||app.default.svc.cluster.local"
    assert outbound["upstream_peer"] == f"{SIDECAR_IP}:8080"
    assert inbound["downstream_peer"] == outbound["upstream_local"]  # the join of the two legs
    assert inbound["original_dst"] == f"{SIDECAR_IP}:8080"
    assert inbound["upstream_local"] == response.json()["peer"]
    assert response.json()["peer"].startswith("127.0.0.6:")
    assert all(l["error"] is None for l in lines)


def test_remote_to_local_app_goes_through_15006_only(lab):
    response, (leg,) = proxied(lab, lambda: traffic.request(ns(lab, "remote"), SIDECAR_IP, plan.Port.SIDECAR_APP, **APP))
    assert leg["listener"] == 15006 and leg["downstream_peer"] == str(response.local)
    assert leg["downstream_local"] == f"{SIDECAR_IP}:15006"
    assert leg["original_dst"] == f"{SIDECAR_IP}:8080"
    assert response.json()["peer"] == leg["upstream_local"] and leg["upstream_local"].startswith("127.0.0.6:")


def test_access_log_line_is_written_before_the_client_sees_eof(lab):
    """Even for a client that never half-closes (curl-like): the line precedes the EOF."""

    def exchange_without_half_close():
        with traffic.connect(ns(lab, "sidecar"), "10.96.0.80", 8080, **APP) as sock:
            sock.sendall(httpio.request_bytes("10.96.0.80", 8080, "/"))
            while sock.recv(65536):
                pass
            return sock.getsockname(), access_log(lab)  # still open: read before our FIN

    before = len(access_log(lab))
    (ip, port), log = exchange_without_half_close()
    lines = log[before:]
    assert sorted(l["listener"] for l in lines) == [15001, 15006]
    assert f"{ip}:{port}" in {l["downstream_peer"] for l in lines}


def admin_stats(lab) -> dict[str, int]:
    text = traffic.request(ns(lab, "sidecar"), "127.0.0.1", plan.Port.ADMIN,
                             uid=plan.PROXY_UID, gid=plan.PROXY_GID, path="/stats").body
    return {k: int(v) for k, v in (line.split(": ") for line in text.splitlines())}


def test_stats_count_what_was_proxied(lab):
    before = admin_stats(lab)
    _, (leg,) = proxied(lab, lambda: traffic.request(ns(lab, "sidecar"), REMOTE_IP, plan.Port.REMOTE_APP, **APP))
    after = admin_stats(lab)
    delta = {k: v - before.get(k, 0) for k, v in after.items()
             if v != before.get(k, 0) and not k.endswith("_active")}  # gauges move as earlier tests' sockets close
    assert delta == {
        "listener.0.0.0.0_15001.downstream_cx_total": 1,
        "cluster.PassthroughCluster.upstream_cx_total": 1,
        "cluster.PassthroughCluster.upstream_cx_tx_bytes_total": leg["bytes_from_downstream"],
        "cluster.PassthroughCluster.upstream_cx_rx_bytes_total": leg["bytes_to_downstream"],
    }


# -- identities --------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["envoy", "pilot-agent"])
def test_proxy_processes_are_1337_without_groups_or_capabilities(lab, name):
    status = proc_status(lab.record.pids[name])
    assert status["Uid"].split() == ["1337"] * 4 and status["Gid"].split() == ["1337"] * 4
    assert status["Groups"].strip() == ""
    for caps in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"):
        assert status[caps] == NO_CAPS, caps


# -- pilot-agent and istiod --------------------------------------------------------------

def test_agent_holds_a_stream_to_istiod(lab):
    connects = [e for e in istiod_log(lab) if e["event"] == "connect"]
    assert connects and connects[0]["peer"].startswith(f"{SIDECAR_IP}:")
    assert connects[0]["local"] == f"{ISTIOD_IP}:{plan.Port.ISTIOD}"


def test_agent_redials_when_istiod_drops_the_stream(lab):
    before = istiod_log(lab)
    os.kill(lab.record.pids["istiod"], signal.SIGUSR1)
    fresh = until(lambda: [e for e in istiod_log(lab)[len(before):] if e["event"] == "connect"])
    dropped = [e for e in istiod_log(lab)[len(before):] if e["event"] == "drop"]
    assert dropped and fresh, processes.tail(processes.log_path(lab, "pilot-agent"))
    assert fresh[0]["peer"].startswith(f"{SIDECAR_IP}:") and fresh[0]["peer"] != dropped[0]["peer"]


# -- Prometheus --------------------------------------------------------------------------

def test_prometheus_scrapes_at_start_and_on_signal(lab):
    first = [s for s in proxylogs.read(lab.run_dir, proxylogs.SCRAPE_LOG) if s["round"] == 1]
    assert {s["target"] for s in first} == {f"{SIDECAR_IP}:15090/stats/prometheus", f"{SIDECAR_IP}:15020/stats/prometheus"}
    again = traffic.scrape(lab)
    assert len(again) == 2 and all(s["status"] == 200 and s["bytes"] > 0 for s in again)
    assert all(s["local"].startswith(f"{plan.PODS['prometheus']}:") for s in again)


# -- load --------------------------------------------------------------------------------

def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


@pytest.mark.parametrize("pod,dst,port,listener", [
    ("sidecar", REMOTE_IP, plan.Port.REMOTE_APP, 15001),
    ("remote", SIDECAR_IP, plan.Port.SIDECAR_APP, 15006),
])
def test_200_concurrent_connections_through_each_proxy(lab, pod, dst, port, listener):
    envoy_pid = lab.record.pids["envoy"]
    fds = fd_count(envoy_pid)
    before = len(access_log(lab))
    socks = [traffic.connect(ns(lab, pod), dst, port, **APP) for _ in range(200)]  # all open at once
    try:
        responses = [traffic.get(s) for s in socks]
    finally:
        for s in socks:
            s.close()
    assert [r.status for r in responses] == [200] * 200
    lines = access_log(lab)[before:]
    assert len(lines) == 200 and {l["listener"] for l in lines} == {listener}
    assert [l for l in lines if l["error"]] == []
    assert {l["downstream_peer"] for l in lines} == {str(r.local) for r in responses}
    assert until(lambda: fd_count(envoy_pid) == fds), (fds, fd_count(envoy_pid))


# -- failures and teardown ---------------------------------------------------------------

def test_a_process_that_dies_is_named_with_its_stderr_and_start_undoes_itself():
    with Lab() as other:
        with netns.entered(other.pods["sidecar"].ns):
            squatter = socket.socket()  # a socket belongs to the namespace it is created in
        squatter.bind(("0.0.0.0", plan.Port.OUTBOUND))
        squatter.listen()
        with squatter:
            with pytest.raises(processes.ProcessDied) as failed:
                processes.start(other)
            assert failed.value.name == "envoy"
            assert "envoy exited with status 1" in str(failed.value) and "address already in use" in str(failed.value)
            assert "address already in use" in failed.value.log_tail and "envoy.py" in failed.value.log_tail
            with pytest.raises(LabError, match="^envoy exited"):
                processes.check_alive(other)
            assert [n for n, pid in other.record.pids.items() if os.path.exists(f"/proc/{pid}")] == []


def test_teardown_leaves_no_namespace_and_no_process():
    with Lab() as other:
        processes.start(other)
        inodes = {os.stat(netns.path(n)).st_ino for n in other.namespaces()}
        pids = dict(other.record.pids)
        assert proc_status(pids["envoy"])["Uid"].split()[0] == "1337"
    assert record.lab_namespaces(other.labid) == []
    assert not os.path.exists(other.run_dir)
    assert [name for name, pid in pids.items() if os.path.exists(f"/proc/{pid}")] == []
    left = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if os.stat(f"/proc/{pid}/ns/net").st_ino in inodes:
                left.append(pid)
        except OSError:
            pass
    assert left == []
