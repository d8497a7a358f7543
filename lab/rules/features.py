"""What a rule set does beyond the article's rules, read from the rules themselves.

A scenario about such a feature (scenario `feature:`) is what `istio-lab run` picks only
when the rules have it; a preset and a pod's own dump are read the same way.
"""

from __future__ import annotations

from typing import Iterable

from .builder import DNS_PROXY_PORT
from .save import Dump

DNS_CAPTURE = "dns-capture"  # nat sends DNS to pilot-agent's proxy (ISTIO_META_DNS_CAPTURE)
FEATURES = (DNS_CAPTURE,)


def of(dumps: Iterable[Dump]) -> frozenset[str]:
    """The features the rule sets have."""
    found = set()
    for dump in dumps:
        nat = dump.tables.get("nat")
        for rule in nat.rules if nat else ():
            args = list(rule.args)
            if "REDIRECT" in args and any(a in args for a in ("--to-ports", "--to-port")) \
                    and str(DNS_PROXY_PORT) in args:
                found.add(DNS_CAPTURE)
    return frozenset(found)
