"""The nft rule set model: reading scripts and listings, writing scripts, what nft prints back."""

import subprocess
from pathlib import Path

import pytest

from lab import netns
from lab.netfilter import RuleRef
from lab.rules import nftlisting, nftset
from lab.rules.nftset import BaseChain, Rule

from . import istio_record

DATA = Path(__file__).resolve().parent / "data" / "nft"
EVERY_GOLDEN = [f"{v}/{name}" for v in istio_record.nftables_versions() for name in istio_record.nftables_names()]


def _golden(name: str) -> nftset.RuleSet:
    """`1.27/tproxy`: the rule set Istio expects, as the lab records it."""
    version, option_set = name.split("/")
    return istio_record.nftables(version, option_set)


def _chain(rules: nftset.RuleSet, table: str, chain: str) -> list[str]:
    return [r.text for r in rules.table(table).chains[chain].rules]


# ------------------------------------------------------------------ reading
@pytest.mark.parametrize("name", EVERY_GOLDEN)
def test_every_recorded_rule_set_reads(name):
    rules = _golden(name)
    assert ("inet", "istio-proxy-nat") in rules.tables
    assert _chain(rules, "istio-proxy-nat", "istio-inbound")[0].startswith("meta l4proto tcp tcp dport 15008")


@pytest.mark.parametrize("name", istio_record.nftables_names())
def test_130_is_127_with_a_counter_in_every_rule(name):
    """The one change between Istio's two sets of goldens (1.28 made it)."""
    newer, older = _golden(f"1.30/{name}"), _golden(f"1.27/{name}")
    assert all(rule.counter for _, rule in newer.numbered())
    assert not any(rule.counter for _, rule in older.numbered())
    assert newer.uncounted() == older
    assert older.counted() == newer  # the lab's counters go where Istio's went


# istio-nftables' transaction for TPROXY's mangle istio-inbound: four rules appended, then its
# guards inserted at indexes 0, 1 (IPv4's), 1 (IPv6's) and 2, in the order Run() makes them.
TPROXY_INBOUND = """add table inet istio-proxy-mangle
add chain inet istio-proxy-mangle istio-divert
add chain inet istio-proxy-mangle istio-tproxy
add chain inet istio-proxy-mangle istio-inbound
add rule inet istio-proxy-mangle istio-inbound meta l4proto tcp ct state related,established jump istio-divert
add rule inet istio-proxy-mangle istio-inbound meta l4proto tcp jump istio-tproxy
insert rule inet istio-proxy-mangle istio-inbound index 0 meta l4proto tcp mark 1337 return
insert rule inet istio-proxy-mangle istio-inbound index 1 iifname lo meta l4proto tcp ip saddr 127.0.0.6/32 return
insert rule inet istio-proxy-mangle istio-inbound index 1 iifname lo meta l4proto tcp ip6 saddr ::6/128 return
insert rule inet istio-proxy-mangle istio-inbound index 2 iifname lo meta l4proto tcp mark != 1338 return
"""


def test_a_script_is_read_by_doing_what_nft_does():
    """`add ... index N` goes after the rule at N, `insert ... index N` before it (from 0): read
    so, istio-nftables' inserts leave mangle istio-inbound in the order the kernel put it in
    (the record of Istio's tproxy golden, which the kernel test below applies)."""
    rules = nftset.parse(TPROXY_INBOUND)
    assert _chain(rules, "istio-proxy-mangle", "istio-inbound") == _chain(
        _golden("1.27/tproxy"), "istio-proxy-mangle", "istio-inbound") == [
        "meta l4proto tcp mark 1337 return",
        "iifname lo meta l4proto tcp ip6 saddr ::6/128 return",  # inserted at 1 after the IPv4 one
        "iifname lo meta l4proto tcp mark != 1338 return",
        "iifname lo meta l4proto tcp ip saddr 127.0.0.6/32 return",
        "meta l4proto tcp ct state related,established jump istio-divert",
        "meta l4proto tcp jump istio-tproxy",
    ]
    recorded = _golden("1.27/tproxy")
    assert recorded.table("istio-proxy-nat").chains["output"].base == BaseChain("nat", "output", -100)
    assert recorded.table("istio-proxy-mangle").chains["output"].base == BaseChain("route", "output", -150)
    assert recorded.table("istio-proxy-raw").chains["istio-inbound"].base is None


def test_add_and_insert_at_an_index():
    rules = nftset.parse("add table inet t\nadd chain inet t c\n"
                         + "".join(f"add rule inet t c tcp dport {p} return\n" for p in (1, 2, 3))
                         + "add rule inet t c index 0 tcp dport 10 return\n"
                         + "insert rule inet t c index 0 tcp dport 20 return\n"
                         + "insert rule inet t c index 3 tcp dport 30 return\n"
                         + "insert rule inet t c tcp dport 40 return\n")
    ports = [r.words[2] for r in rules.table("t").chains["c"].rules]
    assert ports == ["40", "20", "1", "10", "30", "2", "3"]  # what nft 1.0.6 made of it


