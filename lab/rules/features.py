"""What a rule set does beyond the article's rules, read from the rules themselves.

A scenario about such a feature (scenario `feature:`) is what `istio-lab run` picks only
when the rules have it; a profile and a pod's own dump are read the same way.  The
inbound mode is read the same way: the mark a TPROXY rule sets is what the routing and
Envoy's listeners must follow.
"""

from __future__ import annotations

from typing import Iterable

from .. import plan
from .save import Dump

DNS_CAPTURE = "dns-capture"  # nat sends DNS to pilot-agent's proxy (ISTIO_META_DNS_CAPTURE)
FEATURES = (DNS_CAPTURE,)


def of(dumps: Iterable[Dump]) -> frozenset[str]:
    """The features the rule sets have."""
    found = set()
    for dump in dumps:
        nat = dump.tables.get("nat")
        for rule in nat.rules if nat else ():
            if rule.target == "REDIRECT" and (rule.option("--to-ports") or rule.option("--to-port")) == str(plan.Port.DNS_PROXY):
                found.add(DNS_CAPTURE)
    return frozenset(found)


def tproxy_mark(dump: Dump) -> int | None:
    """The mark the dump's first TPROXY rule sets (`--tproxy-mark 0x539/0xffffffff`), if it has one."""
    mangle = dump.tables.get("mangle")
    for rule in mangle.rules if mangle else ():
        if rule.target == "TPROXY" and rule.option("--tproxy-mark"):
            return int(rule.option("--tproxy-mark").split("/")[0], 0)
    return None


def inbound_mode(dumps: Iterable[Dump]) -> str:
    """REDIRECT or TPROXY: how the rules hand inbound connections to Envoy."""
    return "TPROXY" if any(tproxy_mark(d) is not None for d in dumps) else "REDIRECT"
