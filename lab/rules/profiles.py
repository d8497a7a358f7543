"""Istio rule sets as data: one iptables-save file per profile in profiles/."""

from __future__ import annotations

from importlib import resources

from ..errors import LabError
from . import save

DEFAULT = "istio-1.13"  # Istio 1.13 - 1.17, the article's era


def names() -> list[str]:
    files = resources.files(__package__).joinpath("profiles").iterdir()
    return sorted(f.name.removesuffix(".rules") for f in files if f.name.endswith(".rules"))


def text(name: str = DEFAULT) -> str:
    path = resources.files(__package__).joinpath("profiles", f"{name}.rules")
    if not path.is_file():
        raise LabError(f"no rule profile {name!r} (profiles: {', '.join(names())})")
    return path.read_text()


def load(name: str = DEFAULT) -> save.Dump:
    return save.parse(text(name), source=f"profile {name}")


def summary(name: str = DEFAULT) -> str:
    """The profile's first comment line: what Istio it is."""
    for line in text(name).splitlines():
        if line.startswith("#"):
            return line.lstrip("# ").strip()
    return name
