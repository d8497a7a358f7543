"""predict's reading of rules: each match and target as the kernel runs it, negations included,
and a clear "cannot predict" for what it does not model.  No root, no kernel."""

from __future__ import annotations

import pytest
from hypothesis import given, settings, strategies as st

from lab.predict import CannotPredict, Flow, Predictor
from lab.predict import chains, inet, iptables
from lab.predict.packet import Connection, Owner, Packet
from lab.rules import profiles, save
from lab.rules.save import RuleLine

SIDECAR = Predictor(profiles.dumps("istio-1.13")).topology.namespaces["sidecar"]
APP, PROXY = Owner(1000, 1000), Owner(1337, 1337)


def ip(text: str) -> int:
    return inet.parse(text)[1]


def packet(dst="10.96.0.90", dport=9080, src="10.244.0.10", sport=40000, proto="tcp", oif="eth0", iif="",
           owner=APP, mark=0, conn=None, family=4) -> Packet:
    return Packet(family, proto, ip(src), sport, ip(dst), dport, iif, oif, mark, owner, conn=conn)


def rule(spec: str, table: str = "nat", chain: str = "ISTIO_OUTPUT", family: int = 4) -> chains.Rule:
    import shlex

    return iptables.read(chains.Table(table, table, family), 3, RuleLine(chain, tuple(shlex.split(spec))),
                         {"ISTIO_REDIRECT", chain})


def matches(spec: str, p: Packet, **kw) -> bool:
    return rule(spec, **kw).test(p, SIDECAR)


def dump(text: str, family: int = 4) -> save.Dump:
    return save.parse(text, family=family)


def path(rules_text: str, flow: Flow) -> str:
    return str(Predictor([dump(rules_text)]).predict(flow).path)


# --- the IP header part -----------------------------------------------------------------------

@pytest.mark.parametrize("spec,p,expected", [
    ("-s 127.0.0.6/32", packet(src="127.0.0.6"), True),
    ("-s 127.0.0.6/32", packet(), False),
    ("! -d 127.0.0.1/32", packet(dst="127.0.0.1"), False),
    ("! -d 127.0.0.1/32", packet(), True),
    ("-d 10.96.0.0/16", packet(), True),
    ("-d 10.96.0.0/255.255.0.0", packet(), True),
    ("-d 10.96.1.0/24", packet(), False),
    ("-o lo", packet(oif="lo"), True),
    ("-o lo", packet(), False),
    ("! -o lo", packet(), True),
    ("-o eth+", packet(), True),
    ("-i lo", packet(), False),  # a locally generated packet has no input interface
    ("! -i lo", packet(), True),
    ("-p tcp", packet(proto="udp"), False),
    ("! -p tcp", packet(proto="udp"), True),
    ("-p all", packet(proto="udp"), True),
    ("-p 17", packet(proto="udp"), True),
    ("-f", packet(), False),  # a first packet is never a later fragment
    ("! -f", packet(), True),
])
def test_ip_header_conditions(spec, p, expected) -> None:
    assert matches(spec, p) is expected


def test_ipv6_addresses() -> None:
    p = packet(src="::6", dst="fd00:10:244::10", oif="lo", family=6)
    assert matches("-s ::6/128 -o lo", p, family=6)
    assert not matches("! -d fd00:10:244::/64", p, family=6)


@pytest.mark.parametrize("spec,needs,has", [
    ("-s 127.0.0.6/32", "-s 127.0.0.6/32", "the source is 10.244.0.10"),
    ("! -s 10.244.0.10/32", "! -s 10.244.0.10/32", "the source is 10.244.0.10"),
    ("-d 127.0.0.1/32", "-d 127.0.0.1/32", "the destination is 10.96.0.90"),
    ("! -d 10.96.0.0/16", "! -d 10.96.0.0/16", "the destination is 10.96.0.90"),
])
def test_an_address_says_what_it_needs_and_what_the_packet_has(spec, needs, has) -> None:
    p = packet()
    condition = rule(spec).first_miss(p, SIDECAR)
    assert (condition.needs(), condition.has(p, SIDECAR)) == (needs, has)


