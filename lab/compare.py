"""Compare a measured path with another: the article's claim, or (for a pod's own rules that
match no profile) the default profile's measured path.  Hop by hop, where the two part ways.

This is the one place paths are aligned; the reports only show what it found.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from . import path as paths
from .path import Hop, Path
from .scenario import ArticleClaim

AGREES, DIFFERS, NO_CLAIM, NOT_MEASURED = "agrees", "differs", "no claim", "-"


def _chain(name: str) -> str:
    """A chain's name as iptables spells it: nft's istio-output mirrors ISTIO_OUTPUT."""
    return name.upper().replace("-", "_")


def same(claim: Hop, measured: Hop) -> bool:
    """One hop of a claimed path and one of the kernel's say the same thing.  A chain of
    Istio's native nftables rules is the iptables chain it mirrors (istio-output is
    ISTIO_OUTPUT; istio-proxy-nat plays nat), so the article's iptables words compare."""
    if claim.kind != measured.kind:
        return False
    if claim.kind == paths.ENDPOINT:
        return claim.name.lower() == measured.name.lower()
    if _chain(claim.name) != _chain(measured.name) or claim.plays != measured.plays or claim.where != measured.where:
        return False
    return claim.number is None or claim.number == measured.number  # a claim may leave a rule unnamed


def align(claim: Sequence[Hop], measured: Sequence[Hop]) -> list[tuple[Hop | None, Hop | None]]:
    """Pair the hops of two paths (longest common subsequence); None marks a missing hop."""
    n, m = len(claim), len(measured)
    best = [[0] * (m + 1) for _ in range(n + 1)]
    for i in range(n - 1, -1, -1):
        for j in range(m - 1, -1, -1):
            best[i][j] = (best[i + 1][j + 1] + 1 if same(claim[i], measured[j])
                          else max(best[i + 1][j], best[i][j + 1]))
    pairs, i, j = [], 0, 0
    while i < n or j < m:
        if i < n and j < m and same(claim[i], measured[j]):
            pairs.append((claim[i], measured[j]))
            i, j = i + 1, j + 1
        elif j < m and (i == n or best[i][j + 1] >= best[i + 1][j]):
            pairs.append((None, measured[j]))
            j += 1
        else:
            pairs.append((claim[i], None))
            i += 1
    return _pair_replacements(pairs)


def _pair_replacements(pairs):
    """Turn an adjacent (claim, None) + (None, measured) into one replaced hop."""
    out = []
    for pair in pairs:
        if out and out[-1][1] is None and pair[0] is None and out[-1][0].kind == pair[1].kind:
            out[-1] = (out[-1][0], pair[1])
        elif out and out[-1][0] is None and pair[1] is None and out[-1][1].kind == pair[0].kind:
            out[-1] = (pair[0], out[-1][1])
        else:
            out.append(pair)
    return out


def differences(claim: Path, measured: Path) -> list[str]:
    """Hop by hop, where the article's path and the kernel's part ways.

    A run of hops only one side has is one difference, e.g. the article's detour through
    a proxy the kernel never takes.
    """
    out: list[str] = []
    position = 0
    run: tuple[str, list[Hop]] | None = None  # ("claim" | "kernel", hops) not yet reported

    def flush():
        if run:
            side, hops = run
            text = " -> ".join(map(str, hops))
            if side == "claim":
                out.append(f"after hop {position}: the article has {text}; the kernel never passes "
                           + ("it" if len(hops) == 1 else "them"))
            else:
                first = position - len(hops) + 1
                where = f"hop {first}" if len(hops) == 1 else f"hops {first}-{position}"
                out.append(f"{where}: the kernel passes {text}, which the article leaves out")

    for c, k in align(claim.hops, measured.hops):
        side = "claim" if k is None else "kernel" if c is None else None
        if side and run and run[0] == side:
            run[1].append(c or k)
            if k is not None:
                position += 1
            continue
        flush()
        run = None
        if k is not None:
            position += 1
        if side:
            run = (side, [c or k])
        elif not same(c, k):
            out.append(f"hop {position}: the article has {c}, the kernel {k}")
    flush()
    return out


@dataclass(frozen=True)
class ArticleComparison:
    """The measured path beside the article's claim, where the article makes one."""

    claim: ArticleClaim | None  # None: the article says nothing about this traffic
    measured: bool  # False: the flow could not be measured, so there is nothing to compare
    differences: tuple[str, ...] = ()
    alignment: tuple[tuple[Hop | None, Hop | None], ...] = ()  # claim hop, kernel hop (the article's path only)

    @property
    def matches(self) -> bool | None:
        """None when the article makes no claim (a DNS query, a flow of your own)."""
        if self.claim is None:
            return None
        return self.measured and not self.differences

    @property
    def agreement(self) -> str:
        if not self.measured:
            return NOT_MEASURED
        return {True: AGREES, False: DIFFERS, None: NO_CLAIM}[self.matches]


def with_article(claim: ArticleClaim | None, measured: Path | None) -> ArticleComparison:
    if claim is None or measured is None:
        return ArticleComparison(claim, measured is not None)
    if claim.path is not None:
        return ArticleComparison(claim, True, tuple(differences(claim.path, measured)),
                                 tuple(align(claim.path.hops, measured.hops)))
    if list(claim.proxies or ()) != measured.proxies:  # a picture: the proxies its words name
        return ArticleComparison(claim, True, (
            f"the article says the traffic passes {', '.join(claim.proxies or ()) or 'no proxy'}; "
            f"the kernel sends it through {', '.join(measured.proxies) or 'no proxy'}",))
    return ArticleComparison(claim, True)


def with_profile(profile: str, expected: Path, measured: Path) -> list[str]:
    """Where a path measured under a pod's own rules leaves a profile's measured path."""
    if str(measured) == str(expected):
        return []
    out = []
    for want, got in align(expected.hops, measured.hops):
        if want is None:
            out.append(f"these rules add {got}")
        elif got is None:
            out.append(f"{profile} passes {want}, these rules do not")
        elif str(want) != str(got):
            out.append(f"{profile} passes {want}, these rules {got}")
    return out
