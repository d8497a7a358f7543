"""pilot-agent's DNS proxy: what ISTIO_OUTPUT_DNS redirects to when DNS capture is on.

It runs inside pilot-agent (uid/gid 1337), as Istio's does, on 127.0.0.1:15053 over UDP and
TCP.  A name in its name table (the Services istiod tells it of) is answered here; any
other name is forwarded to the pod's resolver (10.96.0.10:53) over the protocol it came
in on, from a new socket per query: as uid 1337, so raw ISTIO_OUTPUT_DNS puts the UDP
query in conntrack zone 1 and nat ISTIO_OUTPUT returns it at rule 4 (the uid rule).

Log: one JSON line per query, Envoy's access-log fields where they apply, so the path can
chain the legs: the downstream peer (the app's socket), the original destination (TCP
only: SO_ORIGINAL_DST has no UDP form, so a UDP query's is not recoverable), and the
upstream local/peer when it forwarded.  The line is written before the answer is sent, so
a client holding its answer finds the line in the file.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import struct
import time
from dataclasses import dataclass
from typing import Mapping

from .. import addr, dns, plan
from . import httpio
from .envoy import original_dst


@dataclass(frozen=True)
class Config:
    log: str  # pre-created by the harness, writable by uid 1337
    names: Mapping[str, str]  # the name table: FQDN -> address
    upstream: tuple[str, int] = (plan.RESOLVER, plan.Port.DNS)
    listen: tuple[str, int] = ("127.0.0.1", plan.Port.DNS_PROXY)
    timeout: float = 2.0
    ttl: int = 30  # Istio's DNS proxy answers with a 30 s TTL


class DnsProxy:
    def __init__(self, config: Config):
        self.config = config
        self.resolve = dns.Resolver(config.names)
        self.log_fd = os.open(config.log, os.O_WRONLY | os.O_APPEND)

    async def serve(self) -> None:
        await dns.serve(self.handle, udp=(self.config.listen,), tcp=(self.config.listen,))

    async def handle(self, req: dns.Request) -> bytes:
        t0 = time.monotonic()
        entry = {"listener": self.config.listen[1], "protocol": req.protocol,
                 "downstream_peer": addr.text(req.peer), "downstream_local": addr.text(req.local),
                 "original_dst": self._original_dst(req), "name": None, "answered_by": None,
                 "upstream_local": None, "upstream_peer": None, "rcode": None, "answers": [],
                 "start_time": time.time(), "duration_ms": 0.0, "error": None}
        try:
            entry["name"] = dns.parse(req.data).name
            if self.resolve(entry["name"]) is not None:
                entry["answered_by"] = "name table"
                reply = dns.answer(req.data, self.resolve, self.config.ttl)
            else:
                entry["answered_by"] = "upstream"
                reply = await self.forward(req, entry)
        except dns.DnsFormatError as e:
            entry["error"] = str(e)
            reply = dns.error(req.data, dns.FORMERR)
        except (OSError, asyncio.TimeoutError, asyncio.IncompleteReadError) as e:
            entry["error"] = f"upstream {addr.text(self.config.upstream)}: {getattr(e, 'strerror', None) or e!r}"
            reply = dns.error(req.data, dns.SERVFAIL)
        said = dns.describe(reply)
        entry["rcode"], entry["answers"] = said["rcode"], said["answers"]
        entry["duration_ms"] = round((time.monotonic() - t0) * 1000, 3)
        os.write(self.log_fd, (json.dumps(entry) + "\n").encode())
        return reply

    @staticmethod
    def _original_dst(req: dns.Request) -> str | None:
        if req.sock is None:
            return None
        try:
            return addr.text(original_dst(req.sock))
        except OSError:
            return None

    async def forward(self, req: dns.Request, entry: dict) -> bytes:
        """Ask the upstream resolver, over the protocol the query came in on."""
        upstream, timeout = self.config.upstream, self.config.timeout
        if req.protocol == "tcp":
            reader, writer = await asyncio.wait_for(asyncio.open_connection(*upstream), timeout)
            try:
                entry["upstream_local"] = addr.text(writer.get_extra_info("sockname"))
                entry["upstream_peer"] = addr.text(writer.get_extra_info("peername"))
                writer.write(dns.frame(req.data))
                await writer.drain()
                size = await asyncio.wait_for(reader.readexactly(2), timeout)
                return await asyncio.wait_for(reader.readexactly(struct.unpack("!H", size)[0]), timeout)
            finally:
                writer.close()
        loop = asyncio.get_running_loop()
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.setblocking(False)
            sock.connect(upstream)  # connected: only the resolver's answer is taken
            entry["upstream_local"] = addr.text(sock.getsockname())
            entry["upstream_peer"] = addr.text(upstream)
            await loop.sock_sendall(sock, req.data)
            return await asyncio.wait_for(loop.sock_recv(sock, 65535), timeout)