def test_a_listing_reads_with_handles_and_without_counter_state():
    rules = nftset.parse((DATA / "tproxy.listed").read_text())
    nat = rules.table("istio-proxy-nat")
    assert nat.chains["prerouting"].base == BaseChain("nat", "prerouting", -100)  # `priority dstnat`
    assert rules.table("istio-proxy-raw").chains["output"].base == BaseChain("filter", "output", -300)  # `raw`
    assert nat.chains["output"].rules == [Rule('oifname "not-istio-nic" counter return'),
                                          Rule("counter jump istio-output")]
    assert rules.handles()["inet", "istio-proxy-nat", 13] == RuleRef("istio-proxy-nat", "output", 2)
    assert rules.rule(RuleRef("istio-proxy-nat", "istio-output", 3)).text == (
        'oifname "lo" ip daddr != 127.0.0.1 tcp dport != { 53, 15008 } meta skuid 1337 counter jump istio-in-redirect')


def test_a_listings_counters_say_how_many_packets_each_rule_took():
    listing = ("table inet t {\n chain c {\n  tcp dport 80 counter packets 3 bytes 180 accept # handle 4\n"
               "  counter packets 0 bytes 0 return # handle 5\n  drop # handle 6\n }\n}\n")
    rules = nftset.parse(listing)
    assert rules.packet_counts() == {RuleRef("t", "c", 1): 3, RuleRef("t", "c", 2): 0}
    assert rules.handles() == {("inet", "t", 4): RuleRef("t", "c", 1), ("inet", "t", 5): RuleRef("t", "c", 2),
                               ("inet", "t", 6): RuleRef("t", "c", 3)}
    assert rules.rule(RuleRef("t", "c", 1)).bytes == 180


def test_the_listing_is_what_nft_prints_for_the_golden():
    """nftlisting.listed() against the kernel's own words for one recorded rule set (the
    kernel test below checks every one, and every profile)."""
    listed = nftset.parse((DATA / "tproxy.listed").read_text())
    assert nftlisting.listed(_golden("1.30/tproxy")) == listed


def test_nested_blocks_may_jump_forward_and_commands_may_not():
    nested = "table inet t {\n chain a {\n  type filter hook output priority filter; policy drop;\n  jump b\n }\n" \
             " chain b { return }\n}\n"
    rules = nftset.parse(nested)
    assert rules.table("t").chains["a"].base == BaseChain("filter", "output", 0, "drop")
    assert _chain(rules, "t", "b") == ["return"]
    with pytest.raises(nftset.NftFormatError, match=r"^<nft>:3: jump to chain b, which table inet t does not have yet"):
        nftset.parse("add table inet t\nadd chain inet t a\nadd rule inet t a jump b\nadd chain inet t b\n")


def test_sets_counters_and_priorities_are_read_in_any_spelling():
    rules = nftset.parse("table ip t {\n chain c {\n  type nat hook postrouting priority srcnat - 5;\n"
                         "  tcp dport {53,15008} counter packets 7 bytes 420 accept;  udp dport 53 drop\n }\n}\n")
    chain = rules.table("t", "ip").chains["c"]
    assert chain.base == BaseChain("nat", "postrouting", 95)
    assert [r.text for r in chain.rules] == ["tcp dport { 53, 15008 } counter accept", "udp dport 53 drop"]


@pytest.mark.parametrize("text, line, problem", [
    ("list ruleset\n", 1, "expected a table block or a command"),
    ("add rule inet t c return\n", 1, "no table inet t"),
    ("add table inet t\nadd rule inet t c return\n", 2, "no chain c in table inet t"),
    ("add table inet t\nadd chain inet t c\ninsert rule inet t c index 0 return\n", 3,
     "index 0: chain c has 0 rules"),
    ("add table inet t\nadd chain inet t c\nadd rule inet t c position 4 return\n", 3, "needs a rule handle"),
    ("add table inet t\ndelete rule inet t c handle 4\n", 2, "needs a rule handle"),
    ("add table inet t\nadd set inet t s { type ipv4_addr; }\n", 2, "'set' is not something the lab models"),
    ("table inet t {\n  set s { type ipv4_addr; }\n}\n", 2, "expected a chain or }"),
    ("add table inet t\nadd chain inet t c { type nat hook output priority urgent; }\n", 2,
     "priority 'urgent' is not a number"),
    ("add table inet t\nadd chain inet t c { type nat hook output priority 0; policy maybe; }\n", 2,
     "policy 'maybe' is not accept or drop"),
    ("add table inet t\nadd chain inet t c\nadd rule inet t c iifname \"eth0 return\n", 3, "a quoted string never ends"),
    ("add table inet t\nadd chain inet t c\nadd rule inet t c tcp dport { 53, 80 return\n", 3, "never closes"),
    ("table inet t {\n chain c {\n  return\n", 3, "chain c never closes"),
    ("table inet t {\n", 1, "table inet t never closes"),
    ("add table inet t\ncreate table inet t\n", 2, "exists already"),
])
def test_bad_input_is_one_line_naming_the_line(text, line, problem):
    with pytest.raises(nftset.NftFormatError) as e:
        nftset.parse(text, "pod.nft")
    message = str(e.value)
    assert message.startswith(f"pod.nft:{line}: ") and problem in message and "\n" not in message, message