# --- ports ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("spec,expected", [
    ("-p tcp -m tcp --dport 9080", True),
    ("-p tcp --dport 9080", True),  # iptables loads the tcp match itself after -p tcp
    ("-p tcp --destination-port 9080", True),
    ("-p tcp -m tcp ! --dport 9080", False),
    ("-p tcp -m tcp --dport ! 9080", False),  # the old place for "!"
    ("-p tcp -m tcp --dport 9000:9999", True),
    ("-p tcp -m tcp --dport :9079", False),
    ("-p udp -m udp --dport 9080", False),  # -p fails before the udp match is asked
    ("-p tcp -m multiport --dports 53,9080", True),
    ("-p tcp -m multiport ! --dports 53,15008", True),
    ("-p tcp -m multiport ! --dports 53,9080", False),
    ("-p tcp -m multiport --ports 40000", True),  # either port
    ("-p tcp -m tcp --sport 40000", True),
    ("-p tcp -m tcp --syn", True),
    ("-p tcp -m tcp --tcp-flags SYN,ACK SYN", True),
    ("-p tcp -m tcp --tcp-flags SYN,ACK ACK", False),
    ("-p tcp -m tcp ! --syn", False),
])
def test_port_and_flag_conditions(spec, expected) -> None:
    assert matches(spec, packet()) is expected


def test_an_ephemeral_source_port_is_known_only_when_the_range_decides() -> None:
    p = packet(sport=None)
    assert matches("-p tcp -m tcp --sport 1024:65535", p)
    assert not matches("-p udp -m udp --sport 15053", packet(proto="udp", sport=None))
    with pytest.raises(CannotPredict, match="ephemeral source port"):
        matches("-p tcp -m tcp --sport 40000:50000", p)


# --- owner, mark, connmark, conntrack ----------------------------------------------------------------

@pytest.mark.parametrize("spec,owner,expected", [
    ("-m owner --uid-owner 1337", PROXY, True),
    ("-m owner --uid-owner 1337", APP, False),
    ("-m owner ! --uid-owner 1337", APP, True),
    ("-m owner --uid-owner 1000-1999", APP, True),
    ("-m owner --gid-owner 1337", Owner(0, 1337), True),
    ("-m owner --uid-owner 1337 --gid-owner 1337", Owner(1337, 1000), False),
    ("-m owner --gid-owner 1337 --suppl-groups", Owner(0, 0, (1337,)), True),
    ("-m owner --gid-owner 1337", Owner(0, 0, (1337,)), False),
    # no socket (a packet from elsewhere): xt_owner matches only if every option is negated
    ("-m owner --uid-owner 1337", None, False),
    ("-m owner ! --uid-owner 1337", None, True),
    ("-m owner ! --uid-owner 1337 --gid-owner 1", None, False),
    ("-m owner --socket-exists", None, False),
    ("-m owner ! --socket-exists", APP, False),
])
def test_owner(spec, owner, expected) -> None:
    assert matches(spec, packet(owner=owner)) is expected


def test_uid_zero_is_not_the_proxy() -> None:
    """TPROXY mode runs Envoy as uid 0 (gid 1337): the uid rules let it through, the gid ones catch it."""
    p = packet(owner=Owner(0, 1337))
    assert not matches("-m owner --uid-owner 1337", p) and matches("-m owner --gid-owner 1337", p)


@pytest.mark.parametrize("spec,mark,conn_mark,expected", [
    ("-m mark --mark 0x539", 0x539, 0, True),
    ("-m mark --mark 0x539", 0x53a, 0, False),
    ("-m mark ! --mark 0x53a", 0, 0, True),
    ("-m mark --mark 0x500/0xf00", 0x539, 0, True),
    ("-m connmark --mark 0x539", 0, 0x539, True),
    ("-m connmark ! --mark 0x539", 0, 0x539, False),
])
def test_marks(spec, mark, conn_mark, expected) -> None:
    conn = Connection(0, ip("10.96.0.90"), 9080, mark=conn_mark)
    assert matches(spec, packet(mark=mark, conn=conn), table="mangle", chain="OUTPUT") is expected


