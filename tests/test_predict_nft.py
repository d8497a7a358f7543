"""predict's reading of nftables rules: each expression as nf_tables runs it (dependencies,
negations, a packet with no socket or no connection), each statement and verdict, the order of
base chains at a hook, and "cannot predict" for what it does not model.  No root, no kernel;
tests/test_predict_scenarios.py and the kernel tests hold it to what the kernel measured."""

from __future__ import annotations

import pytest

from lab.predict import CannotPredict, Flow, Predictor, chains, inet, nft
from lab.predict.packet import Connection, Owner, Packet, Socket
from lab.rules import nftlisting, nftset, profiles, ruleset

SIDECAR = Predictor(profiles.dumps("istio-1.13")).topology.namespaces["sidecar"]
APP, PROXY = Owner(1000, 1000, (1337,)), Owner(1337, 1337)


def ip(text: str) -> int:
    return inet.parse(text)[1]


def packet(dst="10.96.0.90", dport=9080, src="10.244.0.10", sport=40000, proto="tcp", oif="eth0", iif="",
           owner=APP, mark=0, conn=None, family=4, **kw) -> Packet:
    return Packet(family, proto, ip(src), sport, ip(dst), dport, iif, oif, mark, owner, conn=conn, **kw)


V6 = dict(src="fd00:10:244::10", dst="fd00:10:96::90", family=6)
CONN = Connection(0, ip("10.96.0.90"), 9080, mark=1337)


def rule(text: str, family: int | None = None, role: str = "filter") -> chains.Rule:
    return nft.read(chains.Table("t", role, family), "output", 1, nftset.Rule(text))


def matches(text: str, p: Packet) -> bool:
    return rule(text).test(p, SIDECAR)


def fire(text: str, p: Packet, hook: str = "OUTPUT"):
    return rule(text).target.fire(p, SIDECAR, hook)


def path(text: str, flow: Flow, **kw) -> str:
    return str(Predictor(nft=nftset.parse(text), **kw).predict(flow).path)


# --- matches ----------------------------------------------------------------------------------

@pytest.mark.parametrize("text,p,expected", [
    ("oifname lo", packet(oif="lo"), True),
    ('oifname "lo"', packet(oif="lo"), True),
    ("oifname lo", packet(), False),
    ("oifname != lo", packet(), True),
    ('oifname "eth*"', packet(), True),
    ("oifname { lo, eth0 }", packet(), True),
    ("iifname lo", packet(), False),  # a locally generated packet has no input interface
    ("iifname != lo", packet(), True),
    ("iif lo", packet(iif="lo", oif=""), True),
    ("ip saddr 127.0.0.6/32", packet(src="127.0.0.6"), True),
    ("ip saddr 127.0.0.6", packet(), False),
    ("ip daddr != 127.0.0.1/32", packet(), True),
    ("ip daddr != 127.0.0.1/32", packet(**V6), False),  # `ip daddr` needs an IPv4 packet, != or not
    ("ip6 daddr != ::1", packet(**V6), True),
    ("ip6 daddr != ::1", packet(), False),
    ("ip6 daddr fd00:10:96::/112", packet(**V6), True),
    ("ip daddr { 10.244.0.0/24, 10.96.0.90 }", packet(), True),
    ("ip daddr != { 10.244.0.0/24, 10.96.0.90 }", packet(), False),
    ("meta l4proto tcp", packet(), True),
    ("meta l4proto tcp", packet(proto="udp"), False),
    ("meta l4proto { tcp, udp }", packet(proto="udp"), True),
    ("meta l4proto != tcp", packet(proto="udp"), True),
    ("ip protocol udp", packet(proto="udp"), True),
    ("ip protocol udp", packet(proto="udp", **V6), False),  # an IPv4 header's field
    ("ip6 nexthdr tcp", packet(**V6), True),
    ("meta nfproto ipv6", packet(**V6), True),
    ("meta nfproto ipv6", packet(), False),
    ("tcp dport 9080", packet(), True),
    ("tcp dport 9000-9100", packet(), True),
    ("tcp dport != 15008", packet(), True),
    ("tcp dport != 15008", packet(proto="udp"), False),  # `tcp dport` needs a TCP packet, != or not
    ("tcp dport != { 53, 15008 }", packet(dport=53), False),
    ("udp dport 9080", packet(), False),
    ("udp dport 9080", packet(proto="udp"), True),
    ("th dport 9080", packet(proto="udp"), True),
    ("tcp sport 40000", packet(), True),
    ("tcp sport 1024-65535", packet(sport=None), True),  # an ephemeral port lies in that range, whichever
    ("skuid 1337", packet(owner=PROXY), True),
    ("meta skuid 1337", packet(), False),
    ("skuid != 1337", packet(), True),
    ("skuid != 1337", packet(owner=None), False),  # no socket: the rule fails, != or not (xt_owner's ! matches)
    ("skuid 1337", packet(owner=None), False),
    ("meta skgid 1337", packet(owner=PROXY), True),
    ("meta skgid 1337", packet(), False),  # the socket's fsgid alone: no supplementary group
    ("mark 1337", packet(mark=1337), True),
    ("meta mark 0x00000539", packet(mark=1337), True),
    ("meta mark != 0x53a", packet(mark=1337), True),
    ("meta mark & 0x000000ff == 0x00000039", packet(mark=0x539), True),
    ("meta mark & 0xff != 0x39", packet(mark=0x539), False),
    ("ct mark 1337", packet(conn=CONN), True),
    ("ct mark 1337", packet(), False),
    ("ct mark != 1337", packet(), False),  # no connection: the rule fails, != or not
    ("ct mark 0", packet(zone_template=1), True),  # a template's mark
    ("ct state new", packet(conn=CONN), True),
    ("ct state new", packet(zone_template=2), True),  # a CT template reads as new
    ("ct state invalid", packet(), True),  # nothing tracks it
    ("ct state related,established", packet(conn=CONN), False),
    ("ct state { established, related }", packet(conn=CONN), False),
    ("ct state != established", packet(conn=CONN), True),
    ("counter", packet(), True),
    ('comment "anything" counter', packet(), True),
])
def test_matches(text, p, expected) -> None:
    assert matches(text, p) is expected


