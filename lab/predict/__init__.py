"""predict: which rules a flow takes, read from the rule set alone (no root, no kernel).

    predictor = Predictor(profiles.dumps("istio-1.13"))     # or Predictor.of(ruleset.profile("istio-1.27-nft"))
    prediction = predictor.predict(Flow("sidecar", "10.96.0.90", 9080, uid=1000, gid=1000))
    str(prediction.path)   # Local Pod -> OUTPUT -> ISTIO_OUTPUT RULE 9 -> ISTIO_REDIRECT -> Envoy 15001 ...
    prediction.misses()    # [Miss(rule=ISTIO_OUTPUT#1, needs="-s 127.0.0.6/32", has="the source is ..."), ...]

Two readers, one walk: iptables-save dumps (lab.predict.iptables) and nftables rule sets
(lab.predict.nft) become the same tables of chains of rules (lab.predict.chains), registered
at the hooks as the kernel orders them (lab.predict.hooks: priorities, conntrack, the nat
core; the backend that wrote last first).  The walk is the kernel's (lab.predict.stack:
routing, conntrack and nat's once-per-connection judgement; lab.predict.chains:
ipt_do_table, nft_do_chain), the lab's world and proxies are lab.world's and the stubs'
(lab.predict.topology, lab.predict.proxies), and the path is written as lab.path writes the
measured one (lab.predict.notation).  What it does not model it refuses: CannotPredict.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from ..errors import LabError
from ..path import Path
from ..podspec import PodSpec
from ..rules.nftset import RuleSet as NftRules
from ..rules.ruleset import RuleSet
from ..rules.save import Dump
from .errors import CannotPredict
from .flow import Flow, Walk, walk
from .notation import Miss, marks, misses, to_path
from .topology import Topology, Written

__all__ = ["CannotPredict", "Flow", "Miss", "Prediction", "Predictor"]


@dataclass(frozen=True)
class Prediction:
    walk: Walk
    topology: Topology

    @property
    def path(self) -> Path:
        return to_path(marks(self.walk))

    def misses(self) -> list[Miss]:
        return misses(self.walk, self.topology)


class Predictor:
    """A sidecar pod's rules in the lab's world, read once and asked about any number of flows:
    iptables-save dumps (one per family: ip6tables-save's too in a dual-stack pod), native
    nftables rules, or both; `written`: the backends that wrote the dumps into the pod, in
    that order, for a pod whose rules a scenario says who wrote (a pod written twice holds
    them twice; its hops say whose: `(nft)`, `(mangle, legacy)`)."""

    def __init__(self, dumps: Sequence[Dump] = (), spec: PodSpec = PodSpec(), nft: NftRules | None = None,
                 written: Sequence[str] = ()):
        self.topology = Topology(_written(tuple(dumps), nft, tuple(written)), spec)

    @classmethod
    def of(cls, rules: RuleSet, spec: PodSpec = PodSpec()) -> "Predictor":
        """The rules a profile, a dump, annotations or a scenario gave (lab.rules.ruleset)."""
        return cls(rules.dumps, spec, rules.nft, rules.written)

    def predict(self, flow: Flow) -> Prediction:
        return Prediction(walk(self.topology, flow), self.topology)


def _written(dumps: tuple[Dump, ...], nft: NftRules | None, written: tuple[str, ...]) -> list[Written]:
    """What each backend wrote, in order: every one the dumps, nf_tables its native rules after them."""
    if not written:
        return [Written("", dumps, nft)]
    if nft is not None and "nft" not in written:
        raise LabError("native nftables rules go into nf_tables: a pod written by legacy alone cannot hold them")
    return [Written(backend, dumps, nft if backend == "nft" else None) for backend in written]