def test_connmark_without_a_connection_never_matches_negated_or_not() -> None:
    assert not matches("-m connmark --mark 0x0", packet(), table="mangle", chain="OUTPUT")
    assert not matches("-m connmark ! --mark 0x1", packet(), table="mangle", chain="OUTPUT")


@pytest.mark.parametrize("spec,dst_nat,expected", [
    ("-m conntrack --ctstate NEW", False, True),
    ("-m conntrack --ctstate RELATED,ESTABLISHED", False, False),
    ("-m conntrack ! --ctstate RELATED,ESTABLISHED", False, True),
    ("-m state --state NEW", False, True),
    ("-m conntrack --ctstate DNAT", True, True),
    ("-m conntrack --ctstate DNAT", False, False),
])
def test_conntrack_state_of_a_first_packet(spec, dst_nat, expected) -> None:
    conn = Connection(0, ip("10.96.0.90"), 9080, dst_nat=dst_nat)
    assert matches(spec, packet(conn=conn), table="mangle", chain="OUTPUT") is expected


# --- addrtype, socket ---------------------------------------------------------------------------

@pytest.mark.parametrize("spec,dst,expected", [
    ("-m addrtype --dst-type LOCAL", "10.244.0.10", True),
    ("-m addrtype --dst-type LOCAL", "127.0.0.6", True),  # all of 127/8 is local
    ("-m addrtype --dst-type LOCAL", "10.96.0.90", False),
    ("-m addrtype ! --dst-type LOCAL", "10.96.0.90", True),
    ("-m addrtype --dst-type UNICAST", "10.96.0.90", True),
    ("-m addrtype --dst-type BROADCAST", "10.244.0.255", True),
    ("-m addrtype --dst-type MULTICAST", "224.0.0.1", True),
    # leaving by lo: the pod IP's local route is on eth0, so on lo it is not LOCAL (inet_dev_addr_type)
    ("-m addrtype --dst-type LOCAL --limit-iface-out", "10.244.0.10", False),
])
def test_addrtype(spec, dst, expected) -> None:
    oif = "lo" if "limit" in spec else "eth0"
    assert matches(spec, packet(dst=dst, oif=oif)) is expected


@pytest.mark.parametrize("spec,dst,dport,expected", [
    ("-m socket", "10.244.0.10", 8080, False),  # the app listens on 0.0.0.0: ignored without --nowildcard
    ("-m socket --nowildcard", "10.244.0.10", 8080, True),
    ("-m socket --nowildcard", "10.244.0.10", 9999, False),
    ("-m socket --transparent --nowildcard", "10.244.0.10", 8080, False),  # REDIRECT mode: not transparent
    ("-m socket", "127.0.0.1", 15000, True),  # Envoy's admin binds 127.0.0.1 itself
])
def test_socket(spec, dst, dport, expected) -> None:
    p = packet(src="10.244.0.20", dst=dst, dport=dport, iif="eth0", oif="", owner=None)
    assert matches(spec, p, table="mangle", chain="PREROUTING") is expected


# --- reasons -----------------------------------------------------------------------------------

def test_a_rule_says_why_a_packet_passed_it() -> None:
    r = rule("-o lo -m owner ! --uid-owner 1337 -j RETURN")
    miss = r.first_miss(packet(), SIDECAR)
    assert (miss.needs(), miss.has(packet(), SIDECAR)) == ("-o lo", "this packet leaves by eth0")
    miss = rule("-o lo -m owner ! --uid-owner 1337 -j RETURN").first_miss(packet(oif="lo", owner=PROXY), SIDECAR)
    assert (miss.needs(), miss.has(packet(owner=PROXY), SIDECAR)) == ("! --uid-owner 1337",
                                                                      "the socket's owner is uid 1337")


def test_the_misses_of_a_flow_are_the_rules_it_passed_in_order() -> None:
    prediction = Predictor(profiles.dumps("istio-1.13")).predict(Flow("sidecar", "10.96.0.90", 9080))
    first = [str(m) for m in prediction.misses() if m.leg == 0]
    assert first[:3] == ["rule 1: needs -s 127.0.0.6/32; the source is 10.244.0.10",
                         "rule 2: needs -o lo; this packet leaves by eth0",
                         "rule 3: needs -o lo; this packet leaves by eth0"]
    assert [m.rule.number for m in prediction.misses() if m.leg == 0] == [1, 2, 3, 4, 5, 6, 7, 8]


