"""The nf_tables backend on the real kernel: Istio's rules through iptables-nft and as native
nftables, a real SYN owned by the app (uid 1000) and by the proxy (uid 1337), and the
kernel's trace events naming the rule each took, with the counters agreeing.

The story, read top to bottom as a selftest: two pods on a veth; the rule set in the
sidecar; the lab's `inet ilab-trace` rule traces the app port; a SYN as uid 1000 goes
`ISTIO_OUTPUT 9` (to ISTIO_REDIRECT, REDIRECT to 15001), one as uid 1337 `ISTIO_OUTPUT 4`
(RETURN, out to the remote pod).  Each nat rule the trace names moved its counter by exactly
the events naming it, and no other nat counter moved.
"""

from __future__ import annotations

import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from lab import traffic
from lab.netfilter import RuleRef
from lab.nftrace import NftraceReader
from lab.rules import profiles, xtables
from lab.rules.nft import iptables_nft, libnft, naming, native, tracing
from lab.trace import TraceReader

from . import nftpair
from .nftpair import APP_PORT, REMOTE_IP

pytestmark = pytest.mark.kernel

ISTIO_STYLE = (Path(__file__).parent / "data" / "nft" / "istio-style.nft").read_text()
NATIVE_TABLE = ("inet", "istio-proxy-nat")
APP, PROXY = 1000, 1337


def host_rules() -> tuple[str, str]:
    """What the host's own nf_tables holds (read only): it must not change."""
    return (subprocess.run(["nft", "list", "ruleset"], capture_output=True, text=True, check=True).stdout,
            subprocess.run(["iptables-nft-save"], capture_output=True, text=True, check=True).stdout)


@pytest.fixture
def pair():
    before = host_rules()
    pair = nftpair.build()
    try:
        yield pair
    finally:
        nftpair.destroy(pair)
    assert host_rules() == before


def syn_as(pair, uid: int, reader: NftraceReader, counted: list[tuple[str, str]]):
    """One connection from the sidecar to the remote app as `uid`: the nftrace events of its
    SYN in the lab's words, and how far each counter of the `counted` tables moved."""
    before = libnft.read(pair.sidecar, 4, counted).packet_counts()
    reader.drain(settle=0)
    sock = traffic.connect(pair.sidecar, REMOTE_IP, APP_PORT, uid=uid, gid=uid)
    try:
        port = sock.getsockname()[1]
        events = reader.drain()
    finally:
        sock.close()
    after = libnft.read(pair.sidecar, 4, counted).packet_counts()
    named = naming.trace_events(events, libnft.read(pair.sidecar, 4))
    syn = [e for e in named if e.tcp_flags == "S" and e.sport == port]
    return syn, {ref: after[ref] - before.get(ref, 0) for ref in after if after[ref] != before.get(ref, 0)}


def rules_hit(events, table: str, chain: str) -> list[int]:
    return [e.rulenum for e in events if (e.table, e.chain, e.kind) == (table, chain, "rule")]


def agree(events, moved: dict[RuleRef, int], table: str) -> None:
    """Counters and trace tell one story: each rule's events == its counter's move, in `table`."""
    seen = Counter(RuleRef(e.table, e.chain, e.rulenum) for e in events if e.kind == "rule" and e.table == table)
    assert {ref: n for ref, n in moved.items() if ref.table == table} == dict(seen)


