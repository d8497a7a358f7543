"""DNS on the wire, as much as the lab speaks: one question, A records, RFC 1035.

kube-dns, pilot-agent's DNS proxy and the client all use it.  A query is a header and one
question; an answer repeats both and adds A records.  Over TCP each message is preceded
by its length in two bytes (RFC 1035 4.2.2).  Names are compared lowercased, without
the trailing dot.
"""

from __future__ import annotations

import asyncio
import ipaddress
import re
import socket
import struct
from dataclasses import dataclass, field
from typing import Mapping

from . import plan
from .sidecar import httpio

TYPE_A = 1
CLASS_IN = 1
RCODES = {0: "NOERROR", 1: "FORMERR", 2: "SERVFAIL", 3: "NXDOMAIN", 4: "NOTIMP", 5: "REFUSED"}
NOERROR, FORMERR, SERVFAIL, NXDOMAIN = 0, 1, 2, 3
_QR, _AA, _RD, _RA = 0x8000, 0x0400, 0x0100, 0x0080
_HEADER = struct.Struct("!HHHHHH")  # id, flags, qdcount, ancount, nscount, arcount
_POD_NAME = re.compile(r"^(\d+)-(\d+)-(\d+)-(\d+)\.[a-z0-9-]+\.pod\." + re.escape(plan.CLUSTER_DOMAIN) + "$")


class DnsFormatError(ValueError):
    """A message the lab cannot read."""


@dataclass(frozen=True)
class Message:
    """The parts of a query or an answer that the lab looks at."""

    id: int
    name: str
    qtype: int = TYPE_A
    response: bool = False
    rcode: int = NOERROR
    addresses: tuple[str, ...] = field(default=())

    @property
    def rcode_name(self) -> str:
        return RCODES.get(self.rcode, str(self.rcode))


def _encode_name(name: str) -> bytes:
    out = b""
    for label in name.rstrip(".").split("."):
        raw = label.encode("ascii")
        if not 0 < len(raw) < 64:
            raise DnsFormatError(f"bad label {label!r} in {name!r}")
        out += bytes([len(raw)]) + raw
    return out + b"\0"


def _decode_name(data: bytes, offset: int) -> tuple[str, int]:
    """The name at offset (following compression pointers) and the offset after it."""
    labels, end, hops = [], None, 0
    while True:
        if offset >= len(data):
            raise DnsFormatError("name runs past the message")
        length = data[offset]
        if length & 0xC0 == 0xC0:
            if offset + 1 >= len(data) or hops > 16:
                raise DnsFormatError("bad compression pointer")
            end = offset + 2 if end is None else end
            offset, hops = (length & 0x3F) << 8 | data[offset + 1], hops + 1
            continue
        if length == 0:
            return ".".join(labels).lower(), (offset + 1 if end is None else end)
        labels.append(data[offset + 1:offset + 1 + length].decode("ascii", "replace"))
        offset += 1 + length


def query(name: str, id: int, qtype: int = TYPE_A) -> bytes:
    """A recursive query for one name."""
    return _HEADER.pack(id, _RD, 1, 0, 0, 0) + _encode_name(name) + struct.pack("!HH", qtype, CLASS_IN)


def parse(data: bytes) -> Message:
    """Header, first question and the A records of a query or an answer."""
    if len(data) < _HEADER.size:
        raise DnsFormatError(f"{len(data)} bytes is shorter than a DNS header")
    id, flags, qdcount, ancount, _, _ = _HEADER.unpack_from(data)
    if qdcount != 1:
        raise DnsFormatError(f"{qdcount} questions (the lab asks one at a time)")
    name, offset = _decode_name(data, _HEADER.size)
    if offset + 4 > len(data):
        raise DnsFormatError("question runs past the message")
    qtype, _ = struct.unpack_from("!HH", data, offset)
    offset += 4
    addresses = []
    for _ in range(ancount):
        _, offset = _decode_name(data, offset)
        if offset + 10 > len(data):
            raise DnsFormatError("answer runs past the message")
        rtype, _, _, length = struct.unpack_from("!HHIH", data, offset)
        offset += 10
        if rtype == TYPE_A and length == 4:
            addresses.append(socket.inet_ntoa(data[offset:offset + 4]))
        offset += length
    return Message(id, name, qtype, bool(flags & _QR), flags & 0xF, tuple(addresses))


def describe(message: bytes) -> dict:
    """{"name", "rcode", "answers"} of a message, for a log line; what cannot be read is None."""
    try:
        m = parse(message)
    except DnsFormatError:
        rcode = message[3] & 0xF if len(message) >= 4 else None
        return {"name": None, "rcode": RCODES.get(rcode, rcode), "answers": []}
    return {"name": m.name, "rcode": m.rcode_name, "answers": list(m.addresses)}


