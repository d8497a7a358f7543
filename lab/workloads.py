"""The lab's workloads: the apps, a stub istiod, kube-dns and a Prometheus-like scraper.

Each is a child entry point (`run_*(config)`, forked by lab.processes); none of them makes
traffic on a timer, so a quiet lab stays quiet.  The harness's own clients are lab.traffic.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import time
from dataclasses import dataclass

from . import addr, dns, plan
from .sidecar import httpio


def _append(fd: int, record: dict) -> None:
    os.write(fd, (json.dumps(record) + "\n").encode())  # one write on O_APPEND: whole lines


# -- app --------------------------------------------------------------------------------

@dataclass(frozen=True)
class AppConfig:
    pod: str
    port: int
    families: tuple[int, ...] = (4,)  # (4, 6): listen on IPv6 too
    localhost_only: bool = False  # listen on 127.0.0.1 (and ::1) only, as an app bound to localhost
    udp_echo: bool = False  # also echo UDP datagrams on the same port (a Service port of both protocols)

    @property
    def hosts(self) -> list[str]:
        return [(plan.LOCALHOST if self.localhost_only else plan.WILDCARD)[f] for f in self.families]


class _Echo(asyncio.DatagramProtocol):
    """Each datagram back to its sender, prefixed with who got it where: {"pod", "peer", "local"}."""

    def __init__(self, pod: str):
        self.pod = pod

    def connection_made(self, transport) -> None:
        self.transport = transport

    def datagram_received(self, data: bytes, peer) -> None:
        local = addr.text(self.transport.get_extra_info("sockname"))
        reply = {"pod": self.pod, "peer": addr.text(peer), "local": local, "echo": data.decode(errors="replace")}
        self.transport.sendto(json.dumps(reply).encode(), peer)


def run_app(config: AppConfig) -> None:
    """Any GET answers who asked and where: {"pod", "peer", "local", "path"}; /metrics counts requests.
    With udp_echo, a datagram to the same port is answered the same way."""
    served = 0

    async def route(req: httpio.Request) -> tuple[int, str, str]:
        nonlocal served
        served += 1
        if req.path == "/metrics":
            return 200, ("# TYPE app_requests_total counter\n"
                         f'app_requests_total{{pod="{config.pod}"}} {served}\n'), httpio.PROMETHEUS
        body = {"pod": config.pod, "peer": req.peer, "local": req.local, "path": req.path}
        return 200, json.dumps(body) + "\n", httpio.JSON

    async def main() -> None:
        server = await asyncio.start_server(httpio.server(route), config.hosts, config.port, backlog=1024)
        if config.udp_echo:
            loop = asyncio.get_running_loop()
            for host in config.hosts:
                sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_DGRAM)
                if ":" in host:
                    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)  # the IPv4 socket takes IPv4
                sock.bind((host, config.port))
                await loop.create_datagram_endpoint(lambda: _Echo(config.pod), sock=sock)
        await server.serve_forever()

    asyncio.run(main())


# -- istiod -----------------------------------------------------------------------------

@dataclass(frozen=True)
class IstiodConfig:
    log: str  # JSON lines: {"event": "connect"|"disconnect"|"drop", "peer", "local", "time"}
    port: int = plan.Port.ISTIOD
    families: tuple[int, ...] = (4,)


DROP_SIGNALS = {4: signal.SIGUSR1, 6: signal.SIGUSR2}  # istiod drops that family's streams


def run_istiod(config: IstiodConfig) -> None:
    """Accept and hold xDS streams, send nothing; SIGUSR1 closes every IPv4 stream, SIGUSR2
    every IPv6 one (to test re-dial, one family at a time)."""
    fd = os.open(config.log, os.O_WRONLY | os.O_APPEND)
    streams: set[asyncio.StreamWriter] = set()

    def event(name: str, writer: asyncio.StreamWriter) -> None:
        _append(fd, {"event": name, "peer": addr.text(writer.get_extra_info("peername")),
                     "local": addr.text(writer.get_extra_info("sockname")), "time": time.time()})

    @httpio.held
    async def hold(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        event("connect", writer)
        streams.add(writer)
        try:
            await httpio.until_closed(reader)
        finally:
            if writer in streams:
                streams.discard(writer)
                event("disconnect", writer)
            writer.close()

    def drop_all(family: int) -> None:
        for writer in list(streams):
            if writer.get_extra_info("socket").family == family:
                streams.discard(writer)
                event("drop", writer)
                writer.close()

    async def main() -> None:
        loop = asyncio.get_running_loop()
        for family, signum in DROP_SIGNALS.items():
            loop.add_signal_handler(signum, drop_all, socket.AF_INET6 if family == 6 else socket.AF_INET)
        server = await asyncio.start_server(hold, [plan.WILDCARD[f] for f in config.families], config.port, backlog=128)
        await server.serve_forever()

    asyncio.run(main())


# -- kube-dns ---------------------------------------------------------------------------

@dataclass(frozen=True)
class KubeDnsConfig:
    log: str  # JSON lines, one per query: {"protocol", "peer", "local", "name", "rcode", "answers", "time"}
    udp: tuple[tuple[str, int], ...]  # each address it answers from (the resolver's, its pod IP)
    tcp: tuple[tuple[str, int], ...]
    ttl: int = 5  # CoreDNS's kubernetes plugin default


def run_kube_dns(config: KubeDnsConfig) -> None:
    """The cluster's DNS server: Services and pod names (dns.cluster_resolver), NXDOMAIN otherwise."""
    fd = os.open(config.log, os.O_WRONLY | os.O_APPEND)
    resolve = dns.cluster_resolver()

    async def handle(req: dns.Request) -> bytes:
        reply = dns.answer(req.data, resolve, config.ttl)
        _append(fd, {"protocol": req.protocol, "peer": addr.text(req.peer), "local": addr.text(req.local),
                     **dns.describe(reply), "time": time.time()})
        return reply

    asyncio.run(dns.serve(handle, config.udp, config.tcp))


# -- Prometheus -------------------------------------------------------------------------

@dataclass(frozen=True)
class ScraperConfig:
    log: str  # JSON lines, one per target per round
    targets: tuple[tuple[str, int, str], ...]  # (ip, port, path)
    timeout: float = 2.0


def run_scraper(config: ScraperConfig) -> None:
    """Scrape every target once now, then once per SIGUSR1: no scrape interval, no background traffic."""
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR1})  # first: unblocked, SIGUSR1 would kill it
    fd = os.open(config.log, os.O_WRONLY | os.O_APPEND)
    round_no = 0
    while True:
        round_no += 1
        for ip, port, path in config.targets:
            line = {"round": round_no, "target": f"{ip}:{port}{path}", "status": None, "bytes": 0,
                    "local": None, "error": None, "time": time.time()}
            try:
                with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
                    sock.settimeout(config.timeout)
                    sock.connect((ip, port))  # not create_connection: getaddrinfo would import the idna codec
                    line["local"] = addr.text(sock.getsockname())
                    sock.sendall(httpio.request_bytes(ip, port, path))
                    sock.shutdown(socket.SHUT_WR)
                    status, body = httpio.parse_response(_read_all(sock))
                line["status"], line["bytes"] = status, len(body.encode())
            except (OSError, ValueError) as e:
                line["error"] = str(e)
            _append(fd, line)
        signal.sigwait({signal.SIGUSR1})


def _read_all(sock: socket.socket) -> bytes:
    chunks = []
    while chunk := sock.recv(65536):
        chunks.append(chunk)
    return b"".join(chunks)
