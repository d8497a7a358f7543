"""Istio's native nftables rules: the builder against Istio's own expected rule sets (the
lab's record of its goldens, tests/data/istio-goldens/), the profiles, and the kernel taking
each profile's script."""

import socket
import subprocess
from dataclasses import replace
import pytest

from lab import netns
from lab.errors import LabError
from lab.netfilter import RuleRef
from lab.rules import builder, nftbuilder, nftlisting, nftset, profiles
from lab.rules.nftbuilder import NftOptions

from . import istio_record

# Istio's run_test.go starts every case from no inbound ports, no excluded inbound ports and
# no outbound ranges (uid and gid 1337), then sets the case's options; here in the lab's terms.
BASE = NftOptions(inbound_ports=(), inbound_exclude_ports=(), outbound_cidrs=())
UID_GID = {"proxy_uid": (3, 4), "proxy_gid": (1, 2)}
V6_NETS = {"outbound_exclude_cidrs": ("2001:db8::/32",), "outbound_cidrs": ("2001:db8::/32",)}
GOLDEN_OPTIONS = {
    "basic-exclude-nic": replace(BASE, exclude_interfaces=("not-istio-nic",)),
    "dns-uid-gid": replace(BASE, dns_servers=("127.0.0.53", "::127.0.0.53"), ipv6=True, **UID_GID),
    "drop-invalid": replace(BASE, drop_invalid=True),
    "empty": BASE,
    "inbound-ports-empty-tproxy": replace(BASE, mode="TPROXY"),
    "inbound-ports-include": replace(BASE, inbound_ports=("32000", "31000")),
    "inbound-ports-tproxy": replace(BASE, inbound_ports=("32000", "31000"), mode="TPROXY"),
    "inbound-ports-wildcard-tproxy": replace(BASE, inbound_ports=("*",), mode="TPROXY"),
    "inbound-ports-wildcard": replace(BASE, inbound_ports=("*",)),
    "ip-range": replace(BASE, outbound_exclude_cidrs=("1.1.0.0/16",), outbound_cidrs=("9.9.0.0/16",),
                        dns_servers=("127.0.0.53",), **UID_GID),
    "ipnets-with-kube-virt-interfaces": replace(BASE, kubevirt_interfaces=("eth1", "eth2"),
                                                outbound_cidrs=("10.0.0.0/8",)),
    "ipnets": replace(BASE, outbound_cidrs=("10.0.0.0/8",)),
    "ipv6-dns-uid-gid": replace(BASE, ipv6=True, **UID_GID),  # DNS asked for, but no resolver: none
    "ipv6-empty-inbound-ports": replace(BASE, ipv6=True),
    "ipv6-inbound-ports": replace(BASE, inbound_ports=("4000", "5000"), ipv6=True),
    "ipv6-ipnets": replace(BASE, inbound_ports=("4000", "5000"), inbound_exclude_ports=(6000, 7000),
                           kubevirt_interfaces=("eth0", "eth1"), ipv6=True, **V6_NETS),
    "ipv6-outbound-ports": replace(BASE, outbound_ports=(32000, 31000), ipv6=True),
    "ipv6-uid-gid": replace(BASE, inbound_ports=("4000", "5000"), inbound_exclude_ports=(6000, 7000),
                            kubevirt_interfaces=("eth0", "eth1"), ipv6=True, **V6_NETS, **UID_GID),
    "ipv6-virt-interfaces": replace(BASE, inbound_ports=("4000", "5000"), kubevirt_interfaces=("eth0", "eth1"),
                                    ipv6=True),
    "kube-virt-interfaces": replace(BASE, kubevirt_interfaces=("eth1", "eth2"), outbound_cidrs=("*",)),
    "loopback-outbound-iprange": replace(BASE, outbound_cidrs=("127.1.2.3/32",), dns_servers=("127.0.0.53",),
                                         **UID_GID),
    "outbound-ports-include": replace(BASE, outbound_ports=(32000, 31000)),
    "tproxy": replace(BASE, mode="TPROXY", inbound_ports=("*",), outbound_exclude_cidrs=("1.1.0.0/16",),
                      outbound_cidrs=("9.9.0.0/16",), dns_servers=("127.0.0.53",),
                      exclude_interfaces=("not-istio-nic",), ipv6=True),
}
# Options the lab does not model: owner groups (ISTIO_OUTBOUND_OWNER_GROUPS[_EXCLUDE]) and
# another loopback range (ISTIO_OUTBOUND_IPV4_LOOPBACK_CIDR).
NOT_MODELLED = {"outbound-owner-groups", "outbound-owner-groups-exclude", "ipv6-dns-outbound-owner-groups",
                "ipv6-dns-outbound-owner-groups-exclude", "host-ipv4-loopback-cidr"}
