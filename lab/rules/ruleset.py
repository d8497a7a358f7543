"""The sidecar's rules as a lab applies them: a profile's, or a pod's own dump.

What `--profile` and `--rules` give, checked before any lab exists, and everything the
rest of the lab needs to know about them: the dumps per family, whose measured paths are
the expectation, how inbound traffic reaches Envoy, and what the rules do besides.
"""

from __future__ import annotations

from dataclasses import dataclass

from . import features, foreign, profiles
from .save import Dump


@dataclass(frozen=True)
class RuleSet:
    name: str  # the profile's name, or the dump's file
    dumps: tuple[Dump, ...]  # IPv4, then IPv6 where it has any
    profile: str | None  # whose expected paths apply; for a dump, the profile it holds exactly, if any
    file: str | None = None  # a pod's own dump
    notes: tuple[str, ...] = ()  # what fitting a dump to the lab changed

    @property
    def dual_stack(self) -> bool:
        """Istio installs ip6tables rules only in a pod with IPv6: only then is the lab dual-stack."""
        return any(d.family == 6 for d in self.dumps)

    @property
    def inbound_mode(self) -> str:
        return features.inbound_mode(self.dumps)

    @property
    def features(self) -> frozenset[str]:
        return features.of(self.dumps)

    @property
    def summary(self) -> str:
        if self.file is None:
            return f"{self.name}, {profiles.summary(self.name)}"
        same = f"the rules of profile {self.profile}" if self.profile else "a rule set of its own: no expectation known"
        return f"Rules from {self.file}: {same}"


def profile(name: str = profiles.DEFAULT) -> RuleSet:
    """A profile's rules; an unknown name is one line (LabError)."""
    profiles.get(name)
    return RuleSet(name, tuple(profiles.dumps(name)), name)


def from_file(file: str, **overrides: int | None) -> RuleSet:
    """A pod's iptables-save dump, fitted to the lab (foreign.load; `overrides` are its
    proxy_uid, proxy_gid, outbound_port, inbound_port)."""
    pod = foreign.load(file, **overrides)
    return RuleSet(file, (pod.dump,), pod.profile, file, tuple(pod.notes))
