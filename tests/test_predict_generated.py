"""predict on rule sets Istio generates from any options, without a kernel.

Whatever istio-iptables was given (include and exclude, inbound and outbound, ports and
CIDRs, the proxy's uid and gid, DNS capture, TPROXY, IPv6) and whichever version wrote
it, iptables rules or native nftables ones (--native-nftables), predict understands every
rule of it: no flow meets a rule it cannot predict.  And
what Istio promises holds in the prediction: the proxy's own traffic to another pod is
never sent back into Envoy.  The kernel checks a sample of these rule sets
(tests/test_predict_kernel.py).
"""

from __future__ import annotations

from hypothesis import assume, given, settings

from lab import plan
from lab.predict import Flow, Predictor
from lab.rules import builder, nftbuilder, nftset
from lab.rules.builder import BuildError

from .predict_flows import flows, nft_edited, nft_options, nft_text, options

PROXY = plan.SIDECAR_IDENTITY


@settings(max_examples=150, deadline=None, database=None)
@given(chosen=options(), flow=flows(dual_stack=True))
def test_every_rule_istio_writes_is_understood(chosen, flow: Flow) -> None:
    version, opts = chosen
    dumps = [d for d in (builder.build(version, opts, 4), builder.build(version, opts, 6)) if d.tables]
    predictor = Predictor(dumps)
    prediction = predictor.predict(flow)  # CannotPredict would fail the test
    path = str(prediction.path)
    assert path.startswith(flow.labels[0] + " -> "), path


@settings(max_examples=150, deadline=None, database=None)
@given(chosen=options())
def test_the_proxys_own_connection_to_another_pod_never_meets_envoy(chosen) -> None:
    """Envoy's and pilot-agent's connections (the identity the lab runs them as) to the remote
    pod leave without a proxy whenever the rules exempt that identity."""
    version, opts = chosen
    predictor = Predictor([builder.build(version, opts, 4)])
    proxy = PROXY[predictor.topology.mode]
    if proxy.uid in opts.proxy_uid or proxy.gid in opts.gids:
        walk = predictor.predict(Flow("sidecar", plan.PODS["remote"], plan.Port.REMOTE_APP, proxy.uid, proxy.gid)).walk
        assert walk.ending.kind == "reached" and len(walk.legs) == 1, (opts.command(), walk.ending)


def _native(version: str, opts: nftbuilder.NftOptions) -> Predictor:
    try:
        rules = nftbuilder.build(version, opts)
    except BuildError:  # options Istio's transaction would fail on (a jump into a chain left empty)
        assume(False)
    return Predictor(nft=rules)


@settings(max_examples=150, deadline=None, database=None)
@given(chosen=nft_options(), edit=nft_edited(), flow=flows(dual_stack=True))
def test_every_rule_istio_nftables_writes_is_understood(chosen, edit, flow: Flow) -> None:
    version, opts = chosen
    _native(version, opts)  # builds, or the example is not one Istio writes
    text, _ = edit(nft_text(version, opts))
    predictor = Predictor(nft=nftset.parse(text))
    if flow.family == 6 and not predictor.topology.dual_stack:
        flow = Flow(flow.source, plan.PODS[flow.source], flow.port, flow.uid, flow.gid, transport=flow.transport)
    path = str(predictor.predict(flow).path)  # CannotPredict would fail the test
    assert path.startswith(flow.labels[0] + " -> "), path


@settings(max_examples=100, deadline=None, database=None)
@given(chosen=nft_options())
def test_under_native_rules_the_proxys_own_connection_to_another_pod_never_meets_envoy(chosen) -> None:
    version, opts = chosen
    predictor = _native(version, opts)
    proxy = PROXY[predictor.topology.mode]
    if proxy.uid in opts.proxy_uid or proxy.gid in opts.gids:
        walk = predictor.predict(Flow("sidecar", plan.PODS["remote"], plan.Port.REMOTE_APP, proxy.uid, proxy.gid)).walk
        assert walk.ending.kind == "reached" and len(walk.legs) == 1, (opts.command(), walk.ending)
