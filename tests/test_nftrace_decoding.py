"""The nftrace decoder on NFT_MSG_TRACE messages built here, byte by byte (no root, no kernel).

Each message is laid out as nf_tables_trace.c lays it out: nlmsghdr, nfgenmsg (the
table's family), then big-endian attributes; the verdict is nested; the headers come only
on a walk's first step.
"""

import socket
import struct

from lab import nftrace
from lab.nftrace import NftTraceEvent, carry_packets, parse_message


def nla(atype: int, payload: bytes) -> bytes:
    return struct.pack("=HH", 4 + len(payload), atype) + payload + bytes(-len(payload) % 4)


def be32(value: int) -> bytes:
    return struct.pack(">I", value & 0xFFFFFFFF)


def message(family: int, *attrs: bytes) -> bytes:
    body = struct.pack("=BBH", family, 0, 0) + b"".join(attrs)
    return struct.pack("=IHHII", 16 + len(body), nftrace.MESSAGE_TYPE, 0, 0, 0) + body


def verdict(code: int, chain: str | None = None) -> bytes:
    inner = nla(nftrace.NFTA_VERDICT_CODE, struct.pack(">i", code))
    if chain:
        inner += nla(nftrace.NFTA_VERDICT_CHAIN, chain.encode() + b"\0")
    return nla(nftrace.NFTA_TRACE_VERDICT | 0x8000, inner)  # NLA_F_NESTED, as the kernel sets it


def ipv4(src: str, dst: str, proto: int = 6, options: bytes = b"") -> bytes:
    ihl = (20 + len(options)) // 4
    return (struct.pack("!BBHHHBBH4s4s", 0x40 | ihl, 0, 60, 1, 0x4000, 64, proto, 0,
                        socket.inet_aton(src), socket.inet_aton(dst)) + options)[:40]  # the kernel copies 40 at most


def tcp(sport: int, dport: int, flags: int) -> bytes:
    return struct.pack("!HHIIBBHHH", sport, dport, 1, 0, 0xA0, flags, 64240, 0, 0)


def step(family=2, table="nat", chain="ISTIO_OUTPUT", kind=3, trace_id=0xA53AE437, extra=()) -> bytes:
    return message(family, nla(nftrace.NFTA_TRACE_NFPROTO, be32(2)), nla(nftrace.NFTA_TRACE_TYPE, be32(kind)),
                   nla(nftrace.NFTA_TRACE_ID, be32(trace_id)), nla(nftrace.NFTA_TRACE_CHAIN, chain.encode() + b"\0"),
                   nla(nftrace.NFTA_TRACE_TABLE, table.encode() + b"\0"), *extra)


def test_a_rule_with_a_jump_and_the_walks_headers() -> None:
    data = step(extra=(nla(nftrace.NFTA_TRACE_RULE_HANDLE, struct.pack(">Q", 25)), verdict(-3, "ISTIO_REDIRECT"),
                       nla(nftrace.NFTA_TRACE_OIF, be32(2)), nla(nftrace.NFTA_TRACE_OIFTYPE, b"\x00\x01"),
                       nla(nftrace.NFTA_TRACE_NETWORK_HEADER, ipv4("10.9.0.10", "10.9.0.20")),
                       nla(nftrace.NFTA_TRACE_TRANSPORT_HEADER, tcp(43488, 9080, 0x02)),
                       nla(nftrace.NFTA_TRACE_CT_ID, be32(0x1580ED11)), nla(nftrace.NFTA_TRACE_CT_DIRECTION, b"\x00"),
                       nla(nftrace.NFTA_TRACE_CT_STATUS, be32(0x188)), nla(nftrace.NFTA_TRACE_CT_STATE, be32(8))))
    event = parse_message(data, "sidecar", {2: "eth0"})
    assert event == NftTraceEvent(
        pod="sidecar", trace_id=0xA53AE437, family="ip", table="nat", chain="ISTIO_OUTPUT", type="rule", handle=25,
        verdict="jump", target="ISTIO_REDIRECT", policy=None, ip_version=4, indev=None, outdev="eth0", mark=None,
        src="10.9.0.10", dst="10.9.0.20", proto="tcp", sport=43488, dport=9080, tcp_flags="S",
        ct_id=0x1580ED11, ct_state="new", ct_direction="original")
    assert str(event) == ("sidecar ip nat ISTIO_OUTPUT rule handle 25 jump ISTIO_REDIRECT id a53ae437 "
                          "10.9.0.10.43488 > 10.9.0.20.9080 S")


