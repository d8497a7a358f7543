"""Profiles: profiles.yaml maps a name to an Istio version and istio-iptables' options.

The rules themselves are built (builder.py), not stored: a profile is the options a
default sidecar of that Istio was set up with.  profiles/istio-1.13.rules stays as
the golden copy of the article's rules that the builder must reproduce.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from importlib import resources

import yaml

from ..errors import LabError
from . import builder, save

DEFAULT = "istio-1.13"  # Istio 1.13 - 1.17, the article's era
PROFILES = "profiles.yaml"


@dataclass(frozen=True)
class Profile:
    name: str
    istio: str  # the release the builder models
    versions: str  # the releases it stands for, e.g. "1.13 - 1.17"
    summary: str
    options: builder.Options


@functools.cache
def profiles() -> dict[str, Profile]:
    where = f"lab/rules/{PROFILES}"
    text = resources.files(__package__).joinpath(PROFILES).read_text()
    data = yaml.load(text, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    out = {}
    for name, entry in data.items():
        if not isinstance(entry, dict) or not {"istio", "versions", "summary"} <= set(entry):
            raise LabError(f"{where}: {name}: needs istio, versions and summary")
        options = builder.Options.from_mapping(entry.get("options") or {}, f"{where}: {name}")
        builder.parse_version(entry["istio"])
        out[name] = Profile(name, str(entry["istio"]), str(entry["versions"]), entry["summary"], options)
    return out


def names() -> list[str]:
    return list(profiles())


def get(name: str = DEFAULT) -> Profile:
    try:
        return profiles()[name]
    except KeyError:
        raise LabError(f"no rule profile {name!r} (profiles: {', '.join(names())})") from None


def summary(name: str = DEFAULT) -> str:
    """One line: which Istio it is and what sets it apart."""
    p = get(name)
    return f"Istio {p.versions} sidecar, {p.summary}"


def load(name: str = DEFAULT, family: int = 4) -> save.Dump:
    """The profile's rules for one family (4: iptables, 6: ip6tables; empty without IPv6)."""
    p = get(name)
    return builder.build(p.istio, p.options, family)


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


def match(dump: save.Dump) -> str | None:
    """The profile whose rules a dump holds exactly (tables without rules aside), if any."""
    def rules(d: save.Dump) -> dict[str, list[str]]:
        return {name: t.lines() for name, t in d.tables.items() if t.rules}

    wanted = rules(dump)
    return next((name for name in names() if rules(load(name, dump.family)) == wanted), None)