# --- what predict refuses ---------------------------------------------------------------------------

def test_an_unknown_match_is_refused_when_the_kernel_would_run_it() -> None:
    rules_text = """*filter
:OUTPUT ACCEPT [0:0]
-A OUTPUT -p tcp -m statistic --mode random --probability 0.5 -j DROP
COMMIT
"""
    with pytest.raises(CannotPredict, match=r"^cannot predict: rule 1 of OUTPUT \(filter\) uses -m statistic$"):
        path(rules_text, Flow("sidecar", "10.96.0.90", 9080))
    # a UDP packet fails -p tcp first: the kernel never asks the statistic match, nor does predict
    assert path(rules_text, Flow("sidecar", "10.244.0.50", 53, transport="udp")) == \
        "Local Pod -> OUTPUT -> POSTROUTING -> kube-dns"


def test_an_unknown_option_of_a_known_match_and_an_unknown_target_are_refused() -> None:
    with pytest.raises(CannotPredict, match="rule 1 of OUTPUT uses -m conntrack --ctorigdst"):
        path("*nat\n:OUTPUT ACCEPT [0:0]\n-A OUTPUT -m conntrack --ctorigdst 10.0.0.1 -j DROP\nCOMMIT\n",
             Flow("sidecar", "10.96.0.90", 9080))
    with pytest.raises(CannotPredict, match=r"rule 1 of OUTPUT \(mangle\) uses -j QUEUE"):
        path("*mangle\n:OUTPUT ACCEPT [0:0]\n-A OUTPUT -j QUEUE\nCOMMIT\n", Flow("sidecar", "10.96.0.90", 9080))


def test_nat_is_walked_only_where_some_rule_tracks_connections() -> None:
    """An empty nat table, or one with no NAT target, is walked by nothing: conntrack is on in a
    namespace only while a rule needs it (a NAT or CT target, a conntrack match)."""
    counted = "*nat\n:OUTPUT ACCEPT [0:0]\n-A OUTPUT -p tcp -j RETURN\nCOMMIT\n"
    assert path(counted, Flow("sidecar", "10.244.0.20", 9080)) == "Local Pod -> OUTPUT -> POSTROUTING -> Remote Pod"
    tracked = counted.replace("COMMIT", "-A OUTPUT -p udp -j REDIRECT --to-ports 1\nCOMMIT")
    assert path(tracked, Flow("sidecar", "10.244.0.20", 9080)) == \
        "Local Pod -> OUTPUT -> OUTPUT RULE 1 -> POSTROUTING -> Remote Pod"
    # with nothing tracked, Envoy's listener has no original destination to read
    assert path(counted, Flow("sidecar", "10.244.0.10", 15001)) == \
        "Local Pod -> OUTPUT -> Envoy 15001 (Outbound) -> no original destination, closed"


@pytest.mark.parametrize("rules_text,problem", [
    ("*nat\n:PREROUTING ACCEPT [0:0]\n:X - [0:0]\n-A PREROUTING -j X\n-A X -m owner --uid-owner 1 -j RETURN\nCOMMIT\n",
     "-m owner works only in OUTPUT and POSTROUTING, and X is reached from PREROUTING"),
    ("*mangle\n:OUTPUT ACCEPT [0:0]\n-A OUTPUT -p tcp -j TPROXY --on-port 15006\nCOMMIT\n",
     "-j TPROXY works only in PREROUTING"),
    ("*mangle\n:OUTPUT ACCEPT [0:0]\n-A OUTPUT -j REDIRECT --to-ports 1\nCOMMIT\n", "works only in the nat table"),
    ("*nat\n:OUTPUT ACCEPT [0:0]\n:A - [0:0]\n:B - [0:0]\n-A OUTPUT -j A\n-A A -j B\n-A B -j A\nCOMMIT\n",
     "chain A jumps back into itself"),
])
def test_rule_sets_the_kernel_refuses_are_refused(rules_text, problem) -> None:
    with pytest.raises(CannotPredict, match=problem):
        Predictor([dump(rules_text)])


# --- targets and the walk ---------------------------------------------------------------------------

