"""Istio's sidecar rules, built from istio-iptables' options for one Istio version.

The builder follows istio-iptables' own order of appends and inserts, version by
version (each `if v >= ...` below is one change in Istio's history; docs/profiles.md
has the table).  Rules are written as the kernel reads them back (`-m tcp`,
`--to-ports`, marks in hex, options in iptables-save's order) and chains sorted as
iptables-save sorts them, so a built rule set and a real pod's dump compare line
for line.  DNS capture, TPROXY and IPv6 are modelled as Istio 1.25 and later
write them; asking for them with an older version is an error, not a guess.
"""

from __future__ import annotations

import ipaddress
import re
import shlex
from dataclasses import dataclass, field, fields

from .. import plan
from ..errors import LabError
from ..netfilter import BUILTIN_CHAINS, BUILTIN_TARGETS, TABLES
from .save import Dump, RuleLine, TableDump

Version = tuple[int, int]
OLDEST: Version = (1, 4)
NEWEST: Version = (1, 30)  # the newest release checked against Istio's source
MODERN: Version = (1, 25)  # DNS capture, TPROXY and IPv6 are modelled from here on
MODES = ("REDIRECT", "TPROXY")
IFNAME = re.compile(r"[^/:\s]{1,15}")  # the kernel's dev_valid_name: under IFNAMSIZ, no '/', ':' or space


class BuildError(LabError):
    """Options or a version the builder cannot turn into rules; one line."""


def parse_version(text: str | Version) -> Version:
    if isinstance(text, tuple):
        v = text
    else:
        try:
            major, minor = (int(part) for part in str(text).split(".")[:2])
        except ValueError:
            raise BuildError(f"bad Istio version {text!r} (write it as 1.13)") from None
        v = (major, minor)
    if not OLDEST <= v <= NEWEST:
        raise BuildError(f"Istio {v[0]}.{v[1]} is not modelled (versions {_str(OLDEST)} - {_str(NEWEST)})")
    return v


def _str(v: Version) -> str:
    return f"{v[0]}.{v[1]}"