def test_a_rule_is_its_matches_in_order_and_says_why_it_failed() -> None:
    r = rule("oifname lo meta l4proto tcp ip daddr != 127.0.0.1/32 tcp dport != 15008 skuid 1337 counter "
             "jump istio-in-redirect")
    p = packet()
    miss = r.first_miss(p, SIDECAR)
    assert (miss.needs(), miss.has(p, SIDECAR)) == ("oifname lo", "this packet leaves by eth0")
    p = packet(oif="lo", proto="udp", owner=PROXY)
    miss = r.first_miss(p, SIDECAR)
    assert (miss.needs(), miss.has(p, SIDECAR)) == ("meta l4proto tcp", "this packet is UDP")
    miss = rule("ip6 saddr ::6").first_miss(packet(), SIDECAR)
    assert miss.has(packet(), SIDECAR) == "this packet is IPv4"
    miss = rule("meta skuid != 1337").first_miss(packet(owner=None), SIDECAR)
    assert miss.has(packet(owner=None), SIDECAR) == "this packet has no local socket (it was not sent from this pod)"


# --- statements and verdicts --------------------------------------------------------------------

def test_statements_change_the_packet_and_go_on() -> None:
    out = fire("counter meta mark set 1337", packet())
    assert (out.verdict.value, out.packet.mark) == ("continue", 1337)
    assert fire("meta l4proto tcp ct mark 1337 counter meta mark set ct mark", packet(conn=CONN)).packet.mark == 1337
    assert fire("ct mark set mark", packet(mark=7, conn=CONN)).packet.conn.mark == 7
    assert fire("ct mark set meta mark", packet(mark=7)).packet.conn is None  # no connection: nothing to set
    assert fire("ct mark set 9", packet(conn=CONN)).packet.conn.mark == 9
    assert fire("udp dport 53 ct zone set 1", packet(proto="udp")).packet.zone_template == 1
    assert fire("ct zone set 2", packet(zone_template=1)).packet.zone_template == 1  # the first decides
    assert fire("meta nftrace set 1 accept", packet()).verdict.value == "ACCEPT"


def test_meta_mark_set_ct_mark_needs_a_connection() -> None:
    r = rule("meta mark set ct mark")
    assert not r.test(packet(), SIDECAR) and r.test(packet(conn=CONN), SIDECAR)