BASE = """*nat
:PREROUTING ACCEPT [0:0]
:INPUT ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:POSTROUTING ACCEPT [0:0]
:A - [0:0]
:B - [0:0]
:ISTIO_REDIRECT - [0:0]
-A ISTIO_REDIRECT -p tcp -j REDIRECT --to-ports 15001
"""


def test_drop_and_reject_end_the_path_at_their_rule() -> None:
    flow = Flow("sidecar", "10.96.0.90", 9080)
    assert path(BASE + "-A OUTPUT -p udp -j ACCEPT\n-A OUTPUT -p tcp --dport 9080 -j DROP\nCOMMIT\n", flow) == \
        "Local Pod -> OUTPUT -> OUTPUT RULE 2 -> DROP"
    # a chain of one rule prints no number, as the measured path writes it (built-in chains too)
    assert path(BASE + "-A OUTPUT -p tcp --dport 9080 -j DROP\nCOMMIT\n", flow) == "Local Pod -> OUTPUT -> OUTPUT -> DROP"
    filtered = "*filter\n:OUTPUT DROP [0:0]\nCOMMIT\n"
    assert str(Predictor([dump(filtered)]).predict(flow).path) == "Local Pod -> OUTPUT -> OUTPUT POLICY (filter) -> DROP"
    rejected = "*filter\n:OUTPUT ACCEPT [0:0]\n-A OUTPUT -d 10.96.0.90 -j REJECT\nCOMMIT\n"
    assert str(Predictor([dump(rejected)]).predict(flow).path) == "Local Pod -> OUTPUT -> OUTPUT (filter) -> REJECT"


def test_goto_returns_past_its_caller() -> None:
    """A RETURN in a chain reached by -g goes back to the chain that called the goto's chain:
    here to OUTPUT's policy, so rule 2 of OUTPUT is never reached."""
    flow = Flow("sidecar", "10.96.0.90", 9080)
    text = BASE + "-A OUTPUT -g A\n-A OUTPUT -j ISTIO_REDIRECT\n-A A -j RETURN\nCOMMIT\n"
    assert path(text, flow) == "Local Pod -> OUTPUT -> A -> POSTROUTING -> KUBE-SEP-REMOTE RULE 2 (node) -> Remote Pod"
    jumped = text.replace("-A OUTPUT -g A", "-A OUTPUT -j A")
    assert path(jumped, flow).startswith("Local Pod -> OUTPUT -> A -> ISTIO_REDIRECT -> Envoy 15001 (Outbound)")


def test_a_tables_chains_keep_the_dumps_order() -> None:
    """Built-in chains first, then the dump's own as declared: the order check() meets problems in."""
    text = ("*nat\n:PREROUTING ACCEPT [0:0]\n:INPUT ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n:POSTROUTING ACCEPT [0:0]\n"
            ":ZED - [0:0]\n:ALPHA - [0:0]\n:MIDDLE - [0:0]\n-A OUTPUT -j ZED\nCOMMIT\n")
    (table,) = iptables.tables(dump(text))
    assert list(table.chains) == ["PREROUTING", "INPUT", "OUTPUT", "POSTROUTING", "ZED", "ALPHA", "MIDDLE"]


def test_redirect_reads_to_port_as_to_ports() -> None:
    """iptables takes --to-port for --to-ports; predict's reader turns one into the other."""
    for spec in ("-p tcp -j REDIRECT --to-port 15001", "-p tcp -j REDIRECT --to-ports 15001"):
        target = rule(spec, chain="ISTIO_REDIRECT").target
        assert (target.name, target.port) == ("REDIRECT", 15001)


def test_redirect_to_a_port_nobody_listens_on_is_refused() -> None:
    text = BASE.replace("15001", "15999") + "-A OUTPUT -p tcp -j ISTIO_REDIRECT\nCOMMIT\n"
    assert path(text, Flow("sidecar", "10.96.0.90", 9080)) == \
        "Local Pod -> OUTPUT -> ISTIO_REDIRECT -> 15999: no listener, refused"