def test_iptables_nft_istio_rules_name_istio_output_9_for_the_app_and_4_for_the_proxy(pair) -> None:
    dump = profiles.dumps("istio-1.13")[0]
    iptables_nft.apply(pair.sidecar, dump)
    tracing.ensure_table(pair.sidecar)
    traced = tracing.add(pair.sidecar, [tracing.Flow("tcp", (APP_PORT,))])
    with NftraceReader(pair.sidecar, "sidecar") as reader:
        app, app_moved = syn_as(pair, APP, reader, [("ip", "nat")])
        proxy, proxy_moved = syn_as(pair, PROXY, reader, [("ip", "nat")])
    tracing.remove(traced)

    assert rules_hit(app, "nat", "ISTIO_OUTPUT") == [9]
    assert rules_hit(app, "nat", "ISTIO_REDIRECT") == [1]
    assert rules_hit(proxy, "nat", "ISTIO_OUTPUT") == [4]
    assert app[0].prefix.startswith("sidecar ip nat OUTPUT rule")  # the only xtables table iptables-nft made
    agree(app, app_moved, "nat")
    agree(proxy, proxy_moved, "nat")
    assert "ISTIO_OUTPUT#9" in {str(r) for r in app_moved} and "ISTIO_OUTPUT#4" in {str(r) for r in proxy_moved}

    listed = iptables_nft.listing(pair.sidecar, "nat")
    assert [r.line for r in listed] == dump.tables["nat"].lines()  # the save round trip
    assert {(r.ref.chain, r.ref.number): r.packets for r in listed}[("ISTIO_OUTPUT", 9)] == 1
    assert nftpair.in_pod(pair.sidecar, "iptables-legacy-save") == ""  # legacy xtables untouched
    assert libnft.text(pair.sidecar, "chain inet ilab-trace output").count("nftrace") == 0  # trace rules gone


def test_native_istio_style_rules_name_istio_output_9_for_the_app_and_4_for_the_proxy(pair) -> None:
    made = native.apply(pair.sidecar, ISTIO_STYLE)
    assert made == [NATIVE_TABLE]
    tracing.ensure_table(pair.sidecar)
    traced = tracing.add(pair.sidecar, [tracing.Flow("tcp", (APP_PORT,))])
    with NftraceReader(pair.sidecar, "sidecar") as reader:
        app, app_moved = syn_as(pair, APP, reader, [NATIVE_TABLE])
        proxy, proxy_moved = syn_as(pair, PROXY, reader, [NATIVE_TABLE])
    tracing.remove(traced)

    table = NATIVE_TABLE[1]
    assert rules_hit(app, table, "istio-output") == [9]
    assert rules_hit(app, table, "istio-redirect") == [1]
    assert rules_hit(proxy, table, "istio-output") == [4]
    agree(app, app_moved, table)
    agree(proxy, proxy_moved, table)
    assert str(RuleRef(table, "istio-output", 4)) in {str(r) for r in proxy_moved}

    listed = {(r.ref.chain, r.ref.number): r for r in native.listing(pair.sidecar, NATIVE_TABLE)}
    assert listed["istio-output", 4].line == "meta skuid 1337 counter return"
    assert listed["istio-output", 4].packets == 1 and listed["istio-output", 9].packets == 1
    assert nftpair.in_pod(pair.sidecar, "iptables-legacy-save") == ""
    assert nftpair.in_pod(pair.sidecar, "iptables-nft-save") == ""  # native only: no xtables table made
    native.delete(pair.sidecar, made)
    tracing.drop_table(pair.sidecar)
    assert libnft.tables(pair.sidecar) == []


def test_a_refused_script_changes_nothing_and_names_the_line(pair) -> None:
    broken = ISTIO_STYLE.replace("counter jump istio-redirect", "counter jump istio-nowhere")
    with pytest.raises(xtables.RuleError) as refused:
        native.apply(pair.sidecar, broken, "istio-style.nft")
    assert str(refused.value) == ("istio-style.nft:37:16-28: Could not process rule: No such file or directory: "
                                  "counter jump istio-nowhere")
    assert libnft.tables(pair.sidecar) == []  # one batch: nothing of it was kept


def test_trace_rules_for_two_flows_come_and_go_by_handle(pair) -> None:
    tracing.ensure_table(pair.sidecar)
    tracing.ensure_table(pair.sidecar)  # idempotent
    first = tracing.add(pair.sidecar, [tracing.Flow("tcp", (9080, 15001))])
    second = tracing.add(pair.sidecar, [tracing.Flow("udp", (53,), ip_version=6)])
    assert len(first.handles) == len(second.handles) == 4
    tracing.remove(first)
    left = libnft.text(pair.sidecar, "table inet ilab-trace")
    assert "udp" in left and "9080" not in left and left.count("meta nftrace set 1") == 4
    tracing.remove(second)
    tracing.drop_table(pair.sidecar)
    assert libnft.tables(pair.sidecar) == []