@pytest.mark.parametrize("text,verdict,chain", [
    ("accept", "ACCEPT", None), ("counter drop", "DROP", None), ("return", "RETURN", None),
    ("jump istio-output", "jump", "istio-output"), ("goto istio-output", "goto", "istio-output"),
    ("reject with tcp reset", "REJECT", None),
])
def test_verdicts(text, verdict, chain) -> None:
    r = rule(text)
    assert r.target.fire(packet(), SIDECAR, "OUTPUT").verdict.value == verdict and r.target.chain == chain
    assert rule("counter continue").target is None  # counts and goes on, as a rule with no verdict


def test_redirect_rewrites_the_destination_and_accepts() -> None:
    out = fire("meta l4proto tcp counter redirect to :15001", packet(conn=CONN))
    assert (out.verdict.value, out.packet.dst, out.packet.dport) == ("ACCEPT", ip("127.0.0.1"), 15001)
    out = fire("redirect", packet(conn=CONN, **V6))
    assert (out.packet.dst, out.packet.dport) == (ip("::1"), 9080)  # no port: the packet's own


def test_tproxy_assigns_a_transparent_socket_or_the_rule_fails() -> None:
    ns = Predictor(nft=profiles.nft_rules("istio-1.27-nft-tproxy")).topology.namespaces["sidecar"]
    r = nft.read(chains.Table("t", "mangle", None), "istio-tproxy", 1, nftset.Rule(
        "meta l4proto tcp ip daddr != 127.0.0.1/32 tproxy ip to :15006 meta mark set 1337 counter accept"))
    inbound = packet(src="10.244.0.20", dst="10.244.0.10", dport=8080, iif="eth0", oif="", owner=None)
    assert r.test(inbound, ns)
    out = r.target.fire(inbound, ns, "PREROUTING")
    assert out.verdict.value == "ACCEPT" and out.packet.mark == 1337 and out.packet.socket.port == 15006
    assert not r.test(inbound, SIDECAR)  # no transparent listener: the rule fails, the chain goes on
    assert r.first_miss(inbound, SIDECAR).has(inbound, SIDECAR) == "no transparent socket takes port 15006 here"
    assert not r.test(packet(src="fd00:10:244::20", dst="fd00:10:244::10", family=6, iif="eth0", owner=None), ns)


# --- what predict refuses -------------------------------------------------------------------------

OUTPUT = "table inet t {\n chain output {\n  type filter hook output priority 0; policy accept;\n  %s\n }\n}\n"


def test_an_unknown_expression_is_refused_when_the_kernel_would_run_it() -> None:
    text = OUTPUT % "meta l4proto tcp fib daddr type local counter drop"
    with pytest.raises(CannotPredict, match=r"^cannot predict: rule 1 of output \(t\) uses fib daddr type local$"):
        path(text, Flow("sidecar", "10.96.0.90", 9080))
    # a UDP packet fails `meta l4proto tcp` first: the kernel never runs fib, nor does predict
    assert path(text, Flow("sidecar", "10.244.0.20", 9080, transport="udp")) == "Local Pod -> OUTPUT -> POSTROUTING -> Remote Pod"


@pytest.mark.parametrize("expression,problem", [
    ("skgid ftp return", r"uses skgid ftp \('ftp' is a name"),
    ("meta mark set 1 mark 1 return", "uses mark 1 \\(a match after a statement that changed the packet\\)"),
    ("meta l4proto tcp redirect to :15001-15002", "a port range lets the kernel pick the port"),
    ("tcp dport < 1024 drop", "the comparison <"),
    ("log prefix \"x\" accept", "uses log prefix \"x\""),
    ("meta skuid 1000-1001 return", r"uses meta skuid 1000-1001 \('1000-1001' is a range of ids, which predict"),
    ("counter name foo accept", r"uses counter name foo$"),
    ("meta mark set mark or 0x1 accept", r"uses meta mark set mark or 0x1$"),
    ("ct mark set ct mark and 0xff return", r"uses ct mark set ct mark and 0xff$"),
])
def test_what_predict_does_not_read_says_so(expression, problem) -> None:
    with pytest.raises(CannotPredict, match=problem):
        matches(expression, packet())


