"""The lab's trace rules: `meta nftrace set 1` for the flows a scenario traces.

They live in a table of the lab's own, `inet ilab-trace`, never in the rule set under
test, so they work the same whether the pod holds iptables-nft tables, native ones or
both, and removing them cannot touch a rule of Istio's.  Its prerouting and output base
chains hold the rules, at priority raw - 1 (-301): after defragmentation (-400), before
every raw table (-300: iptables-nft's, Istio's `istio-proxy-raw`) and before conntrack
(-200), so the first chain a traced packet is reported from is the first of the rule set.
`inet` covers IPv4 and IPv6; a flow's rules say which (`meta nfproto`).

Its four base chains, one at each hook a path crosses (input and postrouting empty, at
priority 500: after every table iptables-nft makes there), are the hook witnesses: a
traced packet reports each chain's policy, which says the hook it passed
(lab.rules.nft.naming), whatever hooks the rule set under test has.  Istio's native
tables have base chains at prerouting and output only, so without them a path could not
tell where a packet was delivered or left.

Like legacy's `-p tcp -m multiport --ports P`, a flow is traced in both directions: one
rule for its destination ports, one for its source ports, in each chain.
"""

from __future__ import annotations

from dataclasses import dataclass

from ...nftrace import TRACE_TABLE
from . import libnft

FAMILY, TABLE = TRACE_TABLE
CHAINS = ("prerouting", "output")  # where the trace rules go
WITNESSES = ("input", "postrouting")  # empty: their policy events witness the hook
PRIORITY = "raw - 1"
WITNESS_PRIORITY = 500
NFPROTO = {4: "ipv4", 6: "ipv6"}


@dataclass(frozen=True)
class Flow:
    """Packets to or from any of `ports`, of one transport protocol and IP version."""

    protocol: str  # "tcp" | "udp"
    ports: tuple[int, ...]
    ip_version: int = 4

    def matches(self) -> list[str]:
        head = f"meta nfproto {NFPROTO[self.ip_version]} meta l4proto {self.protocol}"
        if not self.ports:  # every packet of the protocol
            return [head]
        ports = ", ".join(map(str, self.ports))
        return [f"{head} th dport {{ {ports} }}", f"{head} th sport {{ {ports} }}"]


@dataclass(frozen=True)
class TraceRules:
    """The rules add() made in one pod: (chain, handle) pairs, what remove() deletes."""

    ns: str
    handles: tuple[tuple[str, int], ...]


def ensure_table(ns: str) -> None:
    """Make `inet ilab-trace` and its four base chains exist in `ns` (no-op if they do)."""
    chains = "".join(f"add chain {FAMILY} {TABLE} {chain} {{ type filter hook {chain} priority {priority}; }}\n"
                     for chain, priority in [(c, PRIORITY) for c in CHAINS] + [(c, WITNESS_PRIORITY) for c in WITNESSES])
    libnft.run(ns, f"add table {FAMILY} {TABLE}\n{chains}", TABLE)


def add(ns: str, flows: list[Flow]) -> TraceRules:
    """Trace the flows in `ns`: their rules in both chains, in one transaction."""
    script = "".join(f"add rule {FAMILY} {TABLE} {chain} {match} meta nftrace set 1\n"
                     for flow in flows for match in flow.matches() for chain in CHAINS)
    made = libnft.echo(ns, script, TABLE)
    return TraceRules(ns, tuple((r["chain"], r["handle"]) for item in made if (r := item.get("rule"))))


def remove(rules: TraceRules) -> None:
    """Delete the rules add() made, in one transaction."""
    if rules.handles:
        libnft.run(rules.ns, "".join(f"delete rule {FAMILY} {TABLE} {chain} handle {handle}\n"
                                     for chain, handle in rules.handles), TABLE)


def drop_table(ns: str) -> None:
    """Delete `inet ilab-trace` and whatever it holds."""
    libnft.run(ns, f"delete table {FAMILY} {TABLE}", TABLE)
