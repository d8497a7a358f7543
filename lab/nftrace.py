"""Per-namespace nftrace reader: nf_tables' own account of which rules a packet hit.

`meta nftrace set 1` sets skb->nf_trace (the bit legacy's TRACE target sets); from then
on every nf_tables base chain the packet walks reports to the multicast group
NFNLGRP_NFTRACE of NETLINK_NETFILTER *in the packet's namespace*, one NFT_MSG_TRACE
per step, which is what `nft monitor trace` prints.  A socket made inside the pod's
namespace and joined to that group reads that pod's events only, with no global state;
unlike nfnetlink_log, any number of readers may listen in one namespace.

What this kernel (6.18) sends, measured (tests/test_nftrace_kernel.py shows each):
  - a matching rule: type `rule`, its handle, its verdict (`continue` for a rule with no
    verdict, `jump`/`goto` with the target chain, `return`, `accept`, `drop`); an explicit
    `return` rule comes as type `rule` with verdict `return`, not as type `return`;
  - the end of a chain with no verdict: type `rule` (older kernels said `return`) with
    verdict `continue` and *no handle*; a base chain's is followed by type `policy`;
  - a rule that does not match sends nothing;
  - headers (network and transport, up to 40 and 20 bytes) and devices only on the first
    event of each base chain's walk: later events of that walk share its trace id;
  - the trace id (a hash of the skb's address, its flow hash and skb_iif) changes when
    the packet is looped through lo (skb_iif changes), and the conntrack id (NFTA_TRACE_CT_*,
    new in 6.x, sent with the headers) does not: it joins a connection's walks across hooks;
  - the mark when it is non-zero; never the socket's uid or gid (legacy's nfnetlink_log
    reports them; here a rule on `meta skuid` must witness the owner);
  - nf_trace survives a loop through lo (the looped packet's PREROUTING and INPUT walks are
    traced) and is cleared by a veth (skb_scrub_packet): each pod traces its own inbound
    packets with its own rule, as under legacy TRACE;
  - no sequence number: a loss shows only as ENOBUFS on the socket, reported as TraceLost.

Decoded with `struct`, as lab/trace.py decodes nfnetlink_log: pyroute2 0.9 names
NFT_MSG_TRACE and NFNLGRP_NFTRACE but has no message class for it, and a flat table
of twenty attributes reads more plainly than a class tree would.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import socket
import struct
from collections import OrderedDict
from dataclasses import dataclass
from typing import Mapping

from pyroute2.netlink import NETLINK_NETFILTER

from . import netns
from .trace import (RCVBUF, SO_RCVBUFFORCE, EventSocket, IfNames, TraceError, TraceLost, link_name,
                    parse_packet, split_messages)

# linux/netfilter/nfnetlink.h, linux/netfilter/nf_tables.h
NFNL_SUBSYS_NFTABLES = 10
NFT_MSG_TRACE = 17
MESSAGE_TYPE = NFNL_SUBSYS_NFTABLES << 8 | NFT_MSG_TRACE
NFNLGRP_NFTRACE = 9
SOL_NETLINK = 270
NETLINK_ADD_MEMBERSHIP = 1

NFTA_TRACE_TABLE = 1
NFTA_TRACE_CHAIN = 2
NFTA_TRACE_RULE_HANDLE = 3
NFTA_TRACE_TYPE = 4
NFTA_TRACE_VERDICT = 5
NFTA_TRACE_ID = 6
NFTA_TRACE_LL_HEADER = 7
NFTA_TRACE_NETWORK_HEADER = 8
NFTA_TRACE_TRANSPORT_HEADER = 9
NFTA_TRACE_IIF = 10
NFTA_TRACE_IIFTYPE = 11
NFTA_TRACE_OIF = 12
NFTA_TRACE_OIFTYPE = 13
NFTA_TRACE_MARK = 14
NFTA_TRACE_NFPROTO = 15
NFTA_TRACE_POLICY = 16
NFTA_TRACE_CT_ID = 18
NFTA_TRACE_CT_DIRECTION = 19
NFTA_TRACE_CT_STATUS = 20
NFTA_TRACE_CT_STATE = 21
NFTA_VERDICT_CODE = 1
NFTA_VERDICT_CHAIN = 2

TYPES = {1: "policy", 2: "return", 3: "rule"}
# Netfilter verdicts (low byte; the rest may carry a queue number or an errno) and
# nf_tables' own, which are negative.
VERDICTS = {0: "drop", 1: "accept", 2: "stolen", 3: "queue", 4: "repeat", 5: "stop",
            -1: "continue", -2: "break", -3: "jump", -4: "goto", -5: "return"}
# The table's family (nfgenmsg.nfgen_family) and the packet's (NFTA_TRACE_NFPROTO).
FAMILIES = {1: "inet", 2: "ip", 3: "arp", 5: "netdev", 7: "bridge", 10: "ip6"}
IP_VERSIONS = {2: 4, 10: 6}
# NFT_CT_STATE_*_BIT: 1 << (ctinfo % IP_CT_IS_REPLY + 1), invalid and untracked apart
CT_STATES = {1: "invalid", 2: "established", 4: "related", 8: "new", 64: "untracked"}
CT_DIRECTIONS = {0: "original", 1: "reply"}

NLA_TYPE_MASK = 0x3FFF
WALKS_KEPT = 4096  # trace ids whose packet is remembered for the header-less events after it

# The lab's own table of `meta nftrace set 1` rules: the reader drops its events.
TRACE_TABLE = ("inet", "ilab-trace")


@dataclass(frozen=True, slots=True)
class NftTraceEvent:
    """One step of one traced packet through one nf_tables chain, in one pod.

    `type` and `verdict` are the kernel's words; `handle` names the rule (None at a
    chain's end and for a policy).  The packet fields (src ... tcp_flags, the devices and
    the conntrack) come from the first event of the same base chain's walk, which alone
    carries them; they are None when that event was not read (ct_* also when the packet
    has no conntrack yet: before priority -200, or in a namespace without conntrack).  tcp_flags follows lab.trace's convention ("S",
    "SA", ...; None when not TCP).
    """

    pod: str
    trace_id: int
    family: str  # the table's: "ip", "ip6", "inet", ...
    table: str
    chain: str
    type: str  # "rule" | "return" | "policy"
    handle: int | None
    verdict: str | None  # "continue", "jump", "return", "accept", "drop", ... (None for a policy)
    target: str | None  # the chain of a jump or goto
    policy: str | None  # "accept" | "drop" for a policy event
    ip_version: int | None  # the packet's: 4 or 6
    indev: str | None
    outdev: str | None
    mark: int | None
    src: str | None
    dst: str | None
    proto: str | int | None
    sport: int | None
    dport: int | None
    tcp_flags: str | None
    ct_id: int | None
    ct_state: str | None  # "new", "established", "related", "invalid", "untracked"
    ct_direction: str | None  # "original" | "reply"

    @property
    def table_id(self) -> tuple[str, str]:
        return self.family, self.table

    def __str__(self) -> str:
        step = f"{self.type} handle {self.handle}" if self.handle is not None else self.type
        said = self.policy if self.type == "policy" else self.verdict
        if self.target:
            said = f"{said} {self.target}"
        parts = [f"{self.pod} {self.family} {self.table} {self.chain} {step} {said} id {self.trace_id:08x}"]
        if self.src is not None:
            src, dst = self.src, self.dst
            if self.sport is not None:
                src, dst = f"{src}.{self.sport}", f"{dst}.{self.dport}"
            parts.append(f"{src} > {dst} {self.tcp_flags or self.proto}")
        return " ".join(parts)


def _attrs(data: bytes, off: int, end: int) -> dict[int, bytes]:
    """The attributes between off and end, by type (the first of each type wins)."""
    attrs = {}
    while off + 4 <= end:
        length, atype = struct.unpack_from("=HH", data, off)
        if length < 4:
            break
        attrs.setdefault(atype & NLA_TYPE_MASK, data[off + 4:off + length])
        off += (length + 3) & ~3
    return attrs


def _int(attrs: Mapping[int, bytes], atype: int, fmt: str = ">I") -> int | None:
    value = attrs.get(atype)
    return struct.unpack_from(fmt, value)[0] if value is not None else None


def _name(attrs: Mapping[int, bytes], atype: int) -> str | None:
    value = attrs.get(atype)
    return value.split(b"\0", 1)[0].decode(errors="replace") if value is not None else None


def _verdict(nested: bytes | None) -> tuple[str | None, str | None]:
    if nested is None:
        return None, None
    attrs = _attrs(nested, 0, len(nested))
    code = _int(attrs, NFTA_VERDICT_CODE, ">i")
    if code is None:
        return None, None
    return VERDICTS.get(code if code < 0 else code & 0xFF, str(code)), _name(attrs, NFTA_VERDICT_CHAIN)


def _packet(network: bytes | None, transport: bytes | None) -> tuple:
    """(src, dst, proto, sport, dport, tcp_flags) from the two header copies nf_tables sends.

    The kernel copies the network header up to the transport header's offset (at most 40
    bytes) and then the transport header (at most 20), so the two put back together are
    the packet's start, unless IPv4 options made the header longer than 40 bytes: then
    only the addresses are known.
    """
    if not network:
        return (None,) * 6
    if network[0] >> 4 == 4 and len(network) >= 20 and (network[0] & 0x0F) * 4 > len(network):
        src, dst, proto, *_ = parse_packet(network[:20])
        return src, dst, proto, None, None, None
    return parse_packet(network + (transport or b""))


def parse_message(data: bytes, pod: str, ifnames: Mapping[int, str] | None = None) -> NftTraceEvent:
    """One NFT_MSG_TRACE netlink message (headers included) -> NftTraceEvent.

    The packet fields are those of this message only: see carry_packets() for the
    events that come without headers.
    """
    attrs = _attrs(data, 20, len(data))
    kind = _int(attrs, NFTA_TRACE_TYPE)
    verdict, target = _verdict(attrs.get(NFTA_TRACE_VERDICT))
    policy = _int(attrs, NFTA_TRACE_POLICY)
    handle = attrs.get(NFTA_TRACE_RULE_HANDLE)
    src, dst, proto, sport, dport, flags = _packet(attrs.get(NFTA_TRACE_NETWORK_HEADER),
                                                   attrs.get(NFTA_TRACE_TRANSPORT_HEADER))
    ifnames = {} if ifnames is None else ifnames  # an empty IfNames fills itself on a miss
    ct_state = _int(attrs, NFTA_TRACE_CT_STATE)
    ct_direction = _int(attrs, NFTA_TRACE_CT_DIRECTION, "B")
    return NftTraceEvent(
        pod=pod, trace_id=_int(attrs, NFTA_TRACE_ID) or 0, family=FAMILIES.get(data[16], str(data[16])),
        table=_name(attrs, NFTA_TRACE_TABLE) or "", chain=_name(attrs, NFTA_TRACE_CHAIN) or "",
        type=TYPES.get(kind, str(kind)), handle=struct.unpack(">Q", handle)[0] if handle else None,
        verdict=verdict, target=target,
        policy=VERDICTS.get(policy) if policy is not None else None,
        ip_version=IP_VERSIONS.get(_int(attrs, NFTA_TRACE_NFPROTO)),
        indev=link_name(ifnames, _int(attrs, NFTA_TRACE_IIF)),
        outdev=link_name(ifnames, _int(attrs, NFTA_TRACE_OIF)),
        mark=_int(attrs, NFTA_TRACE_MARK),
        src=src, dst=dst, proto=proto, sport=sport, dport=dport, tcp_flags=flags,
        ct_id=_int(attrs, NFTA_TRACE_CT_ID),
        ct_state=CT_STATES.get(ct_state, str(ct_state)) if ct_state is not None else None,
        ct_direction=CT_DIRECTIONS.get(ct_direction) if ct_direction is not None else None,
    )


_PACKET_FIELDS = ("src", "dst", "proto", "sport", "dport", "tcp_flags", "indev", "outdev",
                  "ct_id", "ct_state", "ct_direction")


def carry_packets(events: list[NftTraceEvent], walks: OrderedDict | None = None) -> list[NftTraceEvent]:
    """Give each header-less event the packet of the last event with headers and the same
    trace id: the first step of each base chain's walk carries them for the steps after it.

    `walks` (trace id -> that event) keeps what was learnt across calls; it holds the
    newest WALKS_KEPT ids.
    """
    walks = OrderedDict() if walks is None else walks
    out = []
    for event in events:
        if event.src is not None:
            walks[event.trace_id] = event
            walks.move_to_end(event.trace_id)
            while len(walks) > WALKS_KEPT:
                walks.popitem(last=False)
        elif (first := walks.get(event.trace_id)) is not None:
            event = dataclasses.replace(event, **{f: getattr(first, f) for f in _PACKET_FIELDS})
        out.append(event)
    return out


class NftraceReader(EventSocket):
    """Read the nftrace events of one namespace.

    The socket is made inside the pod's namespace (it stays tied to it) and joins
    NFNLGRP_NFTRACE; events queue in its buffer until drain() reads them.  Events of
    the tables in `skip` (the lab's own `inet ilab-trace`, whose rules set the trace bit)
    are dropped.  The kernel sends nothing unless someone listens, and sends from every
    base chain of the namespace, so a reader costs nothing while no packet is traced.
    """

    def __init__(self, ns: str | None, pod: str | None = None, *, rcvbuf: int = RCVBUF,
                 skip: frozenset[tuple[str, str]] = frozenset({TRACE_TABLE}), record: list[bytes] | None = None):
        self.ns = ns
        self.pod = pod or ns or "?"
        self.skip = skip
        self.record = record  # if a list, every trace message's raw bytes are appended
        self.ifnames = IfNames(ns)
        self._walks: OrderedDict[int, NftTraceEvent] = OrderedDict()
        with netns.entered(ns) if ns else contextlib.nullcontext():  # None: preflight's scratch namespace
            self.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, NETLINK_NETFILTER)
        try:
            self.sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, rcvbuf)
            self.sock.bind((0, 0))
            self.sock.setsockopt(SOL_NETLINK, NETLINK_ADD_MEMBERSHIP, NFNLGRP_NFTRACE)
            self.sock.setblocking(False)
        except OSError as e:
            self.sock.close()
            raise TraceError(f"{self.ns}: cannot join nf_tables' trace group: {e.strerror}") from None

    def _read_queued(self) -> list[NftTraceEvent]:
        """Everything queued right now, without blocking."""
        events = []
        while True:
            try:
                buf = self.sock.recv(65536)
            except BlockingIOError:
                return carry_packets(events, self._walks)
            except OSError as e:
                if e.errno != errno.ENOBUFS:
                    raise
                self._discard()
                raise TraceLost(f"{self.ns}: socket buffer overrun, nftrace events were dropped") from None
            for mtype, data in split_messages(buf):
                if mtype != MESSAGE_TYPE:
                    continue
                if self.record is not None:
                    self.record.append(data)
                event = parse_message(data, self.pod, self.ifnames)
                if event.table_id not in self.skip:
                    events.append(event)

    def _discard(self) -> None:
        """After a loss, drop what is queued: the walks it belonged to are incomplete."""
        self._walks.clear()
        self._empty()