NFT_PROFILES = profiles.names(native_nftables=True)


_golden = istio_record.nftables


def _chain(rules: nftset.RuleSet, chain: str, table: str = nftbuilder.NAT) -> list[str]:
    return [r.text for r in rules.table(table).chains[chain].rules]


# ------------------------------------------------------------------ the builder against Istio
@pytest.mark.parametrize("version", ["1.27", "1.30"])
@pytest.mark.parametrize("name", sorted(GOLDEN_OPTIONS))
def test_the_builder_writes_istios_golden(name, version):
    assert nftbuilder.build(version, GOLDEN_OPTIONS[name]) == _golden(version, name)


def test_every_golden_is_compared_or_said_to_be_out_of_reach():
    goldens = set(istio_record.nftables_names())
    assert goldens == set(GOLDEN_OPTIONS) | NOT_MODELLED and not set(GOLDEN_OPTIONS) & NOT_MODELLED


@pytest.mark.parametrize("name", sorted(GOLDEN_OPTIONS))
def test_counters_arrived_in_128_where_the_lab_puts_its_own(name):
    older, newer = nftbuilder.build("1.27", GOLDEN_OPTIONS[name]), nftbuilder.build("1.28", GOLDEN_OPTIONS[name])
    assert not any(r.counter for _, r in older.numbered()) and all(r.counter for _, r in newer.numbered())
    assert older.counted() == newer


def test_an_insert_past_a_chains_end_is_an_append():
    """TPROXY with no inbound ports: mangle istio-inbound is empty when the guards are inserted
    at 0, 1 and 2 (istio/istio#58135, fixed in 1.27.4 and 1.28.1)."""
    rules = nftbuilder.build("1.27", replace(BASE, mode="TPROXY"))
    assert _chain(rules, "istio-inbound", nftbuilder.MANGLE) == [
        "meta l4proto tcp mark 1337 return",
        "iifname lo meta l4proto tcp ip saddr 127.0.0.6/32 return",
        "iifname lo meta l4proto tcp mark != 1338 return",
    ]


@pytest.mark.parametrize("version, problem", [
    ("1.26", "native nftables arrived in Istio 1.27, not in 1.26"),
    ("1.31", "Istio 1.31 is not modelled"),
])
def test_versions_out_of_reach(version, problem):
    with pytest.raises(builder.BuildError, match=problem):
        nftbuilder.build(version)


def test_a_jump_to_a_chain_istio_would_leave_empty_is_refused():
    """An IPv6 resolver in an IPv4 pod: the jumps to istio-output-dns are made, its rules are not."""
    with pytest.raises(builder.BuildError, match=r"istio-proxy-nat:istio-output#8: jumps to istio-output-dns"):
        nftbuilder.build("1.27", NftOptions(dns_servers=("fd00:10:96::a",)))


def test_plain_options_build_and_nft_options_say_their_command():
    assert nftbuilder.build("1.27", builder.Options()) == nftbuilder.build("1.27", NftOptions())
    options = NftOptions.from_mapping({"kubevirt_interfaces": ["eth1"], "drop_invalid": True}, "test")
    assert options.command().startswith("istio-iptables --native-nftables -p 15001 ")
    assert options.command().endswith(" -k eth1 (INVALID_DROP=true)")


# ------------------------------------------------------------------ the profiles
def test_the_nft_profiles_stand_apart_from_the_iptables_ones():
    assert NFT_PROFILES == ["istio-1.27-nft", "istio-1.27-nft-tproxy", "istio-1.27-nft-dns", "istio-1.27-nft-ipv6"]
    assert not set(NFT_PROFILES) & set(profiles.names())
    assert profiles.dual_stack("istio-1.27-nft-ipv6") and not profiles.dual_stack("istio-1.27-nft")
    with pytest.raises(LabError, match="istio-1.27-nft is a native nftables profile"):
        profiles.load("istio-1.27-nft")
    with pytest.raises(LabError, match="istio-1.25 is an iptables profile"):
        profiles.nft_rules("istio-1.25")