@pytest.mark.parametrize("text,problem", [
    (OUTPUT % "meta l4proto tcp redirect to :15001", "redirect works only under a base chain of type nat"),
    (OUTPUT % "meta l4proto tcp tproxy ip to :15006", "tproxy works only in PREROUTING"),
    ("table ip nat {\n chain OUTPUT {\n  type nat hook output priority -100; policy accept;\n"
     '  meta l4proto tcp counter xt target "REDIRECT"\n }\n}\n', "written by iptables-nft through the xt compat"),
    ("table inet a {\n chain o {\n  type filter hook output priority 0; policy accept;\n  drop\n }\n}\n"
     "table inet b {\n chain o {\n  type filter hook output priority 0; policy accept;\n  accept\n }\n}\n",
     "both hook OUTPUT at priority 0: which runs first"),
    ("table inet a {\n chain o {\n  type filter hook output priority -200; policy drop;\n }\n}\n",
     "conntrack's own"),
    ("table inet a {\n chain o {\n  type filter hook output priority 0;\n  jump x\n }\n chain x {\n  jump y\n }\n"
     " chain y {\n  jump x\n }\n}\n", "chain x jumps back into itself"),
])
def test_rule_sets_the_kernel_refuses_or_that_do_not_say_enough_are_refused(text, problem) -> None:
    with pytest.raises(CannotPredict, match=problem):
        Predictor(nft=nftset.parse(text))


def _chain(spec: str, rule: str = "", family: str = "ip", more: str = "") -> str:
    return f"table {family} t {{\n chain c {{\n  {spec};\n  {rule}\n }}\n{more}}}\n"


# What nft or the kernel refuses (EOPNOTSUPP for the chains and jumps, nft itself the rest),
# and what they load: tests/test_predict_kernel.py has nft load each.
LOAD_ERRORS = [
    (_chain("type nat hook output priority -200"), "chain c of table t: a nat chain must run after conntrack"),
    (_chain("type nat hook prerouting priority -300"), "a nat chain must run after conntrack .priority above -200"),
    (_chain("type nat hook forward priority 0"), "a nat chain hooks prerouting, input, output or postrouting"),
    (_chain("type nat hook forward priority 0", family="inet"), "a nat chain hooks prerouting, input, output or"),
    (_chain("type route hook prerouting priority 0"), "a route chain hooks output alone"),
    (_chain("type route hook input priority 0", family="ip6"), "a route chain hooks output alone"),
    (_chain("type bogus hook output priority 0"), "no chain type bogus .filter, nat or route"),
    (_chain("type filter hook output priority 0", "jump b", more=" chain b {\n  type filter hook input priority 0;\n"
            " }\n"), "rule 1 of c .t.: jump b, a base chain: a base chain is entered from its hook alone"),
    (_chain("type filter hook output priority 0", "goto b", more=" chain b {\n  type filter hook input priority 0;\n"
            " }\n"), "goto b, a base chain"),
    (_chain("type filter hook prerouting priority -150", "meta l4proto tcp tproxy to 127.0.0.1:15006", "inet"),
     "nft refuses rule 1 of c .t.: tproxy to an address in an inet table needs ip or ip6"),
    (_chain("type filter hook prerouting priority -150", "meta l4proto tcp tproxy to [::1]:15006", "inet"),
     "tproxy to an address in an inet table needs ip or ip6"),
    (_chain("type filter hook prerouting priority -150", "meta l4proto tcp tproxy ip6 to [::1]:15006", "ip"),
     "nft refuses rule 1 of c .t.: tproxy ip6 in an ip table"),
    (_chain("type filter hook prerouting priority -150", "meta l4proto tcp tproxy ip to 127.0.0.1:15006", "ip6"),
     "tproxy ip in an ip6 table"),
    (_chain("type filter hook prerouting priority -150", "meta l4proto tcp tproxy ip6 to 127.0.0.1:15006", "inet"),
     "nft refuses rule 1 of c .t.: tproxy ip6 to 127.0.0.1:15006: not an IPv6 address"),
]


