"""Istio's native nftables rules (`istio-iptables --native-nftables`, Istio 1.27 and later),
built from istio-iptables' options.

istio-nftables writes one transaction: for each of `inet istio-proxy-nat`, `-mangle` and
`-raw` that has rules, it adds and flushes the table, adds the chains that have rules and
then the rules, in the order its Run() makes them.  Most rules are appended; a few are
inserted at an index (the kube-virt interfaces at the head of nat prerouting, TPROXY's
guards at the head of mangle istio-inbound), and an insert into a chain too short for its
index becomes an append (so istio/istio#58135, TPROXY with no inbound ports, applies from
1.27.4 and 1.28.1 on).  This builder makes the same calls in the same order, so each rule
lands where the kernel puts it.

One inet table serves both families: with IPv6 each rule that names an address has its
`ip6` twin right after the `ip` one.  Rules are written in Istio's words (`skuid 1337`,
`meta l4proto tcp`, `ip daddr 127.0.0.1/32`), as its goldens hold them; nftlisting.py says
how nft prints them back.  The only change from 1.27 to 1.30 is the `counter` 1.28 put in
every rule.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field

from .. import plan
from . import builder
from .builder import BuildError, Options, Version
from .nftset import BaseChain, Chain, Rule, RuleSet, Table

NATIVE: Version = (1, 27)  # the first release with native nftables
COUNTERS: Version = (1, 28)  # Istio's own `counter` in every rule
LOCALHOST = {4: "127.0.0.1/32", 6: "::1/128"}
PASSTHROUGH = {4: "127.0.0.6/32", 6: "::6/128"}  # Envoy's inbound passthrough source

NAT, MANGLE, RAW = "istio-proxy-nat", "istio-proxy-mangle", "istio-proxy-raw"
# Each table's chains in the order Istio declares them (only those with rules are made),
# base chains with their type, hook and priority.
CHAINS: dict[str, dict[str, BaseChain | None]] = {
    NAT: {"prerouting": BaseChain("nat", "prerouting", -100), "output": BaseChain("nat", "output", -100),
          "istio-inbound": None, "istio-redirect": None, "istio-in-redirect": None, "istio-output": None,
          "istio-output-dns": None},
    MANGLE: {"prerouting": BaseChain("filter", "prerouting", -150), "output": BaseChain("route", "output", -150),
             "istio-divert": None, "istio-tproxy": None, "istio-inbound": None, "istio-drop": None},
    RAW: {"prerouting": BaseChain("filter", "prerouting", -300), "output": BaseChain("filter", "output", -300),
          "istio-inbound": None, "istio-output-dns": None},
}


@dataclass(frozen=True)
class NftOptions(Options):
    """istio-iptables' options and one that only the nft rule sets model so far."""

    drop_invalid: bool = False  # INVALID_DROP: conntrack-invalid TCP dropped in mangle (istio-drop)

    def command(self) -> str:
        argv = [super().command().replace("istio-iptables ", "istio-iptables --native-nftables ", 1)]
        if self.drop_invalid:
            argv.append("(INVALID_DROP=true)")
        return " ".join(argv)


@dataclass
class _Transaction:
    """The rules of each table in the order istio-nftables makes them; inserts keep their index."""

    ipv6: bool
    calls: dict[str, list[tuple[str, str, int | None]]] = field(default_factory=dict)

    def add(self, table: str, chain: str, rule: str) -> None:
        self.calls.setdefault(table, []).append((chain, rule, None))

    def insert(self, table: str, chain: str, index: int, rule: str) -> None:
        self.calls.setdefault(table, []).append((chain, rule, index))

    def add_v6(self, table: str, chain: str, rule: str) -> None:
        """AppendV6RuleIfSupported: the rule only in a dual-stack pod."""
        if self.ipv6:
            self.add(table, chain, rule)

    def insert_v6(self, table: str, chain: str, index: int, rule: str) -> None:
        if self.ipv6:
            self.insert(table, chain, index, rule)

    def rule_set(self) -> RuleSet:
        rules = RuleSet()
        for name, declared in CHAINS.items():
            calls = self.calls.get(name, [])
            used = {chain for chain, _, _ in calls}
            if not used:
                continue
            table = Table("inet", name, {c: Chain(c, base) for c, base in declared.items() if c in used})
            for chain, text, index in calls:
                chain_rules = table.chains[chain].rules
                # an insert at or past the end is an append (Istio 1.27.4, 1.28.1)
                chain_rules.insert(len(chain_rules) if index is None else min(index, len(chain_rules)), Rule(text))
            rules.tables["inet", name] = table
        return rules


