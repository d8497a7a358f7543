"""What `nft list ruleset` prints for a rule that was written another way.

nft keeps a rule as bytecode, not text, and prints it back from the bytecode: a rule
Istio writes as `oifname lo meta l4proto tcp ip daddr != 127.0.0.1/32 skuid 1337` comes
back as `oifname "lo" ip daddr != 127.0.0.1 meta skuid 1337`.  `listed()` turns written
rules into the words nft 1.0.6 prints, so a rule set read back from the kernel compares
with the one the lab applied, and reports can quote a rule as `nft monitor trace` does.

Each rewrite below is one observation of nft 1.0.6 on Linux 6.18; NORMALISED holds an
example of each (a kernel test writes every example into a namespace and reads it back).
Base chains need no rewrite: nft prints `priority dstnat` for nat prerouting's -100 but
`-100` for nat output's, `mangle` and `raw` for -150 and -300, and adds `policy accept;`,
and the reader turns all of it back into the same values.  Rules iptables-nft wrote through
the xt compat layer print otherwise (its owner match as `skuid 1337`, without `meta`).
"""

from __future__ import annotations

import ipaddress
import socket
from dataclasses import replace

from .nftset import RuleSet, words

# (what a script says, what `nft list ruleset` prints): each rewrite below, and two rules nft
# prints as written (an l4proto no later match implies; `ip protocol`, which is no l4proto).
NORMALISED: tuple[tuple[str, str], ...] = (
    ("iifname lo oifname eth0 return", 'iifname "lo" oifname "eth0" return'),
    ("skuid 1337 skgid 1337 return", "meta skuid 1337 meta skgid 1337 return"),
    ("meta l4proto tcp tcp dport 15008 return", "tcp dport 15008 return"),
    ("meta l4proto tcp ip daddr != 127.0.0.1/32 tcp dport != { 53, 15008 } return",
     "ip daddr != 127.0.0.1 tcp dport != { 53, 15008 } return"),
    ("meta l4proto tcp ct state related,established tcp dport 32000 return",
     "ct state established,related tcp dport 32000 return"),
    ("meta l4proto udp udp dport 53 return", "udp dport 53 return"),
    ("meta l4proto tcp counter redirect to :15001", "meta l4proto tcp counter redirect to :15001"),
    ("ip protocol tcp tcp dport 53 return", "ip protocol tcp tcp dport 53 return"),
    ("ip saddr 127.0.0.6/32 ip daddr 10.0.0.1/8 return", "ip saddr 127.0.0.6 ip daddr 10.0.0.0/8 return"),
    ("ip6 saddr ::6/128 ip6 daddr 2001:DB8::1/32 return", "ip6 saddr ::6 ip6 daddr 2001:db8::/32 return"),
    ("ip6 daddr ::127.0.0.53/128 return", "ip6 daddr ::127.0.0.53 return"),
    ("mark 1337 meta mark != 1338 return", "meta mark 0x00000539 meta mark != 0x0000053a return"),
    ("meta l4proto tcp mark 1337 ct mark set mark", "meta l4proto tcp meta mark 0x00000539 ct mark set meta mark"),
    ("ct mark 1337 meta mark set ct mark", "ct mark 0x00000539 meta mark set ct mark"),
    ("meta mark set 1337 accept", "meta mark set 0x00000539 accept"),
    ("ct state new,untracked,related,established,invalid return",
     "ct state invalid,established,related,new,untracked return"),
    ("tcp dport { 15008, 53 } return", "tcp dport { 53, 15008 } return"),
    ("nftrace set 1", "meta nftrace set 1"),
)

_INTERFACE_KEYS = ("iifname", "oifname", "iif", "oif")
_BARE_META = ("mark", "skuid", "skgid", "nftrace")  # nft takes them without `meta`, prints them with it
_CT_STATES = ("invalid", "established", "related", "new", "untracked")  # nft prints them in bit order
_OPERATORS = ("!=", "==")


def listed(rules: RuleSet) -> RuleSet:
    """The rule set as `nft list ruleset` would read back (base chains are values already)."""
    return rules.map_rules(lambda r: replace(r, text=listed_rule(r.text)))


def listed_rule(text: str) -> str:
    """One rule's text in the words nft prints it with."""
    w = _qualified(_without_implied_l4proto(words(text)))
    out: list[str] = []
    for word in w:
        out.append(_value(_key(out), word))
    return " ".join(out)


def _without_implied_l4proto(w: list[str]) -> list[str]:
    """`meta l4proto tcp ... tcp dport 80`: a tcp header match needs the l4proto match
    anyway, and nft prints it only where nothing later implies it."""
    for i in range(len(w) - 2):
        if w[i:i + 2] == ["meta", "l4proto"] and w[i + 2] in ("tcp", "udp"):
            proto = w[i + 2]
            later = w[i + 3:]
            if any(word == proto and (j == 0 or later[j - 1] not in ("l4proto", "protocol", "nexthdr"))
                   for j, word in enumerate(later)):
                return w[:i] + later
            return w
    return w


def _qualified(w: list[str]) -> list[str]:
    """`skuid 1337` -> `meta skuid 1337`; `ct mark set mark` -> `ct mark set meta mark`."""
    out: list[str] = []
    for word in w:
        if word in _BARE_META and (not out or out[-1] not in ("meta", "ct")):
            out.append("meta")
        out.append(word)
    return out


def _key(before: list[str]) -> tuple[str, ...]:
    """The last words before a value, without a comparison operator: ('ip', 'daddr')."""
    end = len(before) - (1 if before and before[-1] in _OPERATORS else 0)
    return tuple(before[max(0, end - 3):end])


def _value(key: tuple[str, ...], word: str) -> str:
    if key[-1:] and key[-1] in _INTERFACE_KEYS and not word.startswith('"'):
        return f'"{word}"'
    if key[-2:] in (("ip", "saddr"), ("ip", "daddr"), ("ip6", "saddr"), ("ip6", "daddr")):
        return _address(word)
    if (key[-1:] == ("mark",) or key[-2:] == ("mark", "set")) and _number(word) is not None:
        return f"0x{_number(word):08x}"
    if key[-2:] == ("ct", "state"):
        states = word.split(",")
        return ",".join(sorted(states, key=lambda s: _CT_STATES.index(s) if s in _CT_STATES else len(_CT_STATES)))
    if word.startswith("{"):
        elements = [e.strip() for e in word.strip("{} ").split(",")]
        if all(e.isdigit() for e in elements):
            return "{ " + ", ".join(sorted(elements, key=int)) + " }"
    return word


def _address(word: str) -> str:
    """A prefix as nft prints it: host bits cleared, a host without its /32 or /128, IPv6 as
    inet_ntop writes it (`::127.0.0.53`, not Python's `::7f00:35`)."""
    try:
        net = ipaddress.ip_network(word, strict=False)
    except ValueError:
        return word
    if net.version == 4:
        address = str(net.network_address)
    else:
        address = socket.inet_ntop(socket.AF_INET6, net.network_address.packed)
    return address if net.prefixlen == net.max_prefixlen else f"{address}/{net.prefixlen}"


def _number(word: str) -> int | None:
    try:
        return int(word, 0)
    except ValueError:
        return None