@dataclass(frozen=True)
class Options:
    """istio-iptables' options (its flag in each comment); the defaults are a default sidecar's."""

    proxy_port: int = plan.Port.OUTBOUND  # -p
    inbound_capture_port: int = plan.Port.INBOUND  # -z
    proxy_uid: tuple[int, ...] = (plan.PROXY_UID,)  # -u
    proxy_gid: tuple[int, ...] = ()  # -g; empty: the same as the uids
    mode: str = "REDIRECT"  # -m
    outbound_cidrs: tuple[str, ...] = ("*",)  # -i; ("*",) is every destination
    outbound_exclude_cidrs: tuple[str, ...] = ()  # -x
    inbound_ports: tuple[str, ...] = ("*",)  # -b; ("*",) every port, () none
    inbound_exclude_ports: tuple[int, ...] = (plan.Port.STATS, plan.Port.READY, plan.Port.AGENT)  # -d
    outbound_ports: tuple[int, ...] = ()  # -q
    outbound_exclude_ports: tuple[int, ...] = ()  # -o
    exclude_interfaces: tuple[str, ...] = ()  # -c
    kubevirt_interfaces: tuple[str, ...] = ()  # -k: a VM's interfaces, whose traffic is outbound
    dns_servers: tuple[str, ...] = ()  # DNS capture (ISTIO_META_DNS_CAPTURE) of these resolv.conf servers
    ipv6: bool = False  # dual stack: ip6tables rules as well

    @property
    def gids(self) -> tuple[int, ...]:
        return self.proxy_gid or self.proxy_uid

    @classmethod
    def from_mapping(cls, data: dict, where: str) -> "Options":
        """Options from a profile's `options:` mapping; names the key of the first problem."""
        known = {f.name: f for f in fields(cls)}
        values = {}
        for key, value in (data or {}).items():
            if key not in known:
                raise BuildError(f"{where}: unknown option {key!r} (options: {', '.join(known)})")
            default = known[key].default
            if isinstance(default, tuple):
                items = value if isinstance(value, list) else [value]
                kind = int if key.endswith(("port", "ports", "uid", "gid")) else str
                if not all(isinstance(i, kind) and not isinstance(i, bool) for i in items):
                    raise BuildError(f"{where}: {key}: expected a list of {kind.__name__}, got {value!r}")
                values[key] = tuple(items)
            elif not isinstance(value, type(default)) or isinstance(value, bool) != isinstance(default, bool):
                raise BuildError(f"{where}: {key}: expected {type(default).__name__}, got {value!r}")
            else:
                values[key] = value
        options = cls(**values)
        options.check(where)
        return options

    def check(self, where: str = "options") -> None:
        if self.mode not in MODES:
            raise BuildError(f"{where}: mode: {self.mode!r} is not one of {', '.join(MODES)}")
        for key in ("outbound_cidrs", "outbound_exclude_cidrs", "dns_servers"):
            for text in getattr(self, key):
                if text == "*" and key == "outbound_cidrs":
                    continue
                try:
                    ipaddress.ip_network(text, strict=False)
                except ValueError:
                    raise BuildError(f"{where}: {key}: {text!r} is not an address or CIDR") from None
        if "*" in self.outbound_exclude_cidrs:
            raise BuildError(f"{where}: outbound_exclude_cidrs: '*' would exclude everything")
        for port in self.inbound_ports:
            if port != "*" and not port.isdigit():
                raise BuildError(f"{where}: inbound_ports: {port!r} is not a port or '*'")
        for key in ("exclude_interfaces", "kubevirt_interfaces"):
            for name in getattr(self, key):
                if not IFNAME.fullmatch(name) or name in (".", ".."):
                    raise BuildError(f"{where}: {key}: {name!r} is not an interface name the kernel accepts")

    def command(self) -> str:
        """The istio-iptables command line these options stand for."""

        def join(items) -> str:
            return ",".join(str(i) for i in items)

        def quoted(text: str) -> str:
            return "'*'" if text == "*" else (text or '""')

        argv = [f"istio-iptables -p {self.proxy_port} -z {self.inbound_capture_port} -u {join(self.proxy_uid)}"]
        if self.proxy_gid:
            argv.append(f"-g {join(self.proxy_gid)}")
        argv.append(f"-m {self.mode} -i {quoted(join(self.outbound_cidrs))} -x {quoted(join(self.outbound_exclude_cidrs))}")
        argv.append(f"-b {quoted(join(self.inbound_ports))} -d {quoted(join(self.inbound_exclude_ports))}")
        for flag, items in (("-q", self.outbound_ports), ("-o", self.outbound_exclude_ports),
                            ("-k", self.kubevirt_interfaces), ("-c", self.exclude_interfaces)):
            if items:
                argv.append(f"{flag} {join(items)}")
        if self.dns_servers:
            argv.append(f"--redirect-dns  (resolv.conf: {join(self.dns_servers)})")
        if self.ipv6:
            argv.append("(ENABLE_INBOUND_IPV6=true)")
        return " ".join(argv)


@dataclass
class _Tables:
    """Rules per table and chain in the order istio-iptables appends and inserts them."""

    chains: dict[tuple[str, str], list[str]] = field(default_factory=dict)

    def append(self, table: str, chain: str, spec: str) -> None:
        self.chains.setdefault((table, chain), []).append(spec)

    def insert(self, table: str, chain: str, position: int, spec: str) -> None:
        self.chains.setdefault((table, chain), []).insert(position - 1, spec)

    def dump(self, family: int) -> Dump:
        dump = Dump(family=family)
        for name in TABLES:
            builtin = BUILTIN_CHAINS[name]
            mine = {chain: specs for (table, chain), specs in self.chains.items() if table == name and specs}
            if not mine:
                continue
            targets = {f" {s}".split(" -j ")[1].split()[0] for specs in mine.values() for s in specs}
            user = sorted((set(mine) | targets) - set(builtin) - BUILTIN_TARGETS)
            table = TableDump(name, dict.fromkeys(builtin, "ACCEPT"), user)
            for chain in list(builtin) + user:
                table.rules += [RuleLine(chain, tuple(shlex.split(s))) for s in mine.get(chain, [])]
            dump.tables[name] = table
        return dump