def parse_version(text: str | Version) -> Version:
    v = builder.parse_version(text)
    if v < NATIVE:
        raise BuildError(f"native nftables arrived in Istio {NATIVE[0]}.{NATIVE[1]}, not in {v[0]}.{v[1]}")
    return v


def build(version: str | Version, options: Options = NftOptions()) -> RuleSet:
    """The rule set istio-nftables of that version writes with these options."""
    v = parse_version(version)
    options.check()
    o = options if isinstance(options, NftOptions) else NftOptions(**vars(options))
    rules = _build(o).rule_set()
    _check_jumps(rules)
    return rules if v >= COUNTERS else rules.uncounted()


def _check_jumps(rules: RuleSet) -> None:
    """Istio makes only the chains that have rules: a jump into one that has none would fail."""
    for ref, rule in rules.numbered():
        verdict = rule.verdict or ""
        if verdict.startswith("jump ") and verdict[5:] not in rules.table(ref.table).chains:
            raise BuildError(f"{ref}: jumps to {verdict[5:]}, which these options leave empty "
                             f"(Istio's transaction would fail)")


def _by_family(items: tuple[str, ...]) -> dict[int, list[str]]:
    out: dict[int, list[str]] = {4: [], 6: []}
    for item in items:
        out[ipaddress.ip_interface(item).version].append(item)
    return out


def _prefix(text: str) -> str:
    """A CIDR as Istio prints it (Go's netip.Prefix: the address as given, with its length)."""
    iface = ipaddress.ip_interface(text)
    return f"{iface.ip}/{iface.network.prefixlen}"


