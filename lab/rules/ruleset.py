"""The sidecar's rules as a lab applies them: a profile's, or a pod's own dump.

What `--profile` and `--rules` give, checked before any lab exists, and everything the
rest of the lab needs to know about them: the dumps per family (iptables), or a native
nftables rule set (Istio's `nativeNftables`, an `nft -f` script or `nft list ruleset`
output), whose measured paths are the expectation, how inbound traffic reaches Envoy, and
what the rules do besides.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import LabError
from . import annotations, builder, features, foreign, nftbuilder, nftforeign, nftset, profiles
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
    nft: nftset.RuleSet | None = None  # native nftables rules, applied as one nft -f transaction (nft backend only)
    written: tuple[str, ...] = ()  # the backends that write the dumps, in order, into one pod (legacy, nft); () the run's
    counterpart: tuple[Dump, ...] = ()  # native rules built from options: istio-iptables' rules for the same options

    @property
    def native(self) -> bool:
        """The rules are nf_tables' own (not iptables'): only the nft backend can apply them."""
        return self.nft is not None

    @property
    def dual_stack(self) -> bool:
        """Istio installs ip6tables rules (native: ip6 rules) only in a pod with IPv6: only then
        is the lab dual-stack."""
        return any(d.family == 6 for d in self.dumps) or (self.nft is not None and features.nft_ipv6(self.nft))

    @property
    def inbound_mode(self) -> str:
        return features.inbound_mode(self.dumps, self.nft)

    @property
    def one_listener(self) -> bool:
        """Inbound and outbound redirected to one port: Envoy tells them apart itself."""
        return features.one_listener(self.dumps, self.nft)

    @property
    def features(self) -> frozenset[str]:
        return features.of(self.dumps, self.nft)

    @property
    def script(self) -> str:
        """The native rules as the lab applies them: one nft -f transaction, a counter in every rule."""
        return nftset.script(self.nft) if self.nft is not None else ""

    def key(self) -> tuple:
        """What makes two rule sets the same rules (the runner shares a lab between them)."""
        return tuple(d.text() for d in self.dumps) + ((self.script,) if self.nft is not None else ()) + self.written

    @property
    def summary(self) -> str:
        if self.written:
            return f"{self.name}, written by {' and then by '.join(f'iptables-{b}' for b in self.written)} into one pod"
        if self.annotations:
            return f"{self.name}: {self.command}"
        if self.file is None:
            return f"{self.name}, {profiles.summary(self.name)}"
        same = f"the rules of profile {self.profile}" if self.profile else "a rule set of its own: no expectation known"
        return f"Rules from {self.file}: {same}"


def profile(name: str = profiles.DEFAULT) -> RuleSet:
    """A profile's rules; an unknown name is one line (LabError)."""
    p = profiles.get(name)
    if p.native_nftables:
        return RuleSet(name, (), name, istio=builder.parse_version(p.istio), command=p.options.command(),
                       nft=profiles.nft_rules(name), counterpart=tuple(profiles.iptables_counterpart(name)))
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
    init = annotations.inject(pod, p.istio, p.options)
    given = ", ".join(f"{key.rsplit('/', 1)[-1]}={value!r}" for key, value in pod.values.items()) or "none"
    built = dict(name=f"{base} + {pod.source}", notes=init.notes, istio=builder.parse_version(p.istio),
                 command=init.options.command(), annotations=f"annotations: {given}")
    if p.native_nftables:  # the same options, as istio-iptables --native-nftables writes them
        rules = nftbuilder.build(p.istio, init.options)
        same = rules == profiles.nft_rules(base)
        iptables = tuple(d for d in (builder.build(p.istio, profiles.plain(init.options), f) for f in (4, 6)) if d.tables)
        return RuleSet(dumps=(), profile=expect or (base if same else None), nft=rules, counterpart=iptables, **built)
    dumps = tuple(d for d in (builder.build(p.istio, init.options, f) for f in (4, 6)) if d.tables)
    same = [d.text() for d in dumps] == [d.text() for d in profiles.dumps(base)]
    return RuleSet(dumps=dumps, profile=expect or (base if same else None), **built)


def from_file(file: str, scenarios: bool = True, **overrides: int | None) -> RuleSet:
    """A pod's own rules, fitted to the lab: an iptables-save dump (foreign.load), or nft
    rules, `nft list ruleset` output or an `nft -f` script (nftforeign.load), whichever the
    file holds; `overrides` are its proxy_uid, proxy_gid, outbound_port, inbound_port.
    `scenarios`: refuse a dump the article's scenarios would mean nothing under (one flow's
    question takes any)."""
    if _format(file) == "iptables-save":
        pod = foreign.load(file, scenarios=scenarios, **overrides)
        return RuleSet(file, (pod.dump,), pod.profile, file, tuple(pod.notes))
    with open(file) as f:
        native = nftforeign.load(file, f.read(), **overrides)
    return RuleSet(file, (), profiles.match_nft(native.rules), file, tuple(native.notes), nft=native.rules)


NFT_WORDS = ("table", "add", "insert", "create", "flush", "delete", "chain", "define", "include", "destroy")


def _format(file: str) -> str:
    """"iptables-save" or "nft", by the file's first line that is not a comment: `*nat`,
    `:CHAIN`, `-A ...` are iptables-save's; `table ...`, `add rule ...` nft's."""
    try:
        with open(file) as f:
            lines = f.read().splitlines()
    except OSError as e:
        raise LabError(f"{file}: cannot read: {e.strerror}") from None
    except UnicodeDecodeError:
        raise LabError(f"{file}: not a text file (give iptables-save or nft list ruleset output)") from None
    for number, line in enumerate(lines, 1):
        text = line.strip()
        if not text or text.startswith("#"):
            continue
        if text[0] in "*:-" or text == "COMMIT":
            return "iptables-save"
        if text.split()[0] in NFT_WORDS:
            return "nft"
        raise LabError(f"{file}:{number}: {text!r}: neither iptables-save output (*nat, -A ...) nor nft rules "
                       f"(table ..., add rule ...)")
    raise LabError(f"{file}: no rules in it (give iptables-save or nft list ruleset output)")
