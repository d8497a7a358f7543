"""One Envoy port for both directions (Istio 1.0 and 1.1; 1.5 with listed inbound ports), and
the loops it makes, offline: the rules read, the stub Envoy's choice of side, the dump
fitted without moving both redirects."""

from __future__ import annotations

from pathlib import Path

import pytest

from lab import plan
from lab.predict import Flow, Predictor
from lab.rules import builder, features, foreign, profiles, ruleset, save
from lab.sidecar import envoy

REPO = Path(__file__).resolve().parent.parent
ISTIO_1_0 = REPO / "tests" / "data" / "dumps" / "istio-1.0.rules"


def test_rules_that_send_inbound_to_the_outbound_port_are_read_so() -> None:
    assert features.one_listener([save.parse(ISTIO_1_0.read_text())])
    assert not any(features.one_listener(profiles.dumps(name)) for name in profiles.names())
    # Istio 1.5 sent listed inbound ports to the proxy port (15006 took only "*")
    listed = builder.build("1.5", builder.Options(inbound_ports=("8080",)))
    assert features.one_listener([listed]) and not features.one_listener([builder.build("1.5", builder.Options())])


def test_fitting_a_dump_keeps_one_port_for_both(tmp_path) -> None:
    """Renumbering the inbound port to the lab's 15006 would rewrite every `--to-ports 15001`,
    the outbound redirect's too (the known bug): one port for both stays the outbound one."""
    pod = foreign.load(str(ISTIO_1_0))
    assert pod.notes == ["inbound and outbound are redirected to one port, 15001: Envoy serves both there and tells "
                         "them apart by the original destination (Istio 1.0, 1.1)"]
    assert [r.option("--to-ports") for r in pod.dump.tables["nat"].rules if r.target == "REDIRECT"] == ["15001", "15001"]
    moved = tmp_path / "moved.rules"
    moved.write_text(ISTIO_1_0.read_text().replace("15001", "15101"))
    pod = foreign.load(str(moved))
    assert "outbound port 15101 is the lab's 15001 here: renumbered" in pod.notes
    assert [r.option("--to-ports") for r in pod.dump.tables["nat"].rules if r.target == "REDIRECT"] == ["15001", "15001"]


def test_native_rules_that_send_inbound_to_the_outbound_port_keep_it_and_run_one_listener(tmp_path) -> None:
    """As for a dump: one port for both is read so, and stays the outbound one (renumbering it
    to the lab's 15006 once rewrote the outbound redirect too)."""
    text = profiles.nft_text("istio-1.27-nft")
    assert not ruleset.from_file(_write(tmp_path, text)).one_listener
    rules = ruleset.from_file(_write(tmp_path, text.replace("redirect to :15006", "redirect to :15001")))
    assert rules.notes == ("inbound and outbound are redirected to one port, 15001: Envoy serves both there and tells "
                           "them apart by the original destination (Istio 1.0, 1.1)",)
    assert [r.words[-1] for _, r in rules.nft.numbered() if "redirect" in r.words] == [":15001", ":15001"]
    assert rules.one_listener and features.one_listener([], rules.nft)
    assert Predictor.of(rules).topology.one_listener
    moved = ruleset.from_file(_write(tmp_path, text.replace("redirect to :15006", "redirect to :15101").replace(
        "redirect to :15001", "redirect to :15101")))
    assert "outbound port 15101 is the lab's 15001 here: renumbered" in moved.notes and moved.one_listener


def _write(tmp_path, text: str) -> str:
    (tmp_path / "pod.nft").write_text(text)
    return str(tmp_path / "pod.nft")


def test_a_dump_with_no_istio_chain_is_fair_for_one_flow_not_for_the_scenarios(tmp_path) -> None:
    bare = tmp_path / "bare.rules"
    bare.write_text("*filter\n:OUTPUT ACCEPT [0:0]\n-A OUTPUT -p tcp --dport 22 -j REJECT\nCOMMIT\n")
    pod = foreign.load(str(bare), scenarios=False)
    assert pod.notes[0].startswith("no Istio chain: the pod's traffic meets no Istio rule")
    with pytest.raises(Exception, match=r"no \*nat table"):
        foreign.load(str(bare))


@pytest.mark.parametrize("one, listener, dst, side", [
    (True, plan.Port.OUTBOUND, (plan.PODS["sidecar"], 8080), "Inbound"),
    (True, plan.Port.OUTBOUND, (plan.PODS6["sidecar"], 8080), "Inbound"),
    (True, plan.Port.OUTBOUND, (plan.PODS["remote"], 9080), "Outbound"),
    (True, plan.Port.OUTBOUND, ("10.96.0.90", 9080), "Outbound"),
    (False, plan.Port.OUTBOUND, (plan.PODS["sidecar"], 8080), "Outbound"),
    (False, plan.Port.INBOUND, (plan.PODS["sidecar"], 8080), "Inbound"),
])
def test_envoy_tells_the_sides_apart_by_the_original_destination(tmp_path, one, listener, dst, side) -> None:
    log = tmp_path / "access.jsonl"
    log.write_text("")
    stub = envoy.Envoy(envoy.Config(str(log), envoy.endpoints_from(), one_listener=one))
    assert stub.role(listener, dst) == side
    endpoint, source = stub.route(listener, dst, ("10.244.0.20", 40000))
    if side == "Inbound":  # the inbound passthrough: from 127.0.0.6 (::6) to the original destination
        assert source[0] in (plan.INBOUND_PASSTHROUGH_SOURCE, plan.INBOUND_PASSTHROUGH_SOURCE6)
        assert (endpoint.ip, endpoint.port) == dst
    else:
        assert source is None


def test_envoy_closes_a_connection_to_its_own_port_before_it_looks_for_a_loop(tmp_path) -> None:
    """The stub (as Envoy's blackhole filter chains) closes a connection whose original
    destination is the listener's own port first: the proxy's inbound dial to the pod's 15006,
    after one listener took it inbound at 15001, is closed there, not a loop (the kernel: seed
    11 of the native rule sets)."""
    text = profiles.nft_text("istio-1.27-nft").replace("redirect to :15006", "redirect to :15001")
    rules = ruleset.from_file(_write(tmp_path, text))
    path = str(Predictor.of(rules).predict(Flow("sidecar", plan.PODS["sidecar"], 15006, 1337, 1000)).path)
    assert path.endswith("-> Envoy 15006 (Inbound) -> blackhole, closed"), path