def test_a_flow_sent_back_into_envoy_is_a_loop() -> None:
    text = "\n".join(line for line in profiles.text("istio-1.13").splitlines()
                     if not line.endswith(("--uid-owner 1337 -j RETURN", "--gid-owner 1337 -j RETURN"))
                     or "!" in line)
    assert path(text + "\n", Flow("sidecar", "10.96.0.90", 9080)) == (
        "Local Pod -> OUTPUT -> ISTIO_OUTPUT RULE 7 -> ISTIO_REDIRECT -> Envoy 15001 (Outbound) -> "
        "OUTPUT -> ISTIO_OUTPUT RULE 7 -> ISTIO_REDIRECT -> Envoy 15001 (loop)")


def test_envoy_closes_a_connection_to_its_own_port() -> None:
    assert str(Predictor(profiles.dumps("istio-1.13")).predict(Flow("sidecar", "10.244.0.20", 15001)).path) == \
        "Local Pod -> OUTPUT -> ISTIO_OUTPUT RULE 9 -> ISTIO_REDIRECT -> Envoy 15001 (Outbound) -> blackhole, closed"


def test_the_first_ct_rule_decides_the_zone() -> None:
    """CT leaves alone a packet that already has a template: both rules match (both are hops), the
    first one's zone is the connection's."""
    text = ("*raw\n:OUTPUT ACCEPT [0:0]\n:Z - [0:0]\n-A OUTPUT -j Z\n-A Z -p udp -j CT --zone 1\n"
            "-A Z -p udp -j CT --zone 2\nCOMMIT\n")
    prediction = Predictor([dump(text)]).predict(Flow("sidecar", "10.244.0.50", 53, transport="udp"))
    assert str(prediction.path) == "Local Pod -> OUTPUT -> Z RULE 1 (raw) -> Z RULE 2 (raw) -> POSTROUTING -> kube-dns"
    sidecar = next(ps for ps in prediction.walk.legs[0].passes if ps.hook == "POSTROUTING")
    assert sidecar.packet.conn.zone == 1
    assert prediction.walk.legs[0].end.packet.conn is None  # kube-dns has no rule that tracks connections


def test_tproxy_without_a_transparent_listener_drops() -> None:
    text = ("*mangle\n:PREROUTING ACCEPT [0:0]\n-A PREROUTING -p tcp -j TPROXY --on-port 8080 --on-ip 0.0.0.0 "
            "--tproxy-mark 0x539/0xffffffff\nCOMMIT\n")
    assert path(text, Flow("remote", "10.244.0.10", 9999)) == \
        "Remote Pod -> PREROUTING -> PREROUTING (mangle) -> 8080: no transparent listener, dropped"


def test_mangle_output_routes_again_after_a_mark() -> None:
    """A mark the fwmark rule routes locally turns -o eth0 into -o lo for nat OUTPUT."""
    text = ("*mangle\n:PREROUTING ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n"
            "-A OUTPUT -p tcp -j MARK --set-xmark 0x539/0xffffffff\n"
            "-A PREROUTING -p tcp -j TPROXY --on-port 15006 --on-ip 0.0.0.0 --tproxy-mark 0x539/0xffffffff\nCOMMIT\n"
            "*nat\n:OUTPUT ACCEPT [0:0]\n-A OUTPUT -o lo -j REDIRECT --to-ports 9\nCOMMIT\n")
    walk = Predictor([dump(text)]).predict(Flow("sidecar", "10.244.0.20", 9080)).walk
    nat = next(t for ps in walk.legs[0].passes if ps.hook == "OUTPUT" for t in ps.walks if t.table.name == "nat")
    assert nat.steps[0].rule.ref.number == 1 and nat.packet.oif == "lo"


RULE_PARTS = st.lists(st.sampled_from([
    "-d 10.96.0.0/16", "-d 10.96.0.90/32", "! -d 10.96.0.0/16", "-d 10.244.0.0/24", "-s 10.244.0.10/32",
    "-s 127.0.0.6/32", "-o lo", "-p tcp", "-p udp", "-p tcp -m tcp --dport 9080", "-p tcp -m tcp --dport 9000:9100",
    "-p tcp -m multiport --dports 53,9080,15008", "-p tcp -m tcp ! --dport 9080", "-m owner --uid-owner 1337",
    "-m owner ! --uid-owner 1337", "-m owner --gid-owner 1000", "-m mark --mark 0x539", "-m mark --mark 0x53a",
    "-m mark ! --mark 0x539", "-m mark --mark 0x500/0xf00", "-p tcp -m tcp --sport 30000:40000 --dport 9050"]), max_size=3)


