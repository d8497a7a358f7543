"""Istio's expected rule sets, as the lab records them (tests/data/istio-goldens/, README there):
what istio-iptables and istio-nftables write for each option set of their capture tests."""

from __future__ import annotations

import functools
from pathlib import Path

import yaml

from lab.rules import nftset, save

DIR = Path(__file__).resolve().parent / "data" / "istio-goldens"
IPTABLES, NFTABLES = DIR / "istio-iptables.yaml", DIR / "istio-nftables.yaml"


@functools.cache
def _load(path: Path) -> dict:
    return yaml.load(path.read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))


def iptables_names() -> dict[str, list[str]]:
    """Option set -> the eras it is recorded for."""
    return {name: list(eras) for name, eras in _load(IPTABLES)["rules"].items()}


def iptables(era: str, name: str) -> dict[int, save.Dump]:
    """What istio-iptables of that era writes for the option set, per IP family."""
    return {family: save.parse(text, f"{IPTABLES.name}: {name} {era}", family)
            for family, text in _load(IPTABLES)["rules"][name][era].items()}


def nftables_names() -> list[str]:
    return list(_load(NFTABLES)["rules"])


def nftables_versions() -> list[str]:
    return list(_load(NFTABLES)["versions"])


def nftables(version: str, name: str) -> nftset.RuleSet:
    """The rule set istio-nftables of that version leaves for the option set."""
    return nftset.parse(_load(NFTABLES)["rules"][name][version], f"{NFTABLES.name}: {name} {version}")