def answer(request: bytes, resolve, ttl: int) -> bytes:
    """The answer to `request`: `resolve(name)` gives its address, or None (NXDOMAIN).

    A known name asked for another type than A gets no records (NODATA), as from a
    server that has only A records; a message that cannot be read gets FORMERR.
    """
    try:
        q = parse(request)
    except DnsFormatError:
        return error(request, FORMERR)
    address = resolve(q.name)
    rcode = NXDOMAIN if address is None else NOERROR
    records = b""
    if address is not None and q.qtype == TYPE_A:
        records = b"\xc0\x0c" + struct.pack("!HHIH", TYPE_A, CLASS_IN, ttl, 4) + socket.inet_aton(address)
    flags = _QR | _AA | _RD | _RA | rcode
    question = _encode_name(q.name) + struct.pack("!HH", q.qtype, CLASS_IN)
    return _HEADER.pack(q.id, flags, 1, 1 if records else 0, 0, 0) + question + records


def error(request: bytes, rcode: int) -> bytes:
    """An answer with no question and no records: FORMERR for what cannot be read, SERVFAIL
    when the upstream did not answer."""
    id = struct.unpack_from("!H", request)[0] if len(request) >= 2 else 0
    return _HEADER.pack(id, _QR | _RD | _RA | rcode, 0, 0, 0, 0)


def frame(message: bytes) -> bytes:
    """A message as TCP carries it: its length first."""
    return struct.pack("!H", len(message)) + message


def unframe(data: bytes) -> bytes:
    """The first whole message of a TCP stream's bytes."""
    if len(data) < 2 or len(data) < 2 + struct.unpack_from("!H", data)[0]:
        raise DnsFormatError(f"a TCP DNS stream of {len(data)} bytes holds no whole message")
    return data[2:2 + struct.unpack_from("!H", data)[0]]


# -- the names each server knows ---------------------------------------------------------

def service_names(services=plan.SERVICES) -> dict[str, str]:
    """Every Service's FQDN -> its VIP: what istiod sends pilot-agent for its name table."""
    return {s.fqdn: s.vip for s in services}


def cluster_resolver(services=plan.SERVICES) -> "Resolver":
    """kube-dns: the Services, and pod names a-b-c-d.NAMESPACE.pod.cluster.local as CoreDNS's
    `pods insecure` answers them (the address read from the name)."""
    return Resolver(service_names(services), pod_names=True)


@dataclass(frozen=True)
class Resolver:
    names: Mapping[str, str]
    pod_names: bool = False

    def __call__(self, name: str) -> str | None:
        name = name.lower().rstrip(".")
        if name in self.names:
            return self.names[name]
        m = _POD_NAME.match(name) if self.pod_names else None
        if m:
            try:
                return str(ipaddress.IPv4Address(".".join(m.groups())))
            except ValueError:
                return None
        return None


# -- serving -----------------------------------------------------------------------------

@dataclass(frozen=True)
class Request:
    """One query as a server received it."""

    data: bytes
    protocol: str  # "udp" | "tcp"
    peer: tuple[str, int]
    local: tuple[str, int]
    sock: socket.socket | None = None  # the TCP connection's socket (SO_ORIGINAL_DST); None for UDP


async def serve(handle, udp: tuple[tuple[str, int], ...], tcp: tuple[tuple[str, int], ...]) -> None:
    """Answer DNS on every UDP and TCP address with `await handle(Request) -> bytes`, forever.

    A UDP socket bound to one address answers from it; that is why kube-dns binds the
    resolver's address itself and pilot-agent 127.0.0.1 (a reply from another source
    would not match the client's conntrack entry, or its connected socket).
    """
    loop = asyncio.get_running_loop()

    class Datagrams(asyncio.DatagramProtocol):
        def __init__(self, local):
            self.local = local

        def connection_made(self, transport):
            self.transport = transport

        def datagram_received(self, data, peer):
            async def reply():
                self.transport.sendto(await handle(Request(data, "udp", peer, self.local)), peer)

            httpio.hold(loop.create_task(reply()))

    @httpio.held
    async def stream(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        sock = writer.get_extra_info("socket")
        peer, local = writer.get_extra_info("peername"), writer.get_extra_info("sockname")
        try:
            while True:
                size = await reader.readexactly(2)
                data = await reader.readexactly(struct.unpack("!H", size)[0])
                writer.write(frame(await handle(Request(data, "tcp", peer, local, sock))))
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    for address in udp:
        await loop.create_datagram_endpoint(lambda a=address: Datagrams(a), local_addr=address)
    servers = [await asyncio.start_server(stream, *address, backlog=128) for address in tcp]
    await asyncio.gather(*(s.serve_forever() for s in servers))
