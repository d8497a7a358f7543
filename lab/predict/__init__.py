"""predict: which rules a flow takes, read from the rule set alone (no root, no kernel).

    predictor = Predictor(profiles.dumps("istio-1.13"))
    prediction = predictor.predict(Flow("sidecar", "10.96.0.90", 9080, uid=1000, gid=1000))
    str(prediction.path)   # Local Pod -> OUTPUT -> ISTIO_OUTPUT RULE 9 -> ISTIO_REDIRECT -> Envoy 15001 ...
    prediction.misses()    # [Miss(rule=ISTIO_OUTPUT#1, needs="-s 127.0.0.6/32", has="the source is ..."), ...]

The walk is the kernel's (lab.predict.stack: hooks and tables in priority order, routing,
conntrack and nat's once-per-connection judgement; lab.predict.chains: ipt_do_table), the
lab's world and proxies are lab.world's and the stubs' (lab.predict.topology,
lab.predict.proxies), and the path is written as lab.path writes the measured one
(lab.predict.notation).  What it does not model it refuses: CannotPredict.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from ..path import Path
from ..podspec import PodSpec
from ..rules.save import Dump
from .errors import CannotPredict
from .flow import Flow, Walk, walk
from .notation import Miss, marks, misses, to_path
from .topology import Topology

__all__ = ["CannotPredict", "Flow", "Miss", "Prediction", "Predictor", "predict"]


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
    """A rule set (one dump per family: iptables-save, and ip6tables-save for a dual-stack pod)
    in the lab's world, read once and asked about any number of flows."""

    def __init__(self, dumps: Sequence[Dump], spec: PodSpec = PodSpec()):
        self.topology = Topology(dumps, spec)

    def predict(self, flow: Flow) -> Prediction:
        return Prediction(walk(self.topology, flow), self.topology)


def predict(dumps: Sequence[Dump], flow: Flow, spec: PodSpec = PodSpec()) -> Prediction:
    return Predictor(dumps, spec).predict(flow)
