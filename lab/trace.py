"""Per-namespace TRACE reader: the kernel's own account of which rules a packet hit.

The raw table's TRACE target marks a packet; every later rule that matches it,
in any table, is reported to the logger bound for its family *in the packet's
namespace* as `TRACE: table:chain:kind:rulenum `.  We bind nfnetlink_log for
AF_INET and AF_INET6 inside the pod's namespace and read group 0 from a netlink
socket made there, so each pod gets its own stream (both families, one sequence),
with no global sysctl and no dmesg.

Packet headers are decoded here with `struct`, not scapy: importing scapy
costs about a second and ~60 MB (measured here), more than a whole lab run may
spend, and we only need addresses, ports and TCP flags.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import os
import select
import socket
import struct
import time
from dataclasses import dataclass
from typing import Mapping

from pyroute2.netlink import NETLINK_NETFILTER, NLM_F_ACK, NLM_F_REQUEST, NLMSG_ERROR
from pyroute2.netlink.nfnetlink import NFNL_SUBSYS_ULOG

from . import netns
from .addr import Address
from .netfilter import RuleRef

# linux/netfilter/nfnetlink_log.h
NFULNL_MSG_PACKET = 0
NFULNL_MSG_CONFIG = 1
NFULNL_CFG_CMD_BIND = 1
NFULNL_CFG_CMD_UNBIND = 2
NFULNL_CFG_CMD_PF_BIND = 3
NFULNL_CFG_CMD_PF_UNBIND = 4
_COMMANDS = {1: "BIND group 0", 2: "UNBIND group 0", 3: "PF_BIND", 4: "PF_UNBIND"}
_FAMILIES = {socket.AF_INET: "AF_INET", socket.AF_INET6: "AF_INET6"}
NFULNL_COPY_PACKET = 0x02
NFULA_IFINDEX_INDEV = 4
NFULA_IFINDEX_OUTDEV = 5
NFULA_PAYLOAD = 9
NFULA_PREFIX = 10
NFULA_UID = 11
NFULA_SEQ = 12
NFULA_GID = 14
NFULA_CFG_CMD = 1
NFULA_CFG_MODE = 2
NFULA_CFG_QTHRESH = 5
NFULA_CFG_FLAGS = 6
NFULNL_CFG_F_SEQ = 0x0001
# There is no NFULNL_CFG_F_UID: the kernel always adds NFULA_UID/NFULA_GID when
# the packet still carries a full socket with a file (locally generated).

SO_RCVBUFFORCE = getattr(socket, "SO_RCVBUFFORCE", 33)
NLA_TYPE_MASK = 0x3FFF  # strip NLA_F_NESTED / NLA_F_NET_BYTEORDER
GROUP = 0  # TRACE (via nf_log_trace) always logs to nfnetlink_log group 0
COPY_RANGE = 128  # IPv4 header (<= 60) or IPv6's fixed one (40), + TCP header (<= 60)
RCVBUF = 8 << 20
TRACE_PREFIX = "TRACE: "
KINDS = ("rule", "return", "policy")
PROTOS = {socket.IPPROTO_TCP: "tcp", socket.IPPROTO_UDP: "udp", socket.IPPROTO_ICMP: "icmp",
          socket.IPPROTO_ICMPV6: "icmpv6"}
TCP_FLAGS = "FSRPAUEC"  # bit 0 (FIN) .. bit 7 (CWR): scapy's order, "SA" = SYN+ACK


class TraceError(RuntimeError):
    """The TRACE reader could not be set up or used."""


class TraceLost(TraceError):
    """Events were dropped (socket buffer overrun or a sequence gap): the list would lie."""


def _nla(atype: int, payload: bytes) -> bytes:
    return struct.pack("=HH", 4 + len(payload), atype) + payload + bytes(-len(payload) % 4)


def _config_message(nlseq: int, family: int, cmd: int, mode: tuple[int, int] | None = None,
                    qthresh: int | None = None, flags: int | None = None) -> bytes:
    """NFULNL_MSG_CONFIG with NLM_F_ACK: nlmsghdr, nfgenmsg (res_id = group), attributes."""
    body = struct.pack("!BBH", family, 0, GROUP) + _nla(NFULA_CFG_CMD, bytes([cmd]))
    if mode is not None:
        body += _nla(NFULA_CFG_MODE, struct.pack(">IBx", *mode))  # copy_range, copy_mode
    if qthresh is not None:
        body += _nla(NFULA_CFG_QTHRESH, struct.pack(">I", qthresh))
    if flags is not None:
        body += _nla(NFULA_CFG_FLAGS, struct.pack(">H", flags))
    mtype = NFNL_SUBSYS_ULOG << 8 | NFULNL_MSG_CONFIG
    return struct.pack("=IHHII", 16 + len(body), mtype, NLM_F_REQUEST | NLM_F_ACK, nlseq, 0) + body


def _command(family: int, cmd: int) -> str:
    return f"{_COMMANDS[cmd]} {_FAMILIES[family]}" if family in _FAMILIES else _COMMANDS[cmd]


_NLA = struct.Struct("=HH")


@dataclass(frozen=True, slots=True)
class TraceEvent:
    """One rule that matched one traced packet, in one pod.

    tcp_flags lists the set flags in bit order F S R P A U E C (scapy's
    convention): "S" SYN, "SA" SYN+ACK, "A" ACK, "PA" PSH+ACK, "FA" FIN+ACK,
    "R" RST, "RA" RST+ACK, "" no flag; None when the packet is not TCP.
    uid/gid are the fsuid/fsgid of the socket the packet carries, if it is a
    full socket with a file: a process's own packets on OUTPUT/POSTROUTING.
    None for the kernel's own sockets (SYN-ACK, TIME_WAIT ACK, ICMP replies)
    and for packets received on lo.  On input from a veth, early demux may
    attach the *receiving* socket, so there uid/gid say who receives, not who
    sent: read them as the sender only on locally generated hops.
    """

    pod: str
    table: str
    chain: str
    kind: str  # "rule" | "return" | "policy"
    rulenum: int
    indev: str | None
    outdev: str | None
    src: str
    dst: str
    proto: str | int
    sport: int | None
    dport: int | None
    tcp_flags: str | None
    uid: int | None
    gid: int | None
    seq: int | None
    prefix: str

    # The joiner asks every event for these, often several times: the values are made once
    # each (a frozen dataclass's __init__ costs a microsecond) and handed out again.
    @property
    def rule(self) -> RuleRef:
        """The rule the event names (for `policy`, the chain's rule count + 1)."""
        return _rule(self.table, self.chain, self.rulenum)

    @property
    def source(self) -> Address | None:
        return _address(self.src, self.sport) if self.sport is not None else None

    @property
    def destination(self) -> Address | None:
        return _address(self.dst, self.dport) if self.dport is not None else None

    @property
    def opens_flow(self) -> bool:
        """A connection's SYN, or any UDP datagram (its first plays the SYN's part)."""
        return self.tcp_flags == "S" or self.proto == "udp"

    def __str__(self) -> str:
        parts = [f"{self.pod} {self.table}:{self.chain}:{self.kind}:{self.rulenum}"]
        if self.indev:
            parts.append(f"in={self.indev}")
        if self.outdev:
            parts.append(f"out={self.outdev}")
        src, dst = self.src, self.dst
        if self.sport is not None:
            src, dst = str(self.source), str(self.destination)
        parts.append(f"{src} > {dst}")
        if self.tcp_flags is not None:
            parts.append(self.tcp_flags or ".")
        elif self.proto != "tcp":
            parts.append(str(self.proto))
        if self.uid is not None:
            parts.append(f"uid={self.uid} gid={self.gid}")
        return " ".join(parts)


_address = functools.lru_cache(maxsize=4096)(Address)
_rule = functools.lru_cache(maxsize=4096)(RuleRef)


def parse_prefix(prefix: str) -> tuple[str, str, str, int] | None:
    """Split `TRACE: table:chain:kind:rulenum ` into its parts.

    Returns None for a prefix that is not TRACE's (an NFLOG rule logging to
    group 0, say); raises ValueError for a TRACE prefix we cannot read, so a
    kernel format change fails loudly instead of losing hops.  The chain is
    whatever lies between the first and the last two colons: user chain names
    may contain colons, table names and kinds do not.
    """
    if not prefix.startswith(TRACE_PREFIX):
        return None
    body = prefix[len(TRACE_PREFIX):].rstrip(" ")
    table, sep, rest = body.partition(":")
    chain, kind, rulenum = (rest.rsplit(":", 2) + ["", ""])[:3] if sep else ("", "", "")
    if not table or not chain or kind not in KINDS or not rulenum.isdigit():
        raise ValueError(f"malformed TRACE prefix {prefix!r}")
    return table, chain, kind, int(rulenum)


def parse_packet(payload: bytes) -> tuple[str, str, str | int, int | None, int | None, str | None]:
    """(src, dst, proto, sport, dport, tcp_flags) from the start of an IPv4 or IPv6 packet."""
    if len(payload) >= 40 and payload[0] >> 4 == 6:
        return _transport(*_ipv6_header(payload))
    if len(payload) < 20 or payload[0] >> 4 != 4:
        raise ValueError("not an IPv4 or IPv6 packet")
    ihl = (payload[0] & 0x0F) * 4
    frag_offset = struct.unpack_from("!H", payload, 6)[0] & 0x1FFF
    src, dst = socket.inet_ntoa(payload[12:16]), socket.inet_ntoa(payload[16:20])
    return _transport(src, dst, payload[9], payload[ihl:] if not frag_offset else b"")  # later fragments: no ports


def _ipv6_header(payload: bytes) -> tuple[str, str, int, bytes]:
    """The fixed header only: the transport header is read when it follows it directly (the
    lab's TCP and UDP); behind extension headers the protocol shows as the first one's
    number, with no ports."""
    src, dst = (socket.inet_ntop(socket.AF_INET6, payload[i:i + 16]) for i in (8, 24))
    return src, dst, payload[6], payload[40:]


def _transport(src: str, dst: str, number: int, l4: bytes):
    proto = PROTOS.get(number, number)
    sport = dport = flags = None
    if proto in ("tcp", "udp") and len(l4) >= 4:
        sport, dport = struct.unpack_from("!HH", l4)
    if proto == "tcp":
        flags = _FLAGS[l4[13]] if len(l4) >= 14 else ""
    return src, dst, proto, sport, dport, flags


_FLAGS = tuple("".join(c for i, c in enumerate(TCP_FLAGS) if byte >> i & 1) for byte in range(256))


def link_name(ifnames: Mapping[int, str], index: int | None) -> str | None:
    """A link's name by index, as the reader's namespace names it (None: no link)."""
    if index is None:
        return None
    try:
        return ifnames[index]
    except KeyError:
        return f"if{index}"  # gone before we looked: keep the index visible


_PREFIXES: dict[bytes, tuple[str, tuple[str, str, str, int] | None]] = {}  # a lab's few prefixes, read once


def _prefix(raw: bytes) -> tuple[str, tuple[str, str, str, int] | None]:
    if raw not in _PREFIXES:
        prefix = raw.split(b"\0", 1)[0].decode(errors="replace")
        where = parse_prefix(prefix)  # a malformed one raises, and is not kept
        if len(_PREFIXES) < 4096:
            _PREFIXES[raw] = (prefix, where)
        return prefix, where
    return _PREFIXES[raw]


_PACKETS: dict[bytes, tuple] = {}  # the packets just seen: one is reported once per rule it matches


def _packet(payload: bytes) -> tuple:
    found = _PACKETS.get(payload)
    if found is None:
        if len(_PACKETS) >= 256:
            _PACKETS.clear()
        found = _PACKETS[payload] = parse_packet(payload)
    return found


def _decode(data: bytes, pod: str, ifnames: Mapping[int, str]) -> tuple[int | None, TraceEvent | None]:
    """(NFULA_SEQ, the event or None; None for a message that is not TRACE's) of one packet
    message.  Hundreds of events a flow pass here: the attributes an event holds go into
    locals in one pass, the first of each type, with no dictionary
    between (4.5 us an event, not 5.8)."""
    indev = outdev = uid = gid = seq = None
    prefix = payload = b""
    off, end, unpack, word = 20, len(data), _NLA.unpack_from, int.from_bytes
    while off + 4 <= end:
        length, atype = unpack(data, off)
        if length < 4:
            break
        atype &= NLA_TYPE_MASK
        if atype == NFULA_PAYLOAD:
            payload = payload or data[off + 4:off + length]
        elif atype == NFULA_PREFIX:
            prefix = prefix or data[off + 4:off + length]
        elif atype == NFULA_SEQ:
            seq = word(data[off + 4:off + 8], "big") if seq is None else seq
        elif atype == NFULA_IFINDEX_INDEV:
            indev = word(data[off + 4:off + 8], "big") if indev is None else indev
        elif atype == NFULA_IFINDEX_OUTDEV:
            outdev = word(data[off + 4:off + 8], "big") if outdev is None else outdev
        elif atype == NFULA_UID:
            uid = word(data[off + 4:off + 8], "big") if uid is None else uid
        elif atype == NFULA_GID:
            gid = word(data[off + 4:off + 8], "big") if gid is None else gid
        off += (length + 3) & ~3
    text, where = _prefix(prefix)
    if where is None:
        return seq, None
    src, dst, proto, sport, dport, flags = _packet(payload)
    return seq, TraceEvent(pod, *where, link_name(ifnames, indev), link_name(ifnames, outdev), src, dst, proto, sport,
                           dport, flags, uid, gid, seq, text)


def parse_message(data: bytes, pod: str, ifnames: Mapping[int, str] | None = None) -> TraceEvent | None:
    """One NFULNL_MSG_PACKET netlink message (headers included) -> TraceEvent; None if not TRACE.

    `ifnames` maps the pod's ifindexes to names; an unknown index shows as "if<N>".
    """
    return _decode(data, pod, ifnames or {})[1]


def split_messages(buf: bytes) -> list[tuple[int, bytes]]:
    """Cut one netlink datagram into (nlmsg_type, message bytes) pairs."""
    out, off = [], 0
    while off + 16 <= len(buf):
        length, mtype = struct.unpack_from("=IH", buf, off)
        if length < 16 or off + length > len(buf):
            raise TraceError(f"truncated netlink message at offset {off}")
        out.append((mtype, buf[off:off + length]))
        off += (length + 3) & ~3
    return out


def _inside(ns: str | None):
    """Enter `ns`; None stays in the thread's current namespace (preflight's scratch one)."""
    return netns.entered(ns) if ns else contextlib.nullcontext()


class IfNames(dict):
    """ifindex -> name inside one namespace, refreshed on a miss."""

    def __init__(self, ns: str | None):
        super().__init__()
        self.ns = ns

    def __missing__(self, index: int) -> str:
        # if_indextoname (an ioctl, read under RCU), not if_nameindex: that is a netlink dump,
        # which waits for the rtnl lock, and a namespace's cleanup holds it for tens of ms.
        try:
            with _inside(self.ns):
                self[index] = socket.if_indextoname(index)
        except OSError:  # no such link, or the namespace is already gone
            raise KeyError(index) from None
        return self[index]


class EventSocket:
    """What the TRACE and nftrace readers share: a non-blocking netlink socket whose events
    queue in its buffer, read all at once (_read_queued, the reader's own decoding)."""

    sock: socket.socket

    def _read_queued(self) -> list:
        raise NotImplementedError

    def _empty(self) -> None:
        """Drop whatever is queued (after a loss: what follows it is incomplete)."""
        while True:
            try:
                self.sock.recv(65536)
            except BlockingIOError:
                return
            except OSError as e:
                if e.errno != errno.ENOBUFS:
                    raise

    def drain(self, settle: float = 0.025, timeout: float = 0.5) -> list:
        """Read every queued event, then keep reading until none arrived for `settle` s.

        The kernel may deliver the last events (softirq work on loopback or a
        veth) just after the traffic's last syscall returned; `settle` waits
        them out, so a drain costs at least `settle`.  `timeout` caps the whole
        call when traffic never stops.  settle=0: read what is queued, no wait.
        Raises TraceLost, with no events, if any event was dropped.
        """
        events = self._read_queued()
        if settle <= 0:
            return events
        poller = select.poll()
        poller.register(self.sock, select.POLLIN)
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            if not poller.poll(min(settle, left) * 1000):
                break
            events += self._read_queued()
        return events

    def fileno(self) -> int:
        return self.sock.fileno()

    def close(self) -> None:
        self.sock.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class TraceReader(EventSocket):
    """Read the TRACE events of one namespace from nfnetlink_log group 0.

    Only one reader per namespace can exist (the kernel refuses a second bind
    of group 0).  Events queue in the socket buffer until drain() reads them.
    The kernel numbers them per logger instance (NFULA_SEQ, from 0 after the
    bind), so a gap or a buffer overrun is reported as TraceLost, never hidden.

    What the kernel reports (6.x): only tables in use in the namespace (legacy
    xtables instantiates a table on first use) emit events; a packet looped
    through lo keeps its trace mark, so PREROUTING/INPUT events follow the
    OUTPUT ones; a veth clears the mark, so each pod traces its own inbound
    packets with its own raw PREROUTING rule.  close() leaves nfnetlink_log
    bound for AF_INET and AF_INET6 in the namespace; with no group-0 reader, events are dropped.
    """

    def __init__(self, ns: str | None, pod: str | None = None, *, rcvbuf: int = RCVBUF,
                 record: list[bytes] | None = None):
        self.ns = ns
        self.pod = pod or ns
        self.record = record  # if a list, every packet message's raw bytes are appended
        self.ifnames = IfNames(ns)
        self._next_seq: int | None = 0  # None: resynchronise on the next event
        self._nlseq = 0
        self._pending: list[bytes] = []  # datagrams that came in while we waited for an ACK
        with _inside(ns):  # the socket stays tied to the pod's namespace
            self.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC,
                                      NETLINK_NETFILTER)
        try:
            self.sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, rcvbuf)
            self.sock.bind((0, 0))
            self.sock.settimeout(1.0)
            for family in _FAMILIES:  # the pod's own logger for each family
                self._config(family, NFULNL_CFG_CMD_PF_UNBIND)
                self._config(family, NFULNL_CFG_CMD_PF_BIND)
            # One message, so the instance is born with its settings.  TRACE events are
            # sent at once anyway; qthresh=1 does the same for NFLOG rules logging to
            # group 0, which would otherwise wait up to 1 s (or 100 events) in the kernel.
            self._config(socket.AF_UNSPEC, NFULNL_CFG_CMD_BIND,
                         mode=(COPY_RANGE, NFULNL_COPY_PACKET), qthresh=1, flags=NFULNL_CFG_F_SEQ)
            self.sock.setblocking(False)
        except BaseException:
            self.sock.close()
            raise

    def _config(self, family: int, cmd: int, **attrs) -> None:
        """Send one NFULNL_MSG_CONFIG and wait for the kernel's ACK (or its error)."""
        self._nlseq += 1
        self.sock.send(_config_message(self._nlseq, family, cmd, **attrs))
        while True:
            try:
                buf = self.sock.recv(65536)
            except TimeoutError:
                raise TraceError(f"{self.ns}: nfnetlink_log did not answer {_command(family, cmd)}") from None
            messages = split_messages(buf)
            if any(mtype != NLMSG_ERROR for mtype, _ in messages):
                self._pending.append(buf)  # events queued ahead of the ACK: drain() reads them
            for mtype, data in messages:
                if mtype == NLMSG_ERROR and struct.unpack_from("=I", data, 28)[0] == self._nlseq:
                    code = -struct.unpack_from("=i", data, 16)[0]  # nlmsgerr.error, then the request's header
                    if not code:
                        return
                    hint = ""
                    if cmd == NFULNL_CFG_CMD_BIND and code in (errno.EPERM, errno.EBUSY):
                        hint = ": another socket already reads group 0 here (one TraceReader per namespace)"
                    raise TraceError(f"{self.ns}: nfnetlink_log {_command(family, cmd)} failed with "
                                     f"{errno.errorcode.get(code, code)} ({os.strerror(code)}){hint}")

    def _read_queued(self) -> list[TraceEvent]:
        """Everything queued right now, without blocking; checks the sequence as it goes."""
        events = []
        while True:
            if self._pending:
                buf = self._pending.pop(0)
            else:
                try:
                    buf = self.sock.recv(65536)
                except BlockingIOError:
                    return events
                except OSError as e:
                    if e.errno != errno.ENOBUFS:
                        raise
                    self._resync()
                    raise TraceLost(f"{self.ns}: socket buffer overrun, TRACE events were dropped") from None
            for mtype, data in split_messages(buf):
                if mtype != NFNL_SUBSYS_ULOG << 8 | NFULNL_MSG_PACKET:
                    continue  # NLMSG_DONE closes a batch of several events
                if self.record is not None:
                    self.record.append(data)
                seq, event = _decode(data, self.pod, self.ifnames)
                if seq is not None:  # non-TRACE messages (NFLOG group 0) count too
                    if self._next_seq is not None and seq != self._next_seq:
                        expected = self._next_seq
                        self._resync()
                        raise TraceLost(f"{self.ns}: TRACE sequence jumped from {expected} to {seq}")
                    self._next_seq = (seq + 1) & 0xFFFFFFFF
                if event is not None:
                    events.append(event)

    def _resync(self) -> None:
        """After a loss, discard what is queued and accept whatever sequence comes next."""
        self._next_seq = None
        self._pending.clear()
        self._empty()

    def close(self) -> None:
        """Unbind group 0 and close the socket (closing alone would also free the instance)."""
        if self.sock.fileno() < 0:
            return
        try:
            self.sock.settimeout(0.2)
            self._config(socket.AF_UNSPEC, NFULNL_CFG_CMD_UNBIND)
        except (OSError, TraceError):
            pass
        finally:
            self.sock.close()