def build(version: str | Version, options: Options = Options(), family: int = 4) -> Dump:
    """The rules `istio-iptables` of that version installs with these options, for one family.

    Family 6 is empty unless options.ipv6: without IPv6 Istio installs no ip6tables rules.
    """
    v = parse_version(version)
    options.check()
    o = options
    if v < MODERN:
        asked = [what for what, on in (("DNS capture", o.dns_servers), ("TPROXY", o.mode == "TPROXY"),
                                       ("IPv6", o.ipv6)) if on]
        if asked:
            raise BuildError(f"{asked[0]} is modelled for Istio {_str(MODERN)} and later, not {_str(v)}")
    if v < (1, 7) and o.outbound_ports:
        raise BuildError(f"outbound_ports (-q) arrived in Istio 1.7, not in {_str(v)}")
    if v < (1, 12) and o.exclude_interfaces:
        raise BuildError(f"exclude_interfaces (-c) arrived in Istio 1.12, not in {_str(v)}")
    if family == 6 and not o.ipv6:
        return Dump(family=6)
    return _build(v, o, family).dump(family)


def _family_cidrs(cidrs: tuple[str, ...], family: int) -> list[str]:
    nets = [ipaddress.ip_network(c, strict=False) for c in cidrs if c != "*"]
    return [str(n) for n in nets if n.version == family]