@pytest.mark.parametrize("name", NFT_PROFILES)
def test_a_profile_is_its_options_built(name):
    p = profiles.get(name)
    assert p.native_nftables and isinstance(p.options, NftOptions)
    assert profiles.nft_rules(name) == nftbuilder.build(p.istio, p.options)
    text = profiles.nft_text(name)
    assert text.startswith(f"# Istio 1.27 sidecar, native nftables, ")
    assert nftset.parse(text) == profiles.nft_rules(name).counted()


def test_default_istio_output_is_the_iptables_chain_rule_for_rule():
    """istio-1.27-nft's istio-output beside istio-1.25's ISTIO_OUTPUT: the same nine rules in
    the same order (docs/profiles.md's comparison table)."""
    nft = _chain(profiles.nft_rules("istio-1.27-nft"), "istio-output")
    iptables = [r.spec for r in profiles.load("istio-1.25").tables["nat"].chain_rules("ISTIO_OUTPUT")]
    assert list(zip(iptables, nft)) == [
        ("-s 127.0.0.6/32 -o lo -j RETURN", "oifname lo ip saddr 127.0.0.6/32 return"),
        ("! -d 127.0.0.1/32 -o lo -p tcp -m tcp ! --dport 15008 -m owner --uid-owner 1337 -j ISTIO_IN_REDIRECT",
         "oifname lo meta l4proto tcp ip daddr != 127.0.0.1/32 tcp dport != 15008 skuid 1337 jump istio-in-redirect"),
        ("-o lo -m owner ! --uid-owner 1337 -j RETURN", "oifname lo skuid != 1337 return"),
        ("-m owner --uid-owner 1337 -j RETURN", "skuid 1337 return"),
        ("! -d 127.0.0.1/32 -o lo -p tcp -m tcp ! --dport 15008 -m owner --gid-owner 1337 -j ISTIO_IN_REDIRECT",
         "oifname lo meta l4proto tcp ip daddr != 127.0.0.1/32 tcp dport != 15008 skgid 1337 jump istio-in-redirect"),
        ("-o lo -m owner ! --gid-owner 1337 -j RETURN", "oifname lo skgid != 1337 return"),
        ("-m owner --gid-owner 1337 -j RETURN", "skgid 1337 return"),
        ("-d 127.0.0.1/32 -j RETURN", "ip daddr 127.0.0.1/32 return"),
        ("-j ISTIO_REDIRECT", "jump istio-redirect"),
    ]


def test_inbound_exclusions_and_outbound_port_exclusions_mirror_iptables():
    """What no golden of Istio's shows: `-d` with `-b '*'` (every profile has it) and `-o`."""
    rules = nftbuilder.build("1.27", NftOptions(outbound_exclude_ports=(8443,)))
    assert _chain(rules, "istio-inbound") == [f"meta l4proto tcp tcp dport {port} return"
                                              for port in (15008, 15090, 15021, 15020)] + [
        "meta l4proto tcp jump istio-in-redirect"]
    assert _chain(rules, "istio-output")[:3] == ["tcp dport 8443 return", "udp dport 8443 return",
                                                 "oifname lo ip saddr 127.0.0.6/32 return"]
    iptables = builder.build("1.25", builder.Options(outbound_exclude_ports=(8443,)))
    assert [r.spec for r in iptables.tables["nat"].chain_rules("ISTIO_OUTPUT")][:2] == [
        "-p tcp -m tcp --dport 8443 -j RETURN", "-p udp -m udp --dport 8443 -j RETURN"]


def test_dual_stack_interleaves_the_families_in_one_chain():
    """iptables keeps nine ISTIO_OUTPUT rules per family; nft's one inet chain has thirteen,
    each IPv6 twin right after its IPv4 rule, so the uid return is rule 6, not 4."""
    rules = profiles.nft_rules("istio-1.27-nft-ipv6")
    output = _chain(rules, "istio-output")
    assert len(output) == 13
    assert output[1] == "oifname lo ip6 saddr ::6/128 return"
    assert rules.rule(RuleRef(nftbuilder.NAT, "istio-output", 6)).text == "skuid 1337 return"
    assert rules.rule(RuleRef(nftbuilder.NAT, "istio-output", 13)).text == "jump istio-redirect"


def test_dual_stack_tproxy_puts_the_ipv6_passthrough_guard_first():
    """Istio inserts the ::6 guard at index 1 after the 127.0.0.6 one: the kernel puts it
    before it, and the mark guard inserted at 2 between them."""
    rules = nftbuilder.build("1.27", NftOptions(mode="TPROXY", ipv6=True))
    assert _chain(rules, "istio-inbound", nftbuilder.MANGLE)[:4] == [
        "meta l4proto tcp mark 1337 return",
        "iifname lo meta l4proto tcp ip6 saddr ::6/128 return",
        "iifname lo meta l4proto tcp mark != 1338 return",
        "iifname lo meta l4proto tcp ip saddr 127.0.0.6/32 return",
    ]


