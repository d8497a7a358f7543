"""`istio-lab probe`: one flow of your own, measured by the kernel in a lab built for it.

The path in the article's notation with each hop's rule, the counters beside TRACE; `--json`
one result in `run --json`'s schema; exit 0 when measured (whatever the path), 1 when it
could not be (and why), 2 for bad input.  Every ending predict writes is measured, and
predict's path is the kernel's."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from lab import backend as backends
from lab.predict import Flow, Predictor
from lab.rules import profiles, ruleset

pytestmark = pytest.mark.kernel

REPO = Path(__file__).resolve().parent.parent
ISTIO_1_0 = REPO / "tests" / "data" / "dumps" / "istio-1.0.rules"


def _cli(*argv: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lab.cli", *argv], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout)


def _write(tmp_path: Path, text: str, name: str = "pod.rules") -> str:
    (tmp_path / name).write_text(text)
    return str(tmp_path / name)


def test_probe_prints_the_path_each_hops_rule_and_the_counters_beside_trace() -> None:
    done = _cli("probe", "--from", "sidecar", "--to", "remote:9080")
    assert done.returncode == 0, done.stderr
    out = done.stdout
    assert ("kernel : Local Pod -> OUTPUT -> ISTIO_OUTPUT RULE 9 -> ISTIO_REDIRECT -> Envoy 15001 (Outbound) -> "
            "OUTPUT -> ISTIO_OUTPUT RULE 4 -> POSTROUTING -> Remote Pod") in out
    assert "ISTIO_OUTPUT RULE 9     -A ISTIO_OUTPUT -j ISTIO_REDIRECT" in out
    assert "OUTPUT                  -A OUTPUT -p tcp -j ISTIO_OUTPUT" in out  # (legacy's TRACE adds the socket's owner)
    assert "counters vs TRACE (legacy): agree" in out or "counters vs TRACE (nft): agree" in out
    assert "ISTIO_OUTPUT#9           counter +1   TRACE 1" in out
    assert "reached: remote 10.244.0.20:9080" in out


def test_a_native_nftables_profile_is_probed_on_nf_tables_whatever_auto_would_pick(monkeypatch) -> None:
    """auto means nft for native rules, even where it would pick legacy for iptables ones."""
    monkeypatch.setenv("ISTIO_LAB_BACKEND", "legacy")
    done = _cli("probe", "--profile", "istio-1.27-nft", "--from", "sidecar:1000", "--to", "10.96.0.90:9080")
    assert done.returncode == 0, done.stderr
    assert ("kernel : Local Pod -> OUTPUT -> istio-output RULE 9 -> istio-redirect -> Envoy 15001 (Outbound) -> "
            "OUTPUT -> istio-output RULE 4 -> POSTROUTING -> Remote Pod") in done.stdout
    assert "counters vs TRACE (nft): agree" in done.stdout


def test_probe_json_is_one_result_in_runs_schema() -> None:
    probe = _cli("probe", "--from", "sidecar:1337", "--to", "10.96.0.90:9080", "--json")
    run = _cli("run", "--json", "type2-local-to-remote")
    assert probe.returncode == 0 and run.returncode == 0, probe.stderr + run.stderr
    result, scenario = json.loads(probe.stdout), json.loads(run.stdout)["scenarios"][0]
    assert set(scenario) - {"article_note"} <= set(result)
    assert result["measured_path"] == ("Local Pod -> OUTPUT -> ISTIO_OUTPUT RULE 4 -> POSTROUTING -> "
                                       "KUBE-SEP-REMOTE RULE 2 (node) -> Remote Pod")
    assert result["verdict"] == "pass" and result["matches_article"] is None and result["agreement"] == "no claim"
    assert result["flow"] == "sidecar (uid 1337, gid 1337) -> 10.96.0.90:9080 over TCP"
    assert result["rule_hits"] == ["OUTPUT#1", "ISTIO_OUTPUT#4"]


def _both(rules, source: str, address: str, port: int, uid: int, udp: bool = False) -> tuple[str, str]:
    """(predict's path, the kernel's, through the probe command)."""
    dumps = ruleset.from_file(rules, scenarios=False).dumps if rules else profiles.dumps(profiles.DEFAULT)
    predicted = str(Predictor(dumps).predict(Flow(source, address, port, uid, uid,
                                                  transport="udp" if udp else "tcp")).path)
    done = _cli("probe", *(("--rules", rules) if rules else ()), "--from", f"{source}:{uid}",
                "--to", f"{address}:{port}", *(("--udp",) if udp else ()), "--json")
    assert done.returncode == 0, done.stderr
    return predicted, json.loads(done.stdout)["measured_path"]


def test_every_ending_is_measured_as_predict_writes_it(tmp_path) -> None:
    text = profiles.text(profiles.DEFAULT)
    dropped = _write(tmp_path, text + "*mangle\n:OUTPUT ACCEPT [0:0]\n-A OUTPUT -p tcp --dport 9080 -j DROP\nCOMMIT\n",
                     "drop.rules")
    rejected = _write(tmp_path, text + "*filter\n:OUTPUT ACCEPT [0:0]\n-A OUTPUT -p tcp --dport 9080 -j REJECT "
                      "--reject-with tcp-reset\nCOMMIT\n", "reject.rules")
    policy = _write(tmp_path, text + "*filter\n:INPUT ACCEPT [0:0]\n:OUTPUT DROP [0:0]\n"
                    "-A OUTPUT -o lo -j ACCEPT\n-A OUTPUT -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT\n"
                    "-A OUTPUT -p tcp -m owner --uid-owner 1337 --dport 15012 -j ACCEPT\nCOMMIT\n", "policy.rules")
    cases = [
        (dropped, "sidecar", "10.244.0.20", 9080, 1000, False, "Local Pod -> OUTPUT -> OUTPUT (mangle) -> DROP"),
        (rejected, "sidecar", "10.244.0.20", 9080, 1000, False, "-> ISTIO_OUTPUT RULE 4 -> OUTPUT (filter) -> REJECT"),
        (policy, "sidecar", "10.244.0.20", 9080, 1337, False,
         "Local Pod -> OUTPUT -> ISTIO_OUTPUT RULE 4 -> OUTPUT POLICY (filter) -> DROP"),
        (None, "sidecar", "10.96.0.99", 80, 1337, False, "-> POSTROUTING -> node: no route to 10.96.0.99, unreachable"),
        (None, "sidecar", "10.244.0.10", 15008, 1337, False,
         "-> Envoy 15006 (Inbound) -> OUTPUT -> ISTIO_OUTPUT RULE 1 -> POSTROUTING -> Local Pod 15008: no listener, refused"),
        (None, "sidecar", "10.244.0.10", 15006, 1337, False, "-> Envoy 15006 (Inbound) -> blackhole, closed"),
        (str(ISTIO_1_0), "remote", "10.244.0.10", 8080, 1000, False,
         "-> ISTIO_IN_REDIRECT -> Envoy 15001 (Inbound) -> OUTPUT -> ISTIO_OUTPUT RULE 1 -> ISTIO_REDIRECT -> "
         "Envoy 15001 (loop)"),
        (None, "sidecar", "10.96.0.90", 9080, 1000, True, "-> POSTROUTING -> KUBE-SEP-REMOTE RULE 3 (node) -> Remote Pod"),
        (None, "sidecar", "10.244.0.30", 15012, 1000, True, "-> POSTROUTING -> Istiod 15012: no listener, refused"),
    ]
    for rules, source, address, port, uid, udp, ending in cases:
        predicted, measured = _both(rules, source, address, port, uid, udp)
        assert measured == predicted and measured.endswith(ending), (rules, source, address, port, predicted, measured)


def test_a_drop_in_nat_as_the_issue_writes_it(tmp_path) -> None:
    """`-A ISTIO_OUTPUT -p tcp --dport 9080 -j DROP` on top of nat's ISTIO_OUTPUT: the kernel takes it
    (the legacy backend loads it through libiptc), iptables itself refuses DROP in nat, and so
    iptables-nft-restore, the nft backend's loader, does: there it is bad input, in its words."""
    text = profiles.text(profiles.DEFAULT).replace("-A ISTIO_OUTPUT -s 127.0.0.6/32", "-A ISTIO_OUTPUT -p tcp --dport "
                                                   "9080 -j DROP\n-A ISTIO_OUTPUT -s 127.0.0.6/32", 1)
    rules = _write(tmp_path, text)
    done = _cli("probe", "--rules", rules, "--from", "sidecar", "--to", "remote:9080", "--json")
    if backends.choose(backends.AUTO)[0].name == backends.NFT:
        assert done.returncode == 2 and 'The "nat" table is not intended for filtering' in done.stderr
        return
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["measured_path"] == "Local Pod -> OUTPUT -> ISTIO_OUTPUT RULE 1 -> DROP"