@settings(max_examples=60, deadline=None, database=None)
@given(chain=st.lists(RULE_PARTS, min_size=chains.INDEXED + 1, max_size=60),
       dst=st.sampled_from(["10.96.0.90", "10.96.0.80", "10.244.0.20", "127.0.0.1"]),
       dport=st.sampled_from([9080, 9050, 53, 15008, 8080]), proto=st.sampled_from(["tcp", "udp"]),
       owner=st.sampled_from([APP, PROXY, None]), oif=st.sampled_from(["eth0", "lo"]),
       mark=st.sampled_from([0, 0x539, 0x53a]), sport=st.sampled_from([40000, None]))
def test_the_index_offers_every_rule_that_matches_in_order(chain, dst, dport, proto, owner, oif, mark, sport) -> None:
    """Whatever the rules, the first candidate the index offers that matches is the first rule
    that matches, and every rule that matches, or that predict would refuse, is a candidate."""
    lines = "\n".join(f"-A X {' '.join(parts)} -j RETURN" for parts in chain)
    (nat,) = iptables.tables(dump(f"*nat\n:OUTPUT ACCEPT [0:0]\n:X - [0:0]\n{lines}\nCOMMIT\n"))
    indexed = nat.chains["X"]
    p = packet(dst=dst, dport=dport, proto=proto, owner=owner, oif=oif, mark=mark, sport=sport)
    matching = [i for i, r in enumerate(indexed.rules) if _refuses(r, p) or r.test(p, SIDECAR)]
    assert set(matching) <= set(indexed.candidates(p))
    assert list(indexed.candidates(p)) == sorted(indexed.candidates(p))


def _refuses(r: chains.Rule, p: Packet) -> bool:
    try:
        r.test(p, SIDECAR)
    except CannotPredict:
        return True
    return False


def test_the_index_never_skips_a_rule_predict_would_refuse() -> None:
    """`--sport` over part of the ephemeral range refuses a packet whose source port the kernel
    picks: so does a long chain, which must not skip the rule for its `--dport`."""
    for filler in (0, chains.INDEXED):
        lines = ["-A OUTPUT -p tcp -m tcp --sport 30000:40000 --dport 9050 -j DROP"] + [
            f"-A OUTPUT -d 10.1.{n}.0/24 -j DROP" for n in range(filler)]
        with pytest.raises(CannotPredict, match="depends on the ephemeral source port"):
            path("*filter\n:OUTPUT ACCEPT [0:0]\n" + "\n".join(lines) + "\nCOMMIT\n",
                 Flow("sidecar", "10.244.0.20", 9080))


def test_an_indexed_chain_walks_as_the_plain_one() -> None:
    """10,000 excluded CIDRs: the index must find the same first match as rule-by-rule."""
    cidrs = [f"10.{i // 250}.{i % 250}.0/24" for i in range(10_000)]
    lines = [f"-A ISTIO_OUTPUT -d {c} -j RETURN" for c in cidrs] + ["-A ISTIO_OUTPUT -p tcp --dport 9080 -j RETURN",
                                                                     "-A ISTIO_OUTPUT -j ISTIO_REDIRECT"]
    text = BASE + ":ISTIO_OUTPUT - [0:0]\n-A OUTPUT -j ISTIO_OUTPUT\n" + "\n".join(lines) + "\nCOMMIT\n"
    (nat,) = iptables.tables(dump(text))
    chain = nat.chains["ISTIO_OUTPUT"]
    assert chain.index is not None
    for dst, dport in (("10.7.13.9", 80), ("10.39.249.1", 80), ("10.96.0.90", 9080), ("10.96.0.90", 80),
                       ("192.168.0.1", 80)):
        p = packet(dst=dst, dport=dport)
        plain = next(i for i, r in enumerate(chain.rules) if r.test(p, SIDECAR))
        assert list(chain.candidates(p))[0] == plain