# ------------------------------------------------------------------ writing
def test_the_lab_counts_what_a_rule_matched():
    """Its counter goes after the matches, before the first statement, as an iptables counter
    counts (after a tproxy, which may end the rule, before the verdict); a rule that has one
    (Istio 1.28 on) keeps it where it is."""
    cases = {
        "meta l4proto tcp tcp dport 15008 return": "meta l4proto tcp tcp dport 15008 counter return",
        "meta mark set 1337": "counter meta mark set 1337",
        "meta l4proto tcp mark 1337 ct mark set mark": "meta l4proto tcp mark 1337 counter ct mark set mark",
        "udp dport 53 meta skuid 1337 ct zone set 1": "udp dport 53 meta skuid 1337 counter ct zone set 1",
        "meta l4proto tcp ip daddr != 127.0.0.1/32 tproxy ip to :15006 meta mark set 1337 accept":
            "meta l4proto tcp ip daddr != 127.0.0.1/32 tproxy ip to :15006 meta mark set 1337 counter accept",
        "jump istio-output": "counter jump istio-output",
        "tproxy ip to :15006 meta mark set 1337 counter accept": "tproxy ip to :15006 meta mark set 1337 counter accept",
    }
    assert {text: Rule(text).counted().text for text in cases} == cases


@pytest.mark.parametrize("name", EVERY_GOLDEN)
def test_a_written_script_reads_back_the_same(name):
    rules = _golden(name)
    assert nftset.parse(nftset.script(rules, counters=False)) == rules
    assert nftset.parse(nftset.script(rules)) == rules.counted()
    assert all(rule.counter for _, rule in nftset.parse(nftset.script(rules)).numbered())


def test_a_script_replaces_each_table_whole():
    script = nftset.script(_golden("1.27/empty"), header=("empty",))
    assert script.splitlines()[:6] == [
        "# empty",
        "add table inet istio-proxy-nat",
        "delete table inet istio-proxy-nat",
        "add table inet istio-proxy-nat",
        "add chain inet istio-proxy-nat output { type nat hook output priority -100; policy accept; }",
        "add chain inet istio-proxy-nat istio-inbound",
    ]
    before = nftset.parse("add table inet istio-proxy-nat\nadd chain inet istio-proxy-nat stale\n")
    assert nftset.parse("add table inet istio-proxy-nat\nadd chain inet istio-proxy-nat stale\n" + script) \
        == _golden("1.27/empty").counted() != before


# ------------------------------------------------------------------ what nft prints
@pytest.mark.parametrize("written, listed", nftlisting.NORMALISED)
def test_what_nft_prints_back(written, listed):
    assert nftlisting.listed_rule(written) == listed
    assert nftlisting.listed_rule(listed) == listed  # what nft printed, it prints again


def _nft_in_scratch(*runs: tuple[str, str]) -> str:
    """Run `nft ARGS` (with stdin) one after another in a fresh network namespace that vanishes
    afterwards; the last one's output."""
    host = netns.inode("/proc/thread-self/ns/net")
    with netns.scratch():
        assert netns.inode("/proc/thread-self/ns/net") != host  # never the host's rules
        for args, stdin in runs:
            done = subprocess.run(["nft", *args.split()], input=stdin, capture_output=True, text=True)
            assert done.returncode == 0, done.stderr
    return done.stdout


@pytest.mark.kernel
def test_nft_prints_back_what_nftlisting_says():
    script = "add table inet t\nadd chain inet t c\n" + "".join(
        f"add rule inet t c {written}\n" for written, _ in nftlisting.NORMALISED)
    listed = nftset.parse(_nft_in_scratch(("-f -", script), ("list ruleset", "")))
    assert [r.text for r in listed.table("t").chains["c"].rules] == [text for _, text in nftlisting.NORMALISED]


@pytest.mark.kernel
@pytest.mark.parametrize("name", [n for n in EVERY_GOLDEN if "owner-groups" not in n])  # names groups this host lacks
def test_the_kernel_takes_every_recorded_rule_set(name):
    """Each recorded rule set written as the lab writes it (one nft -f transaction): what the
    kernel lists is the record, in the words nftlisting.py predicts."""
    rules = _golden(name)
    kernel = nftset.parse(_nft_in_scratch(("-f -", nftset.script(rules, counters=False)), ("-a list ruleset", "")))
    assert kernel == nftlisting.listed(rules)
    assert nftset.parse(nftset.text(rules)) == rules  # the record's own form reads back