@pytest.mark.parametrize("text,problem", LOAD_ERRORS)
def test_what_nft_or_the_kernel_refuses_to_load_is_refused_whatever_the_flow(text, problem) -> None:
    with pytest.raises(CannotPredict, match=problem):
        Predictor(nft=nftset.parse(text))


LOADS = [
    _chain("type nat hook output priority -199"), _chain("type nat hook input priority 100", family="inet"),
    _chain("type route hook output priority 0", family="inet"), _chain("type route hook output priority 0", family="ip6"),
    _chain("type filter hook output priority 0", "jump b", more=" chain b {\n }\n"),
    _chain("type filter hook prerouting priority -150", "meta l4proto tcp tproxy to :15006", "inet"),
    _chain("type filter hook prerouting priority -150", "meta l4proto tcp tproxy ip to 127.0.0.1:15006", "inet"),
    _chain("type filter hook prerouting priority -150", "meta l4proto tcp tproxy to 127.0.0.1:15006", "ip"),
]


@pytest.mark.parametrize("text", LOADS)
def test_what_nft_and_the_kernel_load_is_read(text) -> None:
    Predictor(nft=nftset.parse(text))


def test_two_tables_at_one_priority_are_fine_when_one_has_nothing_to_do() -> None:
    text = ("table inet a {\n chain o {\n  type filter hook output priority 0; policy accept;\n }\n}\n"
            "table inet b {\n chain o {\n  type filter hook output priority 0; policy accept;\n  tcp dport 9080 drop\n"
            " }\n}\n")
    assert path(text, Flow("sidecar", "10.244.0.20", 9080)) == "Local Pod -> OUTPUT -> o (b) -> DROP"


# --- the kernel's order ---------------------------------------------------------------------------

def test_base_chains_run_by_priority_and_say_their_table() -> None:
    text = ("table inet late {\n chain o {\n  type filter hook output priority 10; policy accept;\n"
            "  tcp dport 9080 drop\n }\n}\n"
            "table inet early {\n chain o {\n  type filter hook output priority -10; policy accept;\n"
            "  tcp dport 9080 reject\n }\n}\n")
    assert path(text, Flow("sidecar", "10.244.0.20", 9080)) == "Local Pod -> OUTPUT -> o (early) -> REJECT"
    dropped = "table ip f {\n chain o {\n  type filter hook output priority 0; policy drop;\n }\n}\n"
    assert path(dropped, Flow("sidecar", "10.244.0.20", 9080)) == "Local Pod -> OUTPUT -> o POLICY (f) -> DROP"


def test_nat_chains_stop_at_the_first_translation_and_without_conntrack_nothing_walks_them() -> None:
    text = """table inet a {
 chain first {
  type nat hook output priority -100; policy accept;
  tcp dport 9080 skuid 1000 redirect to :15001
 }
}
table ip b {
 chain second {
  type nat hook output priority -90; policy accept;
  tcp dport { 15001, 8080 } skuid 1000 redirect to :15006
 }
}
"""
    # translated by the first: the second, which would send port 15001 on to 15006, never judges it
    assert path(text, Flow("sidecar", "10.244.0.20", 9080)) == \
        "Local Pod -> OUTPUT -> first -> Envoy 15001 (Outbound) -> OUTPUT -> POSTROUTING -> Remote Pod"
    # passed by the first, translated by the second
    assert path(text, Flow("sidecar", "10.244.0.10", 8080)) == \
        "Local Pod -> OUTPUT -> second -> Envoy 15006 (Inbound) -> OUTPUT -> POSTROUTING -> Local Pod"
    counted = "table inet n {\n chain out {\n  type nat hook output priority -100; policy accept;\n  return\n }\n}\n"
    walk = Predictor(nft=nftset.parse(counted)).predict(Flow("sidecar", "10.244.0.20", 9080)).walk
    assert all(not ps.walks for leg in walk.legs for ps in leg.passes if ps.hook == "OUTPUT")  # no ct: no nat


