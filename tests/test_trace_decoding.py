"""The TRACE reader's own header decoder against scapy's, on packets scapy builds.

trace.py decodes with `struct` (scapy costs a second and ~60 MB to import, more than a
lab run); scapy is the independent reading that keeps it honest: IPv4 with options,
fragments, IPv6, TCP with every flag combination, UDP, truncated at the copy range the
reader asks the kernel for.
"""

import functools

from hypothesis import given, settings
from hypothesis import strategies as st

from lab import trace

ipv4 = st.ip_addresses(v=4).map(str)
ipv6 = st.ip_addresses(v=6).map(str)
port = st.integers(0, 65535)


@functools.cache
def _scapy():
    """scapy's layers, imported on first use only (collection stays fast)."""
    from scapy.layers import inet, inet6

    return inet, inet6


def _l4(proto: str, sport: int, dport: int, flags: int):
    inet, _ = _scapy()
    return inet.TCP(sport=sport, dport=dport, flags=flags) if proto == "tcp" else inet.UDP(sport=sport, dport=dport)


def _expected(packet, l4_cls):
    """What scapy reads back from the bytes: addresses, protocol, ports and TCP flags."""
    l4 = packet.getlayer(l4_cls)
    proto = "tcp" if l4_cls.__name__ == "TCP" else "udp"
    if l4 is None:
        return packet.src, packet.dst, proto, None, None, "" if proto == "tcp" else None
    flags = str(l4.flags) if proto == "tcp" else None
    return packet.src, packet.dst, proto, l4.sport, l4.dport, flags


@settings(max_examples=300, deadline=None, database=None, derandomize=True)
@given(src=ipv4, dst=ipv4, proto=st.sampled_from(["tcp", "udp"]), sport=port, dport=port,
       flags=st.integers(0, 255), options=st.integers(0, 9), fragment=st.sampled_from([0, 0, 0, 1, 185]))
def test_ipv4_headers_decode_as_scapy_reads_them(src, dst, proto, sport, dport, flags, options, fragment):
    inet, _ = _scapy()
    header = inet.IP(src=src, dst=dst, options=[inet.IPOption_NOP()] * (options * 4), frag=fragment)
    raw = bytes(header / _l4(proto, sport, dport, flags))[:trace.COPY_RANGE]
    got = trace.parse_packet(raw)
    if fragment:  # a later fragment carries no transport header: no ports, whatever its bytes
        assert got[:3] == (src, dst, proto) and got[3:5] == (None, None)
        return
    assert got == _expected(inet.IP(raw), inet.TCP if proto == "tcp" else inet.UDP)


@settings(max_examples=300, deadline=None, database=None, derandomize=True)
@given(src=ipv6, dst=ipv6, proto=st.sampled_from(["tcp", "udp"]), sport=port, dport=port, flags=st.integers(0, 255))
def test_ipv6_headers_decode_as_scapy_reads_them(src, dst, proto, sport, dport, flags):
    inet, inet6 = _scapy()
    raw = bytes(inet6.IPv6(src=src, dst=dst) / _l4(proto, sport, dport, flags))[:trace.COPY_RANGE]
    assert trace.parse_packet(raw) == _expected(inet6.IPv6(raw), inet.TCP if proto == "tcp" else inet.UDP)


def test_an_ipv6_extension_header_hides_the_ports():
    """The decoder reads TCP/UDP only straight after the fixed header: behind a hop-by-hop
    header it names that header's number (0) and no ports, rather than misread bytes."""
    inet, inet6 = _scapy()
    raw = bytes(inet6.IPv6(src="fd00::1", dst="fd00::2") / inet6.IPv6ExtHdrHopByHop() / inet.TCP(sport=1, dport=2))
    assert trace.parse_packet(raw) == ("fd00::1", "fd00::2", 0, None, None, None)