def _build(v: Version, o: Options, family: int) -> _Tables:
    t = _Tables()
    localhost = "127.0.0.1/32" if family == 4 else "::1/128"
    passthrough = "127.0.0.6/32" if family == 4 else "::6/128"
    tproxy = o.mode == "TPROXY"
    wildcard = "*" in o.outbound_cidrs
    include = _family_cidrs(o.outbound_cidrs, family)
    loopback_included = v >= (1, 7) and any(
        ipaddress.ip_network(c, strict=False).is_loopback for c in o.outbound_cidrs if c != "*")
    dns = [s for s in o.dns_servers if ipaddress.ip_address(s).version == family]
    host = 32 if family == 4 else 128

    for nic in o.exclude_interfaces:
        t.append("nat", "PREROUTING", f"-i {nic} -j RETURN")
        t.append("nat", "OUTPUT", f"-o {nic} -j RETURN")
    for nic in o.kubevirt_interfaces:  # a VM's traffic is never inbound: each insert goes to the head
        t.insert("nat", "PREROUTING", 1, f"-i {nic} -j RETURN")
    if tproxy:
        for nic in o.exclude_interfaces:
            t.append("mangle", "PREROUTING", f"-i {nic} -j RETURN")
            t.append("mangle", "OUTPUT", f"-o {nic} -j RETURN")
    if v >= (1, 7):
        t.append("nat", "ISTIO_INBOUND", f"-p tcp -m tcp --dport {plan.Port.TUNNEL} -j RETURN")
    t.append("nat", "ISTIO_REDIRECT", f"-p tcp -j REDIRECT --to-ports {o.proxy_port}")
    # up to 1.5 the inbound capture port served only `-b '*'`; a port list went to the outbound port
    in_port = o.inbound_capture_port if v >= (1, 6) or o.inbound_ports == ("*",) else o.proxy_port
    t.append("nat", "ISTIO_IN_REDIRECT", f"-p tcp -j REDIRECT --to-ports {in_port}")
    _inbound(t, v, o, localhost)

    t.append("nat", "OUTPUT", "-j ISTIO_OUTPUT" if v >= MODERN else "-p tcp -j ISTIO_OUTPUT")
    for port in o.outbound_exclude_ports:
        t.append("nat", "ISTIO_OUTPUT", f"-p tcp -m tcp --dport {port} -j RETURN")
        if v >= MODERN:
            t.append("nat", "ISTIO_OUTPUT", f"-p udp -m udp --dport {port} -j RETURN")
    t.append("nat", "ISTIO_OUTPUT", f"-s {passthrough} -o lo -j RETURN")
    if v < (1, 5):  # one unscoped redirect of everything on lo: an app calling itself went through Envoy
        t.append("nat", "ISTIO_OUTPUT", f"! -d {localhost} -o lo -j ISTIO_IN_REDIRECT")
        for uid in o.proxy_uid:
            t.append("nat", "ISTIO_OUTPUT", f"-m owner --uid-owner {uid} -j RETURN")
        for gid in o.gids:
            t.append("nat", "ISTIO_OUTPUT", f"-m owner --gid-owner {gid} -j RETURN")
    else:  # "Disable redirect calls to app itself via envoy": the lo rules are scoped by owner
        for kind, ids in (("uid", o.proxy_uid), ("gid", o.gids)):
            for ident in ids:
                if o.dns_servers and kind == "uid":
                    tunnel = f"-p tcp -m multiport ! --dports 53,{plan.Port.TUNNEL} "
                elif v >= (1, 18):
                    tunnel = f"-p tcp -m tcp ! --dport {plan.Port.TUNNEL} "
                else:
                    tunnel = ""
                t.append("nat", "ISTIO_OUTPUT",
                         f"! -d {localhost} -o lo {tunnel}-m owner --{kind}-owner {ident} -j ISTIO_IN_REDIRECT")
                if not loopback_included:
                    not_dns = "-p tcp -m tcp ! --dport 53 " if o.dns_servers else ""
                    t.append("nat", "ISTIO_OUTPUT", f"-o lo {not_dns}-m owner ! --{kind}-owner {ident} -j RETURN")
                t.append("nat", "ISTIO_OUTPUT", f"-m owner --{kind}-owner {ident} -j RETURN")
    if o.dns_servers:
        _dns(t, o, dns, host)
    t.append("nat", "ISTIO_OUTPUT", f"-d {localhost} -j RETURN")
    for cidr in _family_cidrs(o.outbound_exclude_cidrs, family):
        t.append("nat", "ISTIO_OUTPUT", f"-d {cidr} -j RETURN")
    for port in o.outbound_ports:
        t.append("nat", "ISTIO_OUTPUT", f"-p tcp -m tcp --dport {port} -j ISTIO_REDIRECT")
    if wildcard:
        t.append("nat", "ISTIO_OUTPUT", "-j ISTIO_REDIRECT")
        for nic in o.kubevirt_interfaces:  # what a VM sends is outbound: to Envoy's 15001, ahead of the returns
            t.insert("nat", "PREROUTING", 1, f"-i {nic} -j ISTIO_REDIRECT")
    elif include:
        for cidr in include:
            for nic in o.kubevirt_interfaces:
                t.insert("nat", "PREROUTING", 1, f"-d {cidr} -i {nic} -j ISTIO_REDIRECT")
            t.append("nat", "ISTIO_OUTPUT", f"-d {cidr} -j ISTIO_REDIRECT")
        if v <= (1, 22):  # "all other traffic is not redirected", said explicitly until 1.22
            t.append("nat", "ISTIO_OUTPUT", "-j RETURN")
    if tproxy:
        _tproxy_marks(t, o, family, localhost, passthrough)
    return t


def _inbound(t: _Tables, v: Version, o: Options, localhost: str) -> None:
    if not o.inbound_ports:
        return
    tproxy = o.mode == "TPROXY"
    table = "mangle" if tproxy else "nat"
    if tproxy:
        t.append("mangle", "ISTIO_DIVERT", f"-j MARK --set-xmark {plan.INBOUND_MARK:#x}/0xffffffff")
        t.append("mangle", "ISTIO_DIVERT", "-j ACCEPT")
        on_ip = "0.0.0.0" if localhost.startswith("127") else "::"
        t.append("mangle", "ISTIO_TPROXY", f"! -d {localhost} -p tcp -j TPROXY --on-port {o.inbound_capture_port} "
                                           f"--on-ip {on_ip} --tproxy-mark {plan.INBOUND_MARK:#x}/0xffffffff")
    t.append(table, "PREROUTING", "-p tcp -j ISTIO_INBOUND")
    if o.inbound_ports == ("*",):
        if v < (1, 13):  # "Makes sure SSH is not redirected"
            t.append(table, "ISTIO_INBOUND", "-p tcp -m tcp --dport 22 -j RETURN")
        for port in o.inbound_exclude_ports:
            t.append(table, "ISTIO_INBOUND", f"-p tcp -m tcp --dport {port} -j RETURN")
        if tproxy:
            t.append("mangle", "ISTIO_INBOUND", "-p tcp -m conntrack --ctstate RELATED,ESTABLISHED -j ISTIO_DIVERT")
            t.append("mangle", "ISTIO_INBOUND", "-p tcp -j ISTIO_TPROXY")
        else:
            t.append("nat", "ISTIO_INBOUND", "-p tcp -j ISTIO_IN_REDIRECT")
        return
    for port in o.inbound_ports:
        if tproxy:
            t.append("mangle", "ISTIO_INBOUND",
                     f"-p tcp -m tcp --dport {port} -m conntrack --ctstate RELATED,ESTABLISHED -j ISTIO_DIVERT")
            t.append("mangle", "ISTIO_INBOUND", f"-p tcp -m tcp --dport {port} -j ISTIO_TPROXY")
        else:
            t.append("nat", "ISTIO_INBOUND", f"-p tcp -m tcp --dport {port} -j ISTIO_IN_REDIRECT")