def test_a_rule_set_as_nft_lists_it_predicts_as_istio_writes_it() -> None:
    """Istio's words and `nft list ruleset`'s (quoted names, `meta skuid`, no implied l4proto,
    hex marks) are the same rules to predict."""
    for name in profiles.names(native_nftables=True):
        written = Predictor(nft=profiles.nft_rules(name))
        listed = Predictor(nft=nftlisting.listed(profiles.nft_rules(name)))
        for flow in (Flow("sidecar", "10.96.0.90", 9080), Flow("remote", "10.244.0.10", 8080),
                     Flow("sidecar", "10.244.0.10", 8080), Flow("sidecar", "10.96.0.10", 53, transport="udp", query="x"),
                     Flow("sidecar", "10.96.0.80", 8080, 1337, 1337)):
            assert str(written.predict(flow).path) == str(listed.predict(flow).path), (name, flow)


def test_a_mixed_pod_runs_the_backend_written_last_first() -> None:
    rules = ruleset.profile(profiles.DEFAULT)
    flow = Flow("sidecar", "10.96.0.90", 9080)
    assert str(Predictor(rules.dumps, written=("legacy", "nft")).predict(flow).path) == (
        "Local Pod -> OUTPUT -> ISTIO_OUTPUT RULE 9 (nft) -> ISTIO_REDIRECT (nft) -> Envoy 15001 (Outbound) -> OUTPUT "
        "-> ISTIO_OUTPUT RULE 4 (nft) -> ISTIO_OUTPUT RULE 4 (legacy) -> POSTROUTING -> Remote Pod")
    assert str(Predictor(rules.dumps, written=("nft", "legacy")).predict(flow).path).startswith(
        "Local Pod -> OUTPUT -> ISTIO_OUTPUT RULE 9 (legacy) -> ISTIO_REDIRECT (legacy) -> Envoy 15001")
    misses = Predictor(rules.dumps, written=("legacy", "nft")).predict(flow).misses()
    assert {m.qualifier for m in misses} == {"nft", "legacy"}


def test_native_misses_are_in_nfts_words() -> None:
    prediction = Predictor.of(ruleset.profile("istio-1.27-nft")).predict(Flow("sidecar", "10.96.0.90", 9080))
    said = [str(m) for m in prediction.misses() if m.leg == 0]
    assert "rule 3: needs oifname lo; this packet leaves by eth0" in said
    assert "rule 4: needs skuid 1337; the socket's owner is uid 1000" in said
    assert {m.qualifier for m in prediction.misses()} == {""}  # istio-proxy-nat plays nat: no table to say


# --- the index --------------------------------------------------------------------------------

FILLER = "\n".join(f"  tcp dport {20000 + n} drop" for n in range(chains.INDEXED + 4))


@pytest.mark.parametrize("first,flow", [
    # TPROXY gave the packet a socket but no owner: the owner rule must be tested (and refuse)
    ("skuid 1337 drop", Flow("remote", "10.244.0.10", 8080)),
    ("meta skuid != 1337 tcp dport 20001 drop", Flow("remote", "10.244.0.10", 8080)),
])
def test_a_long_chain_walks_as_a_short_one(first, flow) -> None:
    """A chain long enough to be indexed gives what the same rules unindexed give: the index
    never skips a rule whose conditions would refuse before failing."""
    native = profiles.nft_rules("istio-1.27-nft-tproxy")
    said = []
    for filler in ("", FILLER):
        text = nftset.text(native) + (f"table inet f {{\n chain in {{\n  type filter hook input priority 0;\n"
                                      f"  {first}\n{filler}\n }}\n}}\n")
        with pytest.raises(CannotPredict) as refused:
            Predictor(nft=nftset.parse(text)).predict(flow)
        said.append(str(refused.value))
    assert said[0] == said[1] and "on a packet TPROXY gave a socket to" in said[0]


def test_a_chain_named_xt_is_a_chain_not_the_xt_compatibility_layer(tmp_path) -> None:
    text = ("table inet t {\n chain o {\n  type filter hook output priority 0; policy accept;\n  jump xt\n }\n"
            " chain xt {\n  tcp dport 9080 drop\n }\n}\n")
    assert path(text, Flow("sidecar", "10.244.0.20", 9080)) == "Local Pod -> OUTPUT -> xt (t) -> DROP"
    nat = profiles.nft_text("istio-1.27-nft") + "table inet x {\n chain xt {\n }\n chain c {\n  jump xt\n }\n}\n"
    (tmp_path / "pod.nft").write_text(nat)
    assert ruleset.from_file(str(tmp_path / "pod.nft")).native