def test_a_loop_is_stopped_at_its_second_pass_and_nothing_overruns() -> None:
    """Istio 1.0's rules send Envoy's own inbound connection (from 127.0.0.6, today's Envoy) back to
    15001, where Envoy serves inbound and outbound alike: the stub closes it at the second pass."""
    done = _cli("probe", "--rules", str(ISTIO_1_0), "--from", "sidecar", "--to", "sidecar:8080")
    assert done.returncode == 0, done.stderr
    assert "inbound and outbound are redirected to one port, 15001" in done.stdout
    assert done.stdout.count("Envoy 15001 (loop)") == 2  # the path, and its hop
    assert "overrun" not in done.stdout + done.stderr


def test_a_dump_with_no_istio_chain_is_measured(tmp_path) -> None:
    bare = _write(tmp_path, "*nat\n:PREROUTING ACCEPT [0:0]\n:INPUT ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n"
                            ":POSTROUTING ACCEPT [0:0]\nCOMMIT\n")
    predicted, measured = _both(bare, "sidecar", "10.244.0.20", 9080, 1000)
    assert measured == predicted == "Local Pod -> OUTPUT -> POSTROUTING -> Remote Pod"


def test_exit_1_when_the_flow_could_not_be_measured_and_2_for_bad_input(tmp_path) -> None:
    # every packet the pod sends is dropped: the lab cannot even come up (Prometheus's scrapes go unanswered)
    closed = _write(tmp_path, profiles.text(profiles.DEFAULT) + "*filter\n:OUTPUT DROP [0:0]\nCOMMIT\n")
    done = _cli("probe", "--rules", closed, "--from", "sidecar", "--to", "remote:9080")
    assert done.returncode == 1 and done.stdout == "", done.stdout
    assert done.stderr.startswith("istio-lab: not measured: ") and done.stderr.count("\n") == 1, done.stderr
    refused = _write(tmp_path, profiles.text(profiles.DEFAULT).replace("-j ISTIO_REDIRECT", "-m nosuchmatch -j ISTIO_REDIRECT"),
                     "refused.rules")
    done = _cli("probe", "--rules", refused, "--from", "sidecar", "--to", "remote:9080")
    assert done.returncode == 2 and done.stderr.count("\n") == 1 and "nosuchmatch" in done.stderr, done.stderr
    done = _cli("probe", "--from", "sidecar", "--to", "nowhere:80")
    assert done.returncode == 2 and done.stderr.count("\n") == 1