def _dns(t: _Tables, o: Options, servers: list[str], host: int) -> None:
    """DNS capture as 1.25 writes it: a nat jump to ISTIO_OUTPUT_DNS and conntrack zones in raw."""
    t.append("raw", "OUTPUT", "-j ISTIO_OUTPUT_DNS")
    if servers:
        t.append("nat", "ISTIO_OUTPUT", "-j ISTIO_OUTPUT_DNS")
    for proto in ("tcp", "udp"):
        for s in servers:
            t.append("nat", "ISTIO_OUTPUT_DNS",
                     f"-d {s}/{host} -p {proto} -m {proto} --dport 53 -j REDIRECT --to-ports {plan.Port.DNS_PROXY}")
    for kind, ids in (("uid", o.proxy_uid), ("gid", o.gids)):
        for ident in ids:
            t.append("raw", "ISTIO_OUTPUT_DNS", f"-p udp -m udp --dport 53 -m owner --{kind}-owner {ident} -j CT --zone 1")
            t.append("raw", "ISTIO_OUTPUT_DNS",
                     f"-p udp -m udp --sport {plan.Port.DNS_PROXY} -m owner --{kind}-owner {ident} -j CT --zone 2")
    if servers:
        t.append("raw", "PREROUTING", "-j ISTIO_INBOUND")
    for s in servers:
        t.append("raw", "ISTIO_OUTPUT_DNS", f"-d {s}/{host} -p udp -m udp --dport 53 -j CT --zone 2")
        t.append("raw", "ISTIO_INBOUND", f"-s {s}/{host} -p udp -m udp --sport 53 -j CT --zone 1")


def _tproxy_marks(t: _Tables, o: Options, family: int, localhost: str, passthrough: str) -> None:
    """Marks that keep Envoy's own and the app's own connections away from TPROXY."""
    mark, outbound = f"{plan.INBOUND_MARK:#x}", f"{plan.OUTBOUND_MARK:#x}"
    restore = "--nfmask 0xffffffff --ctmask 0xffffffff"
    t.append("mangle", "PREROUTING", f"-p tcp -m mark --mark {mark} -j CONNMARK --save-mark {restore}")
    t.append("mangle", "OUTPUT", f"-o lo -p tcp -m mark --mark {mark} -j RETURN")
    for kind, ids in (("uid", o.proxy_uid), ("gid", o.gids)):
        for ident in ids:
            t.append("mangle", "OUTPUT", f"! -d {localhost} -o lo -p tcp -m owner --{kind}-owner {ident} "
                                         f"-j MARK --set-xmark {outbound}/0xffffffff")
    t.append("mangle", "OUTPUT", f"-p tcp -m connmark --mark {mark} -j CONNMARK --restore-mark {restore}")
    t.insert("mangle", "ISTIO_INBOUND", 1, f"-p tcp -m mark --mark {mark} -j RETURN")
    t.insert("mangle", "ISTIO_INBOUND", 2, f"-s {passthrough} -i lo -p tcp -j RETURN")
    t.insert("mangle", "ISTIO_INBOUND", 3, f"-i lo -p tcp -m mark ! --mark {outbound} -j RETURN")