@pytest.mark.parametrize("first", ["legacy", "nft"])
def test_mixed_backends_the_nat_table_written_last_captures_the_syn(pair, first: str) -> None:
    """Istio's rules in legacy xtables and again through iptables-nft, in one pod (the rules
    written twice that istio/istio#61019 reports).  Both nat tables hook output at -100; at
    equal priority the kernel runs the hook registered last first, and the nat core stops
    at the first table that sets up a NAT binding.  So the app's SYN is captured by the
    table written last and never reaches the other (no event, no counter), while the
    proxy's SYN, which neither redirects, is returned by both.  One nftrace rule feeds both
    readers: legacy's TRACE logging fires on skb->nf_trace, whoever set it."""
    dump = profiles.dumps("istio-1.13")[0]
    writers = {"legacy": xtables.apply, "nft": iptables_nft.apply}
    for backend in sorted(writers, key=lambda b: b != first):
        writers[backend](pair.sidecar, dump)
    tracing.ensure_table(pair.sidecar)
    traced = tracing.add(pair.sidecar, [tracing.Flow("tcp", (APP_PORT,))])
    with TraceReader(pair.sidecar, "sidecar") as legacy, NftraceReader(pair.sidecar, "sidecar") as reader:
        seen = {}
        for uid in (APP, PROXY):
            legacy.drain(settle=0)
            legacy_before = xtables.packet_counts(pair.sidecar, "nat")
            syn, moved = syn_as(pair, uid, reader, [("ip", "nat")])
            legacy_syn = [e for e in legacy.drain() if e.tcp_flags == "S" and e.dport == APP_PORT]
            legacy_after = xtables.packet_counts(pair.sidecar, "nat")
            legacy_moved = {str(k): n - legacy_before[k] for k, n in legacy_after.items() if n != legacy_before[k]}
            seen[uid] = {"nft": (rules_hit(syn, "nat", "ISTIO_OUTPUT"), {str(r): n for r, n in moved.items()}),
                         "legacy": (rules_hit(legacy_syn, "nat", "ISTIO_OUTPUT"), legacy_moved)}
            assert all(e.uid == uid for e in legacy_syn) and all(e.uid is None for e in syn)  # who owns it: legacy only
    tracing.remove(traced)

    captor, other = ("nft", "legacy") if first == "legacy" else ("legacy", "nft")
    assert seen[APP][captor] == ([9], {"OUTPUT#1": 1, "ISTIO_OUTPUT#9": 1, "ISTIO_REDIRECT#1": 1})
    assert seen[APP][other] == ([], {})
    for backend in (captor, other):
        assert seen[PROXY][backend] == ([4], {"OUTPUT#1": 1, "ISTIO_OUTPUT#4": 1})


XTABLES_AFTER_A_LISTING = """
import sys
from lab import netns
from lab.rules import profiles, xtables
from lab.rules.nft import iptables_nft, libnft
with libnft.scratch():
    iptables_nft.apply(None, profiles.dumps("istio-1.25-ipv6")[1])  # ip6 nat: REDIRECT through xt
    libnft.read(None, 6, words=sys.argv[1] == "words")
with netns.scratch():
    try:
        xtables.apply(None, profiles.load("istio-1.13"))  # IPv4 REDIRECT through python-iptables
    except xtables.RuleError as e:
        print(e)
"""


@pytest.mark.parametrize("how", ["json", "words"])
def test_a_listing_of_iptables_nft_rules_leaves_python_iptables_its_extensions(how) -> None:
    """libnftables prints an xt rule by asking libxtables to translate it, and libxtables keeps
    what it loads registered for that IP family, for the process: after a text listing of an
    ip6 table python-iptables finds no REDIRECT for IPv4.  So the lab lists by JSON, which
    translates nothing, and reads text only of tables without xt rules (native ones)."""
    done = subprocess.run([sys.executable, "-c", XTABLES_AFTER_A_LISTING, how], capture_output=True, text=True,
                          cwd=Path(__file__).resolve().parents[1], timeout=60)
    assert done.returncode == 0, done.stderr
    if how == "json":
        assert done.stdout == ""
    else:
        assert "can't find target REDIRECT" in done.stdout