# ------------------------------------------------------------------ the kernel
def _in_scratch(*commands: tuple[list[str], str]) -> str:
    """Run commands (argv, stdin) one after another in a fresh network namespace that vanishes
    afterwards; the last one's output."""
    host = netns.inode("/proc/thread-self/ns/net")
    with netns.scratch():
        assert netns.inode("/proc/thread-self/ns/net") != host  # never the host's rules
        for argv, stdin in commands:
            done = subprocess.run(argv, input=stdin, capture_output=True, text=True)
            assert done.returncode == 0, f"{' '.join(argv)}: {done.stderr}"
    return done.stdout


@pytest.mark.kernel
@pytest.mark.parametrize("name", NFT_PROFILES)
def test_the_kernel_takes_a_profile_and_lists_it_back(name):
    """Applied twice (the second replaces the first whole, as a pod's restart would), the
    kernel lists the profile's rules in nftlisting's words, each with the lab's counter."""
    script = profiles.nft_text(name)
    listing = _in_scratch((["nft", "-f", "-"], script), (["nft", "-f", "-"], script),
                          (["nft", "-a", "list", "ruleset"], ""))
    kernel = nftset.parse(listing, f"{name} as listed")
    assert kernel == nftlisting.listed(profiles.nft_rules(name).counted())
    assert kernel.uncounted() == nftlisting.listed(profiles.nft_rules(name))
    assert set(kernel.packet_counts().values()) == {0}
    assert len(kernel.handles()) == len(list(kernel.numbered()))


@pytest.mark.kernel
def test_the_kernel_takes_every_option_at_once():
    options = NftOptions(mode="TPROXY", ipv6=True, exclude_interfaces=("eth9",), kubevirt_interfaces=("eth1",),
                         drop_invalid=True, outbound_exclude_ports=(8443,), outbound_ports=(9000,),
                         outbound_cidrs=("10.96.0.0/16", "fd00:10:96::/112"),
                         outbound_exclude_cidrs=("10.96.0.1/32", "fd00:10:96::1/128"),
                         dns_servers=("10.96.0.10", "fd00:10:96::a"), proxy_uid=(1337, 1338))
    rules = nftbuilder.build("1.30", options)
    kernel = nftset.parse(_in_scratch((["nft", "-f", "-"], nftset.script(rules)), (["nft", "list", "ruleset"], "")))
    assert kernel == nftlisting.listed(rules)


@pytest.mark.kernel
def test_an_ipv4_profile_captures_ipv6_too():
    """Without IPv6 Istio writes no ip6tables rules, but its inet table's family-free rules
    see IPv6 as well: an IPv6 connection from the app is redirected to 15001 like an IPv4 one
    (only the ::6 and ::1 guards are missing)."""
    script = profiles.nft_text("istio-1.27-nft")
    host = netns.inode("/proc/thread-self/ns/net")
    with netns.scratch():
        assert netns.inode("/proc/thread-self/ns/net") != host
        for argv in (["ip", "link", "set", "lo", "up"], ["ip", "link", "add", "v0", "type", "veth", "peer", "v1"],
                     ["ip", "link", "set", "v0", "up"], ["ip", "link", "set", "v1", "up"],
                     ["ip", "addr", "add", "fd00::1/64", "dev", "v0", "nodad"]):
            subprocess.run(argv, check=True, capture_output=True)
        subprocess.run(["nft", "-f", "-"], input=script, text=True, check=True, capture_output=True)
        with socket.socket(socket.AF_INET6) as app:  # root: not the proxy's uid
            app.settimeout(2)
            with pytest.raises(ConnectionRefusedError):  # redirected to [::1]:15001, where nobody listens
                app.connect(("fd00::2", 9080))
        listing = subprocess.run(["nft", "list", "table", "inet", nftbuilder.NAT], capture_output=True,
                                 text=True, check=True).stdout
    counts = nftset.parse(listing).packet_counts()
    moved = {str(ref) for ref, packets in counts.items() if packets}
    assert moved == {"istio-proxy-nat:output#1", "istio-proxy-nat:istio-output#9", "istio-proxy-nat:istio-redirect#1"}
