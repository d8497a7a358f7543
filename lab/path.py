"""Join TRACE events and access-log lines into a path in the article's notation.

A redirected client connection becomes several TCP legs: the client's, then
one per proxy that re-dials.  The sidecar's access log chains them (each
line's downstream peer is a leg's client, its upstream local address the next
leg's client).  Each leg's first packet, the SYN, is the only one the nat
table judges, so the nat events of the SYNs are the hops.

Notation, as the article writes it:
    Local Pod -> OUTPUT -> ISTIO_OUTPUT RULE 9 -> ISTIO_REDIRECT -> Envoy 15001 (Outbound) -> ...
A rule number is printed for chains with more than one rule; a chain of one
rule (ISTIO_REDIRECT) needs none.  The article's chains are all nat; a hop in
another table says so, `ISTIO_INBOUND RULE 8 (mangle)` (TPROXY mode), and so does a
rule of a built-in chain that is not a jump (`OUTPUT RULE 3 (mangle)`, a MARK).  When
such hops follow a packet through lo back in, the path shows it: `POSTROUTING ->
PREROUTING -> ...`.

DNS capture: a UDP flow's first datagram plays the SYN's part (the nat table judges only
that one); the raw table's own chains (the conntrack zones) make hops,
`ISTIO_OUTPUT_DNS RULE 5 (raw)`; pilot-agent's DNS proxy logs its queries as Envoy logs
connections, and a query it answers itself ends the path at `pilot-agent 15053 (DNS)`.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from typing import Iterable, Sequence

from .rules.save import BUILTIN_CHAINS
from .sidecar.httpio import addr

HOOKS = ("PREROUTING", "INPUT", "FORWARD", "OUTPUT", "POSTROUTING")
PROXIES = {15001: "Outbound", 15006: "Inbound"}
AGENT_PROXIES = {15053: "DNS"}  # pilot-agent's listeners that traffic is redirected to
# Tables whose rules make hops.  raw's built-in chains hold the TRACE rules and never do;
# its own chains (DNS capture's conntrack zones) do.
SHOWN_TABLES = ("raw", "mangle", "nat")
TABLES = tuple(BUILTIN_CHAINS)  # in the order packets meet them


def rule_ref(table: str, chain: str, num: int) -> str:
    """How a rule is named in counters and rule lines: "ISTIO_OUTPUT#9", "mangle:ISTIO_INBOUND#8"."""
    return f"{chain}#{num}" if table == "nat" else f"{table}:{chain}#{num}"


@dataclass(frozen=True)
class Hop:
    kind: str  # "endpoint" | "hook" | "chain" | "proxy"
    name: str  # "Local Pod", "OUTPUT", "ISTIO_OUTPUT", "Envoy 15001 (Outbound)"
    rule: int | None = None  # the rule that matched in `name` (chains only)
    numbered: bool = True  # print the rule number (False for one-rule chains)
    packet: str = ""  # the packet the hop was seen on
    line: str = ""  # the matched rule, in iptables-save form
    owner: str = ""  # the sending socket's uid/gid, as the kernel reported it (OUTPUT only)
    table: str = "nat"  # chains only

    def __str__(self) -> str:
        text = self.name
        if self.kind == "chain" and self.rule is not None and self.numbered:
            text = f"{self.name} RULE {self.rule}"
        if self.kind == "chain" and self.table != "nat":
            text += f" ({self.table})"
        return text

    def as_dict(self) -> dict:
        return {k: v for k, v in asdict(self).items() if v not in ("", None) and k != "numbered"}


@dataclass(frozen=True)
class Leg:
    """One TCP connection: who dialed what, and the proxy listener that took it, if any."""

    client: str  # "ip:port"
    server: str  # "ip:port" as dialed, before any NAT
    proxy: int | None = None  # 15001 / 15006 when redirected


def endpoint(addr: str) -> tuple[str, int]:
    """"10.244.0.10:8080" or "[fd00:10:244::10]:8080" -> (host, port), as httpio.addr writes them."""
    host, port = addr.rsplit(":", 1)
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return host, int(port)


def proxy_name(port: int) -> str:
    if port in AGENT_PROXIES:
        return f"pilot-agent {port} ({AGENT_PROXIES[port]})"
    return f"Envoy {port} ({PROXIES.get(port, 'Listener')})"


def chain_legs(client: str, server: str, access_log: Iterable[dict]) -> list[Leg]:
    """Follow the access log from the client's connection through every proxy.

    A line with no original destination (a UDP query: no SO_ORIGINAL_DST) keeps the one
    the client dialed; a line with no upstream (a query the proxy answered) ends the chain.
    """
    by_downstream = {line["downstream_peer"]: line for line in access_log}
    legs = []
    seen = set()
    while client not in seen:
        seen.add(client)
        line = by_downstream.get(client)
        if line is None:
            legs.append(Leg(client, server))
            break
        legs.append(Leg(client, line["original_dst"] or server, line["listener"]))
        if line["upstream_local"] is None:
            break
        client, server = line["upstream_local"], line["upstream_peer"]
    return legs


def syn_events(events: Sequence, leg: Leg) -> list:
    """The events of the leg's first packet, in the order the kernel emitted them: its SYN,
    or a UDP flow's first datagram.  A later datagram of the flow passes the same rules
    again (all but nat's), so of each rule only the first event is kept."""
    host, port = endpoint(leg.client)
    out, seen = [], set()
    for e in events:
        if e.src != host or e.sport != port:
            continue
        if e.proto == "udp":
            key = (e.pod, e.table, e.chain, e.kind, e.rulenum)
            if key in seen:
                continue
            seen.add(key)
        elif e.tcp_flags != "S":
            continue
        out.append(e)
    return out


def _packet(e) -> str:
    return f"{'UDP' if e.proto == 'udp' else 'SYN'} {addr((e.src, e.sport))} > {addr((e.dst, e.dport))}"


def _target(line: str) -> str:
    """The `-j` target of a rule line, "" if it has none."""
    words = line.split()
    return words[words.index("-j") + 1] if "-j" in words[:-1] else ""


def _chain_hops(events: Sequence, rule_counts: dict[str, int], rule_lines: dict[str, str]) -> list[Hop]:
    """A hop per rule that matched in a shown table, but a built-in chain's jump: the
    chain jumped to is the next hop, and says more."""
    hops = []
    for e in events:
        if e.kind != "rule" or e.table not in SHOWN_TABLES:
            continue
        ref = rule_ref(e.table, e.chain, e.rulenum)
        line = rule_lines.get(ref, "")
        if e.chain in HOOKS and (e.table == "raw" or _target(line) not in _BUILTIN_TARGETS):
            continue  # -A OUTPUT -j ISTIO_OUTPUT: a jump (or a line we do not know); raw's TRACE rules
        key = ref.rsplit("#", 1)[0]
        hops.append(Hop("chain", e.chain, e.rulenum, rule_counts.get(key, 2) > 1, _packet(e), line, table=e.table))
    return hops


# Targets that end or mark, not jumps to a chain of the dump (iptables' built-in and extension targets).
_BUILTIN_TARGETS = {"ACCEPT", "DROP", "RETURN", "REJECT", "REDIRECT", "DNAT", "SNAT", "MASQUERADE",
                    "TPROXY", "MARK", "CONNMARK", "CT", "TRACE", "LOG", "NFLOG"}


def leg_hops(events: Sequence, leg: Leg, rule_counts: dict[str, int], rule_lines: dict[str, str]) -> list[Hop]:
    """Hops of one leg from its SYN's events in the pod that holds the rules.

    A SYN sent over lo comes back in through PREROUTING in the same pod; its hops there
    (mangle's, in TPROXY mode) follow `POSTROUTING -> PREROUTING`.
    """
    syn = syn_events(events, leg)
    if not syn:
        return []
    entry = next((e.chain for e in syn if e.chain in ("OUTPUT", "PREROUTING")), syn[0].chain)
    first = syn[0]
    owner = f"uid {first.uid} gid {first.gid}" if entry == "OUTPUT" and first.uid is not None else ""
    hops = [Hop("hook", entry, packet=_packet(first), owner=owner)]
    sent = [i for i, e in enumerate(syn) if e.chain == "POSTROUTING"] if entry == "OUTPUT" else []
    out, back = (syn[:sent[0]], syn[sent[-1] + 1:]) if sent else (syn, [])
    hops += _chain_hops(out, rule_counts, rule_lines)
    back_hops = _chain_hops(back, rule_counts, rule_lines)
    if back_hops:
        hops += [Hop("hook", "POSTROUTING", packet=_packet(syn[sent[0]])),
                 Hop("hook", "PREROUTING", packet=_packet(back[0]))] + back_hops
    if leg.proxy is not None:
        hops.append(Hop("proxy", proxy_name(leg.proxy), packet=_packet(syn[0])))
    else:
        exit_hook = "INPUT" if entry == "PREROUTING" or back_hops else "POSTROUTING"
        last = next((e for e in reversed(syn) if e.chain == exit_hook), None)
        if last is not None:
            hops.append(Hop("hook", exit_hook, packet=_packet(last)))
    return hops


@dataclass
class Path:
    hops: list[Hop] = field(default_factory=list)

    def __str__(self) -> str:
        return " -> ".join(str(h) for h in self.hops)

    def rule_hits(self) -> list[str]:
        return [f"{h.name}#{h.rule}" for h in self.hops if h.kind == "chain"]


def build(source: str, destination: str, legs: list[Leg], events: Sequence,
          rule_counts: dict[str, int], rule_lines: dict[str, str]) -> Path:
    """The path; when the last leg ends at a proxy that answered itself (a DNS name in
    pilot-agent's table), that proxy is where the path ends."""
    hops = [Hop("endpoint", source)]
    for leg in legs:
        hops += leg_hops(events, leg, rule_counts, rule_lines)
    if not (legs and legs[-1].proxy is not None and hops[-1].kind == "proxy"):
        hops.append(Hop("endpoint", destination, packet=legs[-1].server if legs else ""))
    return Path(hops)


# --- the article's notation, read back -------------------------------------------

_TYPOS = {"RREROUTING": "PREROUTING"}  # the article's spelling slips, read as meant
_PROXY_RE = re.compile(r"^envoy\s*(\d+)\s*\((outbound|inbound)[^)]*\)$", re.I)
_AGENT_RE = re.compile(r"^pilot-agent\s+(\d+)\s*\((dns)\)$", re.I)
_CHAIN_RE = re.compile(r"^([A-Za-z_]+)(?:\s+RULE\s+(\d+))?(?:\s*\((.*)\))?$", re.I)


def parse(text: str) -> Path:
    """Read a path written in the article's notation (tolerant of its typography)."""
    tokens = [" ".join(t.split()) for t in text.split("->")]
    tokens = [t for t in tokens if t]
    hops = []
    for i, token in enumerate(tokens):
        agent = _AGENT_RE.match(token)
        if agent and i == len(tokens) - 1:  # a proxy that answered ends the path
            hops.append(Hop("proxy", proxy_name(int(agent.group(1)))))
            continue
        if i in (0, len(tokens) - 1):
            hops.append(Hop("endpoint", token))
            continue
        proxy = _PROXY_RE.match(token)
        chain = _CHAIN_RE.match(token)
        if proxy:
            hops.append(Hop("proxy", f"Envoy {proxy.group(1)} ({proxy.group(2).capitalize()})"))
        elif agent:
            hops.append(Hop("proxy", proxy_name(int(agent.group(1)))))
        elif chain:
            name = _TYPOS.get(chain.group(1).upper(), chain.group(1).upper())
            rule = int(chain.group(2)) if chain.group(2) else None
            table = chain.group(3) if chain.group(3) in TABLES else "nat"  # else the article's aside
            if name in HOOKS and rule is None:
                hops.append(Hop("hook", name))
            else:
                hops.append(Hop("chain", name, rule, table=table))
        else:
            raise ValueError(f"cannot read hop {token!r}")
    return Path(hops)


def notes(text: str) -> list[str]:
    """What reading the article's path had to assume."""
    return [f"the article writes {typo}, read as {meant}" for typo, meant in _TYPOS.items() if typo in text]


def same(claim: Hop, measured: Hop) -> bool:
    """One hop of the article's path and one of the kernel's say the same thing."""
    if claim.kind != measured.kind:
        return False
    if claim.kind == "endpoint":
        return claim.name.lower() == measured.name.lower()
    if claim.name != measured.name or claim.table != measured.table:
        return False
    return claim.rule is None or claim.rule == measured.rule  # the article may leave a rule unnamed


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

    A run of hops only one side has is one difference, e.g. the article's
    detour through a proxy the kernel never takes.
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
