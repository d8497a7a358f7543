"""What a rule set does beyond the article's rules, read from the rules themselves.

A scenario about such a feature (scenario `feature:`) is what `istio-lab run` picks only
when the rules have it; a profile and a pod's own dump are read the same way, and so are
native nftables rule sets (`redirect to :15053`, `tproxy ... meta mark set 1337`).  The
inbound mode is read the same way: the mark a TPROXY rule sets is what the routing and
Envoy's listeners must follow.
"""

from __future__ import annotations

from typing import Iterable

from .. import plan
from . import nftset
from .nftset import RuleSet as NftRules
from .save import Dump

DNS_CAPTURE = "dns-capture"  # nat sends DNS to pilot-agent's proxy (ISTIO_META_DNS_CAPTURE)
FEATURES = (DNS_CAPTURE,)


def of(dumps: Iterable[Dump], nft: NftRules | None = None) -> frozenset[str]:
    """The features the rule sets have (iptables dumps, and native nft rules)."""
    found = set()
    for _, rule in nft.numbered() if nft else ():
        w = rule.words
        if "redirect" in w and w[w.index("redirect") + 1:w.index("redirect") + 3] == ["to", f":{plan.Port.DNS_PROXY}"]:
            found.add(DNS_CAPTURE)
    for dump in dumps:
        nat = dump.tables.get("nat")
        for rule in nat.rules if nat else ():
            if rule.target == "REDIRECT" and (rule.option("--to-ports") or rule.option("--to-port")) == str(plan.Port.DNS_PROXY):
                found.add(DNS_CAPTURE)
    return frozenset(found)


def redirect_port(dump: Dump, chain: str) -> int | None:
    """The port the chain's first REDIRECT sends to (`-j REDIRECT --to-ports 15001`), if any."""
    nat = dump.tables.get("nat")
    for rule in nat.chain_rules(chain) if nat else ():
        port = rule.option("--to-ports") or rule.option("--to-port")
        if rule.target == "REDIRECT" and port and port.isdigit():
            return int(port)
    return None


def nft_redirect_port(rules: NftRules, chain: str) -> int | None:
    """The port the chain's first `redirect to :PORT` sends to, in any table, if any."""
    for t in rules.tables.values():
        for rule in t.chains[chain].rules if chain in t.chains else ():
            port = nftset.port_to(rule.words, "redirect")
            if port is not None:
                return port
    return None


def one_listener(dumps: Iterable[Dump], nft: NftRules | None = None) -> bool:
    """Do the rules send inbound traffic to the outbound port (ISTIO_IN_REDIRECT and ISTIO_REDIRECT,
    native istio-in-redirect and istio-redirect, to one port, as Istio 1.0 and 1.1 did, and 1.5
    with listed inbound ports)?  Envoy then ran one listener there that told the two apart by
    the original destination."""
    pairs = [(redirect_port(d, "ISTIO_REDIRECT"), redirect_port(d, "ISTIO_IN_REDIRECT")) for d in dumps]
    if nft is not None:
        pairs.append((nft_redirect_port(nft, "istio-redirect"), nft_redirect_port(nft, "istio-in-redirect")))
    return any(out is not None and out == inbound for out, inbound in pairs)


def tproxy_mark(dump: Dump) -> int | None:
    """The mark the dump's first TPROXY rule sets (`--tproxy-mark 0x539/0xffffffff`), if it has one."""
    mangle = dump.tables.get("mangle")
    for rule in mangle.rules if mangle else ():
        if rule.target == "TPROXY" and rule.option("--tproxy-mark"):
            return int(rule.option("--tproxy-mark").split("/")[0], 0)
    return None


def nft_tproxy_mark(rules: NftRules) -> int | None:
    """The mark the first `tproxy` rule sets (`tproxy ip to :15006 meta mark set 1337`), if it
    sets a number (`meta mark set ct mark` names none a route could be set up for)."""
    for _, rule in rules.numbered():
        w = rule.words
        if "tproxy" in w:
            at = next((i for i in range(w.index("tproxy"), len(w) - 1) if w[i:i + 2] == ["mark", "set"]), None)
            value = w[at + 2:at + 3] if at is not None else []
            try:
                return int(value[0], 0) if value else None
            except ValueError:
                return None
    return None


def nft_ipv6(rules: NftRules) -> bool:
    """Do native nft rules say anything of IPv6 (an `ip6` match, a `tproxy ip6`)?  Istio
    writes its IPv6 rules only for a pod that has IPv6."""
    return any("ip6" in rule.words or "ipv6" in rule.words for _, rule in rules.numbered())


def inbound_mode(dumps: Iterable[Dump], nft: NftRules | None = None) -> str:
    """REDIRECT or TPROXY: how the rules hand inbound connections to Envoy."""
    if nft is not None and nft_tproxy_mark(nft) is not None:
        return "TPROXY"
    return "TPROXY" if any(tproxy_mark(d) is not None for d in dumps) else "REDIRECT"