def _build(o: NftOptions) -> _Transaction:
    t = _Transaction(o.ipv6)
    tproxy = o.mode == "TPROXY"
    dns = _by_family(o.dns_servers)
    wildcard = "*" in o.outbound_cidrs
    include = {family: [_prefix(c) for c in cidrs]
               for family, cidrs in _by_family(tuple(c for c in o.outbound_cidrs if c != "*")).items()}
    exclude = {family: [_prefix(c) for c in cidrs] for family, cidrs in _by_family(o.outbound_exclude_cidrs).items()}
    loopback_included = not wildcard and any(
        ipaddress.ip_interface(c).ip.is_loopback for c in o.outbound_cidrs)

    for nic in o.exclude_interfaces:
        t.add(NAT, "prerouting", f"iifname {nic} counter return")
        t.add(NAT, "output", f"oifname {nic} counter return")
    if tproxy:
        for nic in o.exclude_interfaces:
            t.add(MANGLE, "prerouting", f"iifname {nic} counter return")
            t.add(MANGLE, "output", f"oifname {nic} counter return")
    for nic in o.kubevirt_interfaces:
        t.insert(NAT, "prerouting", 0, f"iifname {nic} counter return")
    if o.drop_invalid:
        t.add(MANGLE, "prerouting", "meta l4proto tcp ct state invalid counter jump istio-drop")
        t.add(MANGLE, "istio-drop", "counter drop")

    t.add(NAT, "istio-inbound", f"meta l4proto tcp tcp dport {plan.Port.TUNNEL} counter return")
    t.add(NAT, "istio-redirect", f"meta l4proto tcp counter redirect to :{o.proxy_port}")
    t.add(NAT, "istio-in-redirect", f"meta l4proto tcp counter redirect to :{o.inbound_capture_port}")
    if o.inbound_ports:
        (_inbound_tproxy if tproxy else _inbound_redirect)(t, o)

    t.add(NAT, "output", "counter jump istio-output")
    for port in o.outbound_exclude_ports:
        t.add(NAT, "istio-output", f"tcp dport {port} counter return")
        t.add(NAT, "istio-output", f"udp dport {port} counter return")
    t.add(NAT, "istio-output", f"oifname lo ip saddr {PASSTHROUGH[4]} counter return")
    t.add_v6(NAT, "istio-output", f"oifname lo ip6 saddr {PASSTHROUGH[6]} counter return")
    for kind, ids in (("skuid", o.proxy_uid), ("skgid", o.gids)):
        # with DNS capture the proxy's own TCP DNS over lo is not sent inbound (uids only)
        ports = f"{{ 53, {plan.Port.TUNNEL} }}" if o.dns_servers and kind == "skuid" else str(plan.Port.TUNNEL)
        for ident in ids:
            t.add(NAT, "istio-output", f"oifname lo meta l4proto tcp ip daddr != {LOCALHOST[4]} "
                                       f"tcp dport != {ports} {kind} {ident} counter jump istio-in-redirect")
            t.add_v6(NAT, "istio-output", f"oifname lo meta l4proto tcp ip6 daddr != {LOCALHOST[6]} "
                                          f"tcp dport != {ports} {kind} {ident} counter jump istio-in-redirect")
            if not loopback_included:
                not_dns = "meta l4proto tcp tcp dport != 53 " if o.dns_servers else ""
                t.add(NAT, "istio-output", f"oifname lo {not_dns}{kind} != {ident} counter return")
            t.add(NAT, "istio-output", f"{kind} {ident} counter return")
    if o.dns_servers:
        _dns(t, o, dns)
    t.add(NAT, "istio-output", f"ip daddr {LOCALHOST[4]} counter return")
    t.add_v6(NAT, "istio-output", f"ip6 daddr {LOCALHOST[6]} counter return")
    for cidr in exclude[4]:
        t.add(NAT, "istio-output", f"ip daddr {cidr} counter return")
    for cidr in exclude[6]:
        t.add_v6(NAT, "istio-output", f"ip6 daddr {cidr} counter return")
    for port in o.outbound_ports:
        t.add(NAT, "istio-output", f"tcp dport {port} counter jump istio-redirect")
    if wildcard:
        t.add(NAT, "istio-output", "counter jump istio-redirect")
        for nic in o.kubevirt_interfaces:
            t.insert(NAT, "prerouting", 0, f"iifname {nic} counter jump istio-redirect")
    else:
        for family, ip, insert, add in ((4, "ip", t.insert, t.add), (6, "ip6", t.insert_v6, t.add_v6)):
            for cidr in include[family]:
                for nic in o.kubevirt_interfaces:
                    insert(NAT, "prerouting", 0, f"iifname {nic} {ip} daddr {cidr} counter jump istio-redirect")
                add(NAT, "istio-output", f"{ip} daddr {cidr} counter jump istio-redirect")
    if tproxy:
        _tproxy_marks(t, o)
    return t


def _inbound_redirect(t: _Transaction, o: NftOptions) -> None:
    t.add(NAT, "prerouting", "meta l4proto tcp counter jump istio-inbound")
    if o.inbound_ports == ("*",):
        for port in o.inbound_exclude_ports:
            t.add(NAT, "istio-inbound", f"meta l4proto tcp tcp dport {port} counter return")
        t.add(NAT, "istio-inbound", "meta l4proto tcp counter jump istio-in-redirect")
    else:
        for port in o.inbound_ports:
            t.add(NAT, "istio-inbound", f"meta l4proto tcp tcp dport {port} counter jump istio-in-redirect")


def _inbound_tproxy(t: _Transaction, o: NftOptions) -> None:
    """Inbound to Envoy by TPROXY in mangle: new connections diverted with mark 1337,
    established ones marked so the fwmark route keeps them local."""
    t.add(MANGLE, "istio-divert", f"counter meta mark set {plan.INBOUND_MARK}")
    t.add(MANGLE, "istio-divert", "counter accept")
    t.add(MANGLE, "istio-tproxy", f"meta l4proto tcp ip daddr != {LOCALHOST[4]} tproxy ip to "
                                  f":{o.inbound_capture_port} meta mark set {plan.INBOUND_MARK} counter accept")
    t.add_v6(MANGLE, "istio-tproxy", f"meta l4proto tcp ip6 daddr != {LOCALHOST[6]} tproxy ip6 to "
                                     f":{o.inbound_capture_port} meta mark set {plan.INBOUND_MARK} counter accept")
    t.add(MANGLE, "prerouting", "meta l4proto tcp counter jump istio-inbound")
    if o.inbound_ports == ("*",):
        for port in o.inbound_exclude_ports:
            t.add(MANGLE, "istio-inbound", f"meta l4proto tcp tcp dport {port} counter return")
        t.add(MANGLE, "istio-inbound", "meta l4proto tcp ct state related,established counter jump istio-divert")
        t.add(MANGLE, "istio-inbound", "meta l4proto tcp counter jump istio-tproxy")
    else:
        for port in o.inbound_ports:
            t.add(MANGLE, "istio-inbound",
                  f"meta l4proto tcp ct state related,established tcp dport {port} counter jump istio-divert")
            t.add(MANGLE, "istio-inbound", f"meta l4proto tcp tcp dport {port} counter jump istio-tproxy")


