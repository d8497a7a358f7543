"""What nftrace events are on this kernel, shown with UDP datagrams between two pods.

Each fact lab/nftrace.py states is asserted here: the event each kind of step sends, that
a packet keeps its trace bit over lo and loses it on a veth, what the events carry (the
trace id, the conntrack id, no uid), that many readers may listen in one namespace, and
that a loss is reported, never hidden.
"""

from __future__ import annotations

import socket
import struct

import pytest

from lab import netns, nftrace
from lab.nftrace import NftraceReader
from lab.rules.nft import libnft
from lab.trace import TraceLost

from . import nftpair
from .nftpair import REMOTE_IP

pytestmark = pytest.mark.kernel
PORT = 9999

# A base chain that traces and then walks every kind of step, and a conntrack rule so the
# events carry the conntrack.  Handles are counted by the test from the listing.
STEPS = f"""table inet probe {{
	chain output {{
		type filter hook output priority 0; policy accept;
		udp dport {PORT} meta nftrace set 1
		udp dport {PORT} ct state new counter
		udp dport {PORT} jump sub
		udp dport {PORT} jump sub2
	}}
	chain sub {{
		udp dport 1 return
		meta l4proto udp counter
	}}
	chain sub2 {{
		udp dport {PORT} counter return
	}}
	chain pre {{
		type filter hook prerouting priority 0; policy accept;
		udp dport {PORT} counter
	}}
}}
"""
WITNESS = f"""table inet probe {{
	chain pre {{
		type filter hook prerouting priority 0; policy accept;
		udp dport {PORT} counter
	}}
}}
"""


@pytest.fixture
def pair():
    pair = nftpair.build()
    try:
        libnft.run(pair.sidecar, STEPS, "steps")
        libnft.run(pair.remote, WITNESS, "witness")
        yield pair
    finally:
        nftpair.destroy(pair)


def send(pair, *destinations: str) -> None:
    with netns.entered(pair.sidecar):
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    with sock:
        for destination in destinations:
            sock.sendto(b"x", (destination, PORT))


def handles(ns: str) -> dict[tuple[str, int], int]:
    """(chain, position) -> handle, from the listing."""
    return {(ref.chain, ref.number): rule.handle for ref, rule in libnft.read(ns).numbered() if ref.table == "probe"}


def steps(events) -> list[tuple]:
    return [(e.chain, e.type, e.handle, e.verdict or e.policy, e.target) for e in events]


def test_each_kind_of_step_and_what_the_events_carry(pair) -> None:
    h = handles(pair.sidecar)
    with NftraceReader(pair.sidecar, "sidecar", skip=frozenset()) as reader:
        send(pair, REMOTE_IP)
        events = reader.drain()
    assert steps(events) == [
        ("output", "rule", h["output", 1], "continue", None),  # the rule that set the bit reports itself
        ("output", "rule", h["output", 2], "continue", None),  # a match with no verdict
        ("output", "rule", h["output", 3], "jump", "sub"),
        ("sub", "rule", h["sub", 2], "continue", None),  # sub's rule 1 did not match: no event
        ("sub", "rule", None, "continue", None),  # a regular chain's end: no handle (type `rule` on 6.18)
        ("output", "rule", h["output", 4], "jump", "sub2"),
        ("sub2", "rule", h["sub2", 1], "return", None),  # an explicit return: type `rule`, verdict `return`
        ("output", "rule", None, "continue", None),  # the base chain's end, then its policy
        ("output", "policy", None, "accept", None),
    ]
    first, rest = events[0], events[1:]
    assert (first.src, first.dst, first.proto, first.dport, first.outdev) == ("10.9.0.10", REMOTE_IP, "udp", PORT, "eth0")
    assert {e.trace_id for e in events} == {first.trace_id}  # one walk, one id
    assert all((e.dst, e.dport) == (REMOTE_IP, PORT) for e in rest)  # the walk's packet, carried
    assert first.ct_id and (first.ct_state, first.ct_direction) == ("new", "original")  # priority 0: after conntrack
    assert {e.ct_id for e in events} == {first.ct_id}  # sent with the headers, carried like them


def test_the_trace_bit_survives_lo_and_a_veth_clears_it(pair) -> None:
    with NftraceReader(pair.sidecar, "sidecar") as sidecar, NftraceReader(pair.remote, "remote") as remote:
        send(pair, "127.0.0.1", REMOTE_IP)
        looped = [e for e in sidecar.drain() if e.dst == "127.0.0.1"]
        assert remote.drain() == []
    out = [e for e in looped if e.chain != "pre"]
    back = [e for e in looped if e.chain == "pre"]
    assert back and back[0].indev == "lo" and out[0].outdev == "lo"  # traced again on the way in, with no rule there
    assert back[0].trace_id != out[0].trace_id  # the id hashes skb_iif, which lo's receive sets...
    assert back[0].ct_id == out[0].ct_id is not None  # ...the conntrack id joins the two walks
    witness = [rule for ref, rule in libnft.read(pair.remote).numbered() if ref.table == "probe"]
    assert [r.packets for r in witness] == [1]  # the datagram did reach the remote pod, untraced


def test_events_carry_no_socket_owner(pair) -> None:
    """The attributes the kernel sends, every one of them decoded: none names a uid or gid."""
    known = {value for key, value in vars(nftrace).items() if key.startswith("NFTA_TRACE_")}
    record: list[bytes] = []
    with NftraceReader(pair.sidecar, "sidecar", record=record) as reader:
        send(pair, REMOTE_IP)
        reader.drain()
    seen = set()
    for data in record:
        off = 20
        while off + 4 <= len(data):
            length, atype = struct.unpack_from("=HH", data, off)
            seen.add(atype & nftrace.NLA_TYPE_MASK)
            off += (length + 3) & ~3
    assert record and seen <= known


def test_many_readers_may_listen_in_one_namespace(pair) -> None:
    with NftraceReader(pair.sidecar, "a") as a, NftraceReader(pair.sidecar, "b") as b:
        send(pair, REMOTE_IP)
        assert steps(a.drain()) == steps(b.drain()) != []


def test_a_loss_is_reported_not_hidden(pair) -> None:
    with NftraceReader(pair.sidecar, "sidecar", rcvbuf=64 << 10) as reader:
        send(pair, *[REMOTE_IP] * 200)  # 9 events a datagram, ~1 KiB of buffer each: 1800 > 128 KiB
        with pytest.raises(TraceLost, match="dropped"):
            reader.drain()
        send(pair, REMOTE_IP)
        assert len(reader.drain()) == 9  # after the loss, the next walk reads whole
