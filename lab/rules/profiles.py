"""Profiles: profiles.yaml maps a name to an Istio version and istio-iptables' options.

The rules themselves are built (builder.py; nftbuilder.py for the native nftables
profiles), not stored: a profile is the options a default sidecar of that Istio was set up
with.  profiles/istio-1.13.rules stays as the golden copy of the article's rules that the
builder must reproduce.  The iptables functions (names, load, dumps, text, match) see the
iptables profiles only; nft_rules and nft_text give a native nftables profile's rules.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, fields
from importlib import resources

import yaml

from ..errors import LabError
from . import builder, nftbuilder, nftlisting, nftset, save

DEFAULT = "istio-1.13"  # Istio 1.13 - 1.17, the article's era
PROFILES = "profiles.yaml"


@dataclass(frozen=True)
class Profile:
    name: str
    istio: str  # the release the builder models
    versions: str  # the releases it stands for, e.g. "1.13 - 1.17"
    summary: str
    options: builder.Options
    native_nftables: bool = False  # Istio's nft rules (values.global.nativeNftables), not its iptables ones


@functools.cache
def profiles() -> dict[str, Profile]:
    where = f"lab/rules/{PROFILES}"
    text = resources.files(__package__).joinpath(PROFILES).read_text()
    data = yaml.load(text, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    out = {}
    for name, entry in data.items():
        if not isinstance(entry, dict) or not {"istio", "versions", "summary"} <= set(entry):
            raise LabError(f"{where}: {name}: needs istio, versions and summary")
        native = entry.get("native_nftables", False)
        if not isinstance(native, bool):
            raise LabError(f"{where}: {name}: native_nftables: expected true or false, got {native!r}")
        options = (nftbuilder.NftOptions if native else builder.Options).from_mapping(
            entry.get("options") or {}, f"{where}: {name}")
        (nftbuilder if native else builder).parse_version(entry["istio"])
        out[name] = Profile(name, str(entry["istio"]), str(entry["versions"]), entry["summary"], options, native)
    return out


def names(native_nftables: bool | None = False) -> list[str]:
    """The iptables profiles, or the native nftables ones (None: every profile, in file order)."""
    return [name for name, p in profiles().items() if native_nftables in (None, p.native_nftables)]


def get(name: str = DEFAULT) -> Profile:
    try:
        return profiles()[name]
    except KeyError:
        raise LabError(f"no rule profile {name!r} (profiles: {', '.join(profiles())})") from None


def summary(name: str = DEFAULT) -> str:
    """One line: which Istio it is and what sets it apart."""
    p = get(name)
    return f"Istio {p.versions} sidecar, {p.summary}"


def load(name: str = DEFAULT, family: int = 4) -> save.Dump:
    """The profile's rules for one family (4: iptables, 6: ip6tables; empty without IPv6)."""
    p = get(name)
    if p.native_nftables:
        raise LabError(f"{name} is a native nftables profile: it has no iptables rules")
    return builder.build(p.istio, p.options, family)


def nft_rules(name: str) -> nftset.RuleSet:
    """A native nftables profile's rules, as istio-nftables writes them (no lab counters yet)."""
    p = get(name)
    if not p.native_nftables:
        raise LabError(f"{name} is an iptables profile: it has no native nftables rules")
    return nftbuilder.build(p.istio, p.options)


def plain(options: builder.Options) -> builder.Options:
    """istio-iptables' options alone, without those only the native rules model."""
    return builder.Options(**{f.name: getattr(options, f.name) for f in fields(builder.Options)})


def iptables_counterpart(name: str) -> list[save.Dump]:
    """A native nftables profile's iptables twin: what istio-iptables writes for the same
    options without --native-nftables (IPv4, then IPv6 when it has any)."""
    p = get(name)
    return [d for d in (builder.build(p.istio, plain(p.options), f) for f in (4, 6)) if d.tables]


def nft_text(name: str) -> str:
    """A native nftables profile as the `nft -f` script the lab applies (a counter in every
    rule), with a header saying what it is."""
    header = (f"{summary(name)}.", get(name).options.command(),
              "One nft -f transaction; the lab adds a counter to every rule that has none.")
    return nftset.script(nft_rules(name), header=header)


def dual_stack(name: str = DEFAULT) -> bool:
    """The profile's pod has IPv6 as well: Istio installs ip6tables rules only then."""
    return get(name).options.ipv6


def dumps(name: str = DEFAULT) -> list[save.Dump]:
    """Every non-empty dump of the profile: IPv4, then IPv6 when it has any."""
    return [d for d in (load(name, 4), load(name, 6)) if d.tables]


def text(name: str = DEFAULT, family: int = 4) -> str:
    """The profile as iptables-save (or ip6tables-save) text, with a header saying what it is."""
    p = get(name)
    header = (f"{summary(name)}.", p.options.command(), "Lines in iptables-save form, as the kernel reads them back.")
    return load(name, family).text(header)


def match_nft(rules: nftset.RuleSet) -> str | None:
    """The native profile whose rules these are exactly, however written (Istio's words or
    nft's listing, with counters or without)."""
    def canonical(r: nftset.RuleSet) -> nftset.RuleSet:
        return nftlisting.listed(r.uncounted())

    wanted = canonical(rules)
    return next((name for name in names(native_nftables=True) if canonical(nft_rules(name)) == wanted), None)


def match(dump: save.Dump) -> str | None:
    """The profile whose rules a dump holds exactly (tables without rules aside), if any."""
    def rules(d: save.Dump) -> dict[str, list[str]]:
        return {name: t.lines() for name, t in d.tables.items() if t.rules}

    wanted = rules(dump)
    return next((name for name in names() if rules(load(name, dump.family)) == wanted), None)
