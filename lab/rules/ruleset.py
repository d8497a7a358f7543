"""The sidecar's rules as a lab applies them: a profile's, or a pod's own dump.

What `--profile` and `--rules` give, checked before any lab exists, and everything the
rest of the lab needs to know about them: the dumps per family, whose measured paths are
the expectation, how inbound traffic reaches Envoy, and what the rules do besides.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import LabError
from . import annotations, builder, features, foreign, profiles
from .save import Dump


@dataclass(frozen=True)
class RuleSet:
    name: str  # the profile's name, or the dump's file
    dumps: tuple[Dump, ...]  # IPv4, then IPv6 where it has any
    profile: str | None  # whose expected paths apply; for a dump, the profile it holds exactly, if any
    file: str | None = None  # a pod's own dump
    notes: tuple[str, ...] = ()  # what fitting a dump to the lab changed
    istio: tuple[int, int] | None = None  # the Istio version the rules are built for (None: a dump's)
    command: str = ""  # the istio-iptables command line the rules stand for (built rules only)
    annotations: str = ""  # the pod annotations they were built with, in one line ("" for none)

    @property
    def dual_stack(self) -> bool:
        """Istio installs ip6tables rules only in a pod with IPv6: only then is the lab dual-stack."""
        return any(d.family == 6 for d in self.dumps)

    @property
    def inbound_mode(self) -> str:
        return features.inbound_mode(self.dumps)

    @property
    def one_listener(self) -> bool:
        """Inbound and outbound redirected to one port: Envoy tells them apart itself."""
        return features.one_listener(self.dumps)

    @property
    def features(self) -> frozenset[str]:
        return features.of(self.dumps)

    @property
    def summary(self) -> str:
        if self.annotations:
            return f"{self.name}: {self.command}"
        if self.file is None:
            return f"{self.name}, {profiles.summary(self.name)}"
        same = f"the rules of profile {self.profile}" if self.profile else "a rule set of its own: no expectation known"
        return f"Rules from {self.file}: {same}"


def profile(name: str = profiles.DEFAULT) -> RuleSet:
    """A profile's rules; an unknown name is one line (LabError)."""
    p = profiles.get(name)
    return RuleSet(name, tuple(profiles.dumps(name)), name, istio=builder.parse_version(p.istio),
                   command=p.options.command())


def from_annotations(pod: annotations.PodAnnotations, base: str = profiles.DEFAULT,
                     expect: str | None = None) -> RuleSet:
    """A profile's Istio version and options with a pod's interception annotations on top, as
    that version's injector hands them to istio-init (annotations.inject), built by the
    builder.  Whose expected paths apply: `expect` (a scenario's own pod, written for its
    annotations on this profile), else the profile's when the annotations change no rule,
    else none.  Bad annotations, or options that version cannot build, are one line (LabError)."""
    p = profiles.get(base)
    if p.native_nftables:
        raise LabError(f"{base} is a native nftables profile: annotations are built into iptables rules here")
    init = annotations.inject(pod, p.istio, p.options)
    dumps = tuple(d for d in (builder.build(p.istio, init.options, f) for f in (4, 6)) if d.tables)
    same = [d.text() for d in dumps] == [d.text() for d in profiles.dumps(base)]
    given = ", ".join(f"{key.rsplit('/', 1)[-1]}={value!r}" for key, value in pod.values.items()) or "none"
    return RuleSet(f"{base} + {pod.source}", dumps, expect or (base if same else None), notes=init.notes,
                   istio=builder.parse_version(p.istio), command=init.options.command(),
                   annotations=f"annotations: {given}")


def from_file(file: str, scenarios: bool = True, **overrides: int | None) -> RuleSet:
    """A pod's iptables-save dump, fitted to the lab (foreign.load; `overrides` are its
    proxy_uid, proxy_gid, outbound_port, inbound_port).  `scenarios`: refuse a dump the
    article's scenarios would mean nothing under (one flow's question takes any)."""
    pod = foreign.load(file, scenarios=scenarios, **overrides)
    return RuleSet(file, (pod.dump,), pod.profile, file, tuple(pod.notes))
