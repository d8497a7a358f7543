"""rtnetlink, the few requests a lab is built with: links, addresses, routes, neighbours and
policy rules, one function per request, as `ip` sends them.

A socket made inside a namespace stays tied to it (lab.world.ipr makes one there), so each
request changes that namespace only.  Every request asks for an acknowledgement and an error
is raised as OSError with the request named; nothing is cached, nothing runs in the
background.  Messages are packed with `struct` (linux/netlink.h, linux/rtnetlink.h,
linux/if_link.h, linux/if_addr.h, linux/neighbour.h, linux/fib_rules.h), as trace.py packs
nfnetlink_log's: pyroute2 cost every run 0.1 s to import and most of a lab's build time in
its per-request machinery (an asyncio loop and argument filters per request).
"""

from __future__ import annotations

import errno
import ipaddress
import os
import socket
import struct

# linux/netlink.h
NETLINK_ROUTE, NETLINK_NETFILTER = 0, 12
NLM_F_REQUEST, NLM_F_ACK, NLM_F_EXCL, NLM_F_CREATE = 0x1, 0x4, 0x200, 0x400
NLMSG_ERROR, NLMSG_DONE = 2, 3
NLA_F_NESTED = 0x8000
# linux/rtnetlink.h
RTM_NEWLINK, RTM_GETLINK, RTM_NEWADDR, RTM_NEWROUTE, RTM_NEWNEIGH, RTM_NEWRULE = 16, 18, 20, 24, 28, 32
RT_TABLE_MAIN = 254
RTPROT_BOOT, RTPROT_STATIC = 3, 4
RT_SCOPE_UNIVERSE, RT_SCOPE_LINK, RT_SCOPE_HOST = 0, 253, 254
RTN_UNICAST, RTN_LOCAL = 1, 2
RTA_DST, RTA_OIF, RTA_GATEWAY, RTA_TABLE = 1, 4, 5, 15
# linux/if_link.h
IFLA_ADDRESS, IFLA_IFNAME, IFLA_MASTER, IFLA_LINKINFO, IFLA_NET_NS_FD = 1, 3, 10, 18, 28
IFLA_INFO_KIND, IFLA_INFO_DATA, IFLA_INFO_SLAVE_KIND, IFLA_INFO_SLAVE_DATA = 1, 2, 4, 5
IFLA_BRPORT_MODE = 4  # hairpin
VETH_INFO_PEER = 1
IFF_UP = 0x1
# linux/if_addr.h
IFA_ADDRESS, IFA_LOCAL, IFA_FLAGS = 1, 2, 8
# linux/neighbour.h
NDA_DST, NDA_LLADDR = 1, 2
# linux/fib_rules.h
FRA_PRIORITY, FRA_FWMARK, FRA_TABLE = 6, 10, 15
FR_ACT_TO_TBL = 1

_CREATE = NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL
_HEADER = struct.Struct("=IHHII")  # nlmsghdr: length, type, flags, sequence, port id
_IFINFO = struct.Struct("=BxHiII")  # ifinfomsg: family, type, index, flags, change


def attr(kind: int, payload: bytes) -> bytes:
    """One netlink attribute, padded to four bytes."""
    return struct.pack("=HH", 4 + len(payload), kind) + payload + bytes(-len(payload) % 4)


def nested(kind: int, *attrs: bytes) -> bytes:
    return attr(kind | NLA_F_NESTED, b"".join(attrs))


def _name(text: str) -> bytes:
    return text.encode() + b"\0"


def _u32(value: int) -> bytes:
    return struct.pack("=I", value)


def _ifinfo(index: int = 0, up: bool = False) -> bytes:
    return _IFINFO.pack(socket.AF_UNSPEC, 0, index, IFF_UP if up else 0, IFF_UP if up else 0)


def _family(address: str) -> int:
    return socket.AF_INET6 if ":" in address else socket.AF_INET


def attrs_of(data: bytes, offset: int) -> dict[int, bytes]:
    """A message's attributes by type, from `offset` (after its fixed header)."""
    out = {}
    while offset + 4 <= len(data):
        length, kind = struct.unpack_from("=HH", data, offset)
        if length < 4:
            break
        out.setdefault(kind & ~NLA_F_NESTED, data[offset + 4:offset + length])
        offset += (length + 3) & ~3
    return out