def test_a_chains_end_has_no_handle_and_a_policy_names_the_policy() -> None:
    end = parse_message(step(chain="OUTPUT", extra=(verdict(-1),)), "p")
    assert (end.type, end.handle, end.verdict, end.src) == ("rule", None, "continue", None)
    policy = parse_message(step(chain="OUTPUT", kind=1, extra=(nla(nftrace.NFTA_TRACE_POLICY, be32(1)),)), "p")
    assert (policy.type, policy.handle, policy.verdict, policy.policy) == ("policy", None, None, "accept")


def test_verdict_codes_keep_their_low_byte_and_the_mark_is_read() -> None:
    drop_with_errno = 1 << 8 | 0  # NF_DROP_ERR(-EPERM) as nft_do_chain may return it
    event = parse_message(step(extra=(nla(nftrace.NFTA_TRACE_RULE_HANDLE, struct.pack(">Q", 3)), verdict(drop_with_errno),
                                      nla(nftrace.NFTA_TRACE_MARK, be32(0x539)))), "p")
    assert (event.verdict, event.mark) == ("drop", 1337)
    assert parse_message(step(extra=(verdict(-5),)), "p").verdict == "return"


def test_an_inet_table_and_an_ipv6_packet() -> None:
    src, dst = "fd00:10:244::10", "fd00:10:244::20"
    network = struct.pack("!IHBB16s16s", 6 << 28, 20, 17, 64, socket.inet_pton(socket.AF_INET6, src),
                          socket.inet_pton(socket.AF_INET6, dst))
    data = message(1, nla(nftrace.NFTA_TRACE_NFPROTO, be32(10)), nla(nftrace.NFTA_TRACE_TYPE, be32(3)),
                   nla(nftrace.NFTA_TRACE_ID, be32(7)), nla(nftrace.NFTA_TRACE_CHAIN, b"istio-output\0"),
                   nla(nftrace.NFTA_TRACE_TABLE, b"istio-proxy-nat\0"), nla(nftrace.NFTA_TRACE_IIF, be32(9)),
                   nla(nftrace.NFTA_TRACE_NETWORK_HEADER, network),
                   nla(nftrace.NFTA_TRACE_TRANSPORT_HEADER, struct.pack("!HHHH", 40000, 53, 20, 0)))
    event = parse_message(data, "p", {})
    assert (event.family, event.table_id, event.ip_version) == ("inet", ("inet", "istio-proxy-nat"), 6)
    assert (event.src, event.dst, event.proto, event.sport, event.dport, event.tcp_flags) == (src, dst, "udp", 40000, 53, None)
    assert event.indev == "if9"  # an index no longer known keeps showing


def test_ipv4_options_past_the_copied_40_bytes_leave_the_ports_unknown() -> None:
    header = ipv4("10.0.0.1", "10.0.0.2", options=bytes([1]) * 24)  # IHL 11: 44 bytes, 40 copied
    event = parse_message(step(extra=(nla(nftrace.NFTA_TRACE_NETWORK_HEADER, header),
                                      nla(nftrace.NFTA_TRACE_TRANSPORT_HEADER, tcp(1, 2, 0x12)))), "p")
    assert (event.src, event.dst, event.proto, event.sport, event.dport, event.tcp_flags) == \
        ("10.0.0.1", "10.0.0.2", "tcp", None, None, None)


def test_header_less_steps_take_their_walks_packet() -> None:
    first = step(trace_id=1, extra=(nla(nftrace.NFTA_TRACE_RULE_HANDLE, struct.pack(">Q", 10)), verdict(-3, "ISTIO_OUTPUT"),
                                    nla(nftrace.NFTA_TRACE_NETWORK_HEADER, ipv4("10.9.0.10", "10.9.0.20")),
                                    nla(nftrace.NFTA_TRACE_TRANSPORT_HEADER, tcp(5, 9080, 0x02))))
    second = step(trace_id=1, extra=(nla(nftrace.NFTA_TRACE_RULE_HANDLE, struct.pack(">Q", 20)), verdict(-5)))
    other = step(trace_id=2, extra=(verdict(-1),))
    events = carry_packets([parse_message(m, "p") for m in (first, second, other)])
    assert [(e.handle, e.dst, e.dport, e.tcp_flags) for e in events] == \
        [(10, "10.9.0.20", 9080, "S"), (20, "10.9.0.20", 9080, "S"), (None, None, None, None)]


def test_the_walk_memory_is_bounded() -> None:
    from collections import OrderedDict

    walks = OrderedDict()
    headers = (nla(nftrace.NFTA_TRACE_NETWORK_HEADER, ipv4("10.0.0.1", "10.0.0.2")),
               nla(nftrace.NFTA_TRACE_TRANSPORT_HEADER, tcp(1, 2, 0x02)))
    carry_packets([parse_message(step(trace_id=i, extra=headers), "p") for i in range(nftrace.WALKS_KEPT + 5)], walks)
    assert len(walks) == nftrace.WALKS_KEPT and next(iter(walks)) == 5