def _dns(t: _Transaction, o: NftOptions, servers: dict[int, list[str]]) -> None:
    """DNS capture: TCP and UDP to the resolv.conf servers to the agent's 15053, and
    conntrack zones in raw that keep the agent's upstream queries apart from the app's."""
    t.add(RAW, "output", "counter jump istio-output-dns")
    t.add(NAT, "istio-output", "counter jump istio-output-dns")
    for proto in ("tcp", "udp"):
        for s in servers[4]:
            t.add(NAT, "istio-output-dns", f"ip daddr {s}/32 {proto} dport 53 counter redirect to :{plan.Port.DNS_PROXY}")
        for s in servers[6]:
            t.add_v6(NAT, "istio-output-dns",
                     f"ip6 daddr {s}/128 {proto} dport 53 counter redirect to :{plan.Port.DNS_PROXY}")
    for kind, ids in (("skuid", o.proxy_uid), ("skgid", o.gids)):
        for ident in ids:
            t.add(RAW, "istio-output-dns", f"udp dport 53 meta {kind} {ident} counter ct zone set 1")
            t.add(RAW, "istio-output-dns", f"udp sport {plan.Port.DNS_PROXY} meta {kind} {ident} counter ct zone set 2")
    t.add(RAW, "prerouting", "counter jump istio-inbound")
    for s in servers[4]:
        t.add(RAW, "istio-output-dns", f"udp dport 53 ip daddr {s}/32 counter ct zone set 2")
        t.add(RAW, "istio-inbound", f"udp sport 53 ip saddr {s}/32 counter ct zone set 1")
    for s in servers[6]:
        t.add_v6(RAW, "istio-output-dns", f"udp dport 53 ip6 daddr {s}/128 counter ct zone set 2")
        t.add_v6(RAW, "istio-inbound", f"udp sport 53 ip6 saddr {s}/128 counter ct zone set 1")


def _tproxy_marks(t: _Transaction, o: NftOptions) -> None:
    """Marks that keep Envoy's own and the app's own connections away from TPROXY."""
    t.add(MANGLE, "prerouting", f"meta l4proto tcp mark {plan.INBOUND_MARK} counter ct mark set mark")
    t.add(MANGLE, "output", f"oifname lo meta l4proto tcp mark {plan.INBOUND_MARK} counter return")
    for kind, ids in (("skuid", o.proxy_uid), ("skgid", o.gids)):
        for ident in ids:
            t.add(MANGLE, "output", f"oifname lo meta l4proto tcp ip daddr != {LOCALHOST[4]} {kind} {ident} "
                                    f"counter meta mark set {plan.OUTBOUND_MARK}")
            t.add_v6(MANGLE, "output", f"oifname lo meta l4proto tcp ip6 daddr != {LOCALHOST[6]} {kind} {ident} "
                                       f"counter meta mark set {plan.OUTBOUND_MARK}")
    t.add(MANGLE, "output", f"meta l4proto tcp ct mark {plan.INBOUND_MARK} counter meta mark set ct mark")
    # Istio inserts the IPv6 passthrough guard at index 1 after the IPv4 one: it lands
    # before it, and the index-2 guard lands between the two.
    t.insert(MANGLE, "istio-inbound", 0, f"meta l4proto tcp mark {plan.INBOUND_MARK} counter return")
    t.insert(MANGLE, "istio-inbound", 1, f"iifname lo meta l4proto tcp ip saddr {PASSTHROUGH[4]} counter return")
    t.insert_v6(MANGLE, "istio-inbound", 1, f"iifname lo meta l4proto tcp ip6 saddr {PASSTHROUGH[6]} counter return")
    t.insert(MANGLE, "istio-inbound", 2, f"iifname lo meta l4proto tcp mark != {plan.OUTBOUND_MARK} counter return")