class Socket:
    """An rtnetlink socket of the namespace it was made in."""

    def __init__(self):
        self.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, NETLINK_ROUTE)
        self.sock.bind((0, 0))
        self.seq = 0

    def close(self) -> None:
        self.sock.close()

    def request(self, kind: int, flags: int, body: bytes, what: str) -> list[bytes]:
        """Send one message; the replies before its acknowledgement (OSError on an error)."""
        self.seq += 1
        self.sock.send(_HEADER.pack(_HEADER.size + len(body), kind, flags, self.seq, 0) + body)
        replies = []
        while True:
            buf, off = self.sock.recv(65536), 0
            while off + _HEADER.size <= len(buf):
                length, mtype, _, seq, _ = _HEADER.unpack_from(buf, off)
                message, off = buf[off:off + length], off + ((length + 3) & ~3)
                if seq != self.seq:
                    continue
                if mtype == NLMSG_ERROR:
                    code = -struct.unpack_from("=i", message, _HEADER.size)[0]
                    if code:
                        raise OSError(code, f"{what}: {os.strerror(code)}")
                    return replies
                if mtype == NLMSG_DONE:
                    return replies
                replies.append(message)

    # -- links ------------------------------------------------------------------------

    def link_up(self, index: int) -> None:
        self.request(RTM_NEWLINK, NLM_F_REQUEST | NLM_F_ACK, _ifinfo(index, up=True), f"set link {index} up")

    def add_bridge(self, name: str) -> int:
        info = nested(IFLA_LINKINFO, attr(IFLA_INFO_KIND, _name("bridge")))
        self.request(RTM_NEWLINK, _CREATE, _ifinfo() + attr(IFLA_IFNAME, _name(name)) + info, f"add bridge {name}")
        return self.index(name)

    def add_veth(self, name: str, peer: str, peer_ns_fd: int, master: int) -> int:
        """A veth `name` here, up and a port of bridge `master`; its peer `peer` (down) in the
        namespace open on `peer_ns_fd`.  Returns the index of `name`."""
        other = _ifinfo() + attr(IFLA_IFNAME, _name(peer)) + attr(IFLA_NET_NS_FD, _u32(peer_ns_fd))
        info = nested(IFLA_LINKINFO, attr(IFLA_INFO_KIND, _name("veth")),
                      nested(IFLA_INFO_DATA, attr(VETH_INFO_PEER, other)))
        body = _ifinfo(up=True) + attr(IFLA_IFNAME, _name(name)) + info
        if master:
            body += attr(IFLA_MASTER, _u32(master))
        self.request(RTM_NEWLINK, _CREATE, body, f"add veth {name} (peer {peer})")
        return self.index(name)

    def hairpin(self, index: int) -> None:
        """Hairpin mode on a bridge port (`ip link set PORT type bridge_slave hairpin on`)."""
        info = nested(IFLA_LINKINFO, attr(IFLA_INFO_SLAVE_KIND, _name("bridge")),
                      nested(IFLA_INFO_SLAVE_DATA, attr(IFLA_BRPORT_MODE, b"\x01")))
        self.request(RTM_NEWLINK, NLM_F_REQUEST | NLM_F_ACK, _ifinfo(index) + info, f"hairpin on link {index}")

    def _link(self, body: bytes, what: str) -> tuple[int, dict[int, bytes]]:
        try:
            (reply,) = self.request(RTM_GETLINK, NLM_F_REQUEST | NLM_F_ACK, body, what)
        except OSError as e:
            if e.errno == errno.ENODEV:
                raise LookupError(what) from None
            raise
        index = _IFINFO.unpack_from(reply, _HEADER.size)[2]
        return index, attrs_of(reply, _HEADER.size + _IFINFO.size)

    def index(self, name: str) -> int:
        """The index of link `name` (LookupError when there is none)."""
        return self._link(_ifinfo() + attr(IFLA_IFNAME, _name(name)), f"link {name}")[0]

    def mac(self, index: int) -> str:
        """A link's hardware address, as aa:bb:cc:dd:ee:ff."""
        return self._link(_ifinfo(index), f"link {index}")[1][IFLA_ADDRESS].hex(":")

    # -- addresses, routes, neighbours, rules -----------------------------------------

    def add_address(self, index: int, address: str, prefixlen: int, flags: int = 0) -> None:
        family = _family(address)
        packed = socket.inet_pton(family, address)
        body = struct.pack("=BBBBI", family, prefixlen, flags & 0xFF, RT_SCOPE_UNIVERSE, index)
        body += attr(IFA_LOCAL, packed) + attr(IFA_ADDRESS, packed)
        if flags:
            body += attr(IFA_FLAGS, _u32(flags))
        self.request(RTM_NEWADDR, _CREATE, body, f"add address {address}/{prefixlen} on link {index}")

    def add_route(self, dst: str, *, gateway: str | None = None, oif: int = 0, table: int = RT_TABLE_MAIN,
                  kind: int = RTN_UNICAST, scope: int = RT_SCOPE_UNIVERSE, family: int | None = None) -> None:
        """`ip route add DST [via GATEWAY] [dev OIF] [table T]`; dst "default" or a CIDR;
        kind RTN_LOCAL for `ip route add local ...`."""
        net = None if dst == "default" else ipaddress.ip_network(dst, strict=False)
        family = family or (_family(gateway) if gateway else socket.AF_INET6 if net and net.version == 6
                            else socket.AF_INET)
        body = struct.pack("=BBBBBBBBI", family, net.prefixlen if net else 0, 0, 0, table if table < 256 else 0,
                           RTPROT_BOOT, scope, kind, 0)
        if net and net.prefixlen:
            body += attr(RTA_DST, net.network_address.packed)
        if gateway:
            body += attr(RTA_GATEWAY, socket.inet_pton(family, gateway))
        if oif:
            body += attr(RTA_OIF, _u32(oif))
        body += attr(RTA_TABLE, _u32(table))
        self.request(RTM_NEWROUTE, _CREATE, body, f"add route {dst}" + (f" via {gateway}" if gateway else ""))

    def add_neighbour(self, index: int, address: str, mac: str, state: int) -> None:
        family = _family(address)
        body = struct.pack("=BxxxiHBB", family, index, state, 0, 0)
        body += attr(NDA_DST, socket.inet_pton(family, address)) + attr(NDA_LLADDR, bytes.fromhex(mac.replace(":", "")))
        self.request(RTM_NEWNEIGH, _CREATE, body, f"add neighbour {address} on link {index}")

    def add_rule(self, family: int, fwmark: int, table: int, priority: int) -> None:
        """`ip rule add fwmark MARK lookup TABLE priority PRIORITY`."""
        body = struct.pack("=BBBBBBBBI", family, 0, 0, 0, table if table < 256 else 0, 0, 0, FR_ACT_TO_TBL, 0)
        body += attr(FRA_FWMARK, _u32(fwmark)) + attr(FRA_TABLE, _u32(table)) + attr(FRA_PRIORITY, _u32(priority))
        self.request(RTM_NEWRULE, _CREATE, body, f"add rule fwmark {fwmark} lookup {table}")
