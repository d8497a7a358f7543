"""The lab's workloads: the apps, a stub istiod, a Prometheus-like scraper, and the client.

Servers are child entry points (`run_*(config)`, forked by lab.processes); none of them
makes traffic on a timer, so a quiet lab stays quiet.  The client runs in the harness
process itself: its socket is made inside a pod with a chosen fs identity, which is all
`-m owner` looks at.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import time
from dataclasses import dataclass

from . import dns, netns, plan
from .sidecar import httpio
from .errors import LabError



def family_of(ip: str) -> int:
    return socket.AF_INET6 if ":" in ip else socket.AF_INET


def _append(fd: int, record: dict) -> None:
    os.write(fd, (json.dumps(record) + "\n").encode())  # one write on O_APPEND: whole lines


# -- app --------------------------------------------------------------------------------

@dataclass(frozen=True)
class AppConfig:
    pod: str
    port: int
    families: tuple[int, ...] = (4,)  # (4, 6): listen on IPv6 too


def run_app(config: AppConfig) -> None:
    """Any GET answers who asked and where: {"pod", "peer", "local", "path"}; /metrics counts requests."""
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
        server = await asyncio.start_server(httpio.server(route), [plan.WILDCARD[f] for f in config.families], config.port,
                                            backlog=1024)
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
        _append(fd, {"event": name, "peer": httpio.addr(writer.get_extra_info("peername")),
                     "local": httpio.addr(writer.get_extra_info("sockname")), "time": time.time()})

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
        _append(fd, {"protocol": req.protocol, "peer": httpio.addr(req.peer), "local": httpio.addr(req.local),
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
                    line["local"] = httpio.addr(sock.getsockname())
                    response = get(sock, path)
                line["status"], line["bytes"] = response.status, len(response.body.encode())
            except (OSError, RequestError) as e:
                line["error"] = str(e)
            _append(fd, line)
        signal.sigwait({signal.SIGUSR1})


# -- client -----------------------------------------------------------------------------

class RequestError(LabError):
    """A client request that did not get an HTTP answer; names the destination."""


@dataclass(frozen=True)
class Response:
    status: int
    body: str
    local: str  # the client socket's getsockname, "ip:port"
    peer: str  # its getpeername: the original destination, whatever NAT did

    def json(self):
        return json.loads(self.body)


def connect(ns: str, dst_ip: str, port: int, *, uid: int, gid: int,
            src_port: int | None = None, timeout: float = 2.0) -> socket.socket:
    """A TCP connection from pod namespace `ns`, owned (for xt_owner) by uid/gid."""
    where = f"{httpio.addr((dst_ip, port))} from {ns} as {uid}:{gid}"
    family = family_of(dst_ip)
    with netns.entered(ns), netns.fs_identity(uid, gid):
        sock = socket.socket(family, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        if src_port is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(("::" if family == socket.AF_INET6 else "0.0.0.0", src_port))
        sock.connect((dst_ip, port))
    except socket.timeout:
        sock.close()
        raise RequestError(f"connect to {where}: timed out after {timeout}s") from None
    except OSError as e:
        sock.close()
        raise RequestError(f"connect to {where}: {e.strerror or e}") from None
    return sock


def get(sock: socket.socket, path: str = "/") -> Response:
    """Send one HTTP/1.0 GET, half-close, read to EOF; the socket stays open for the caller."""
    local, peer = sock.getsockname(), sock.getpeername()
    where = f"GET http://{httpio.addr(peer)}{path}"
    try:
        sock.sendall(httpio.request_bytes(peer[0], peer[1], path))
        sock.shutdown(socket.SHUT_WR)
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
        if not chunks:
            raise RequestError(f"{where}: the connection closed with no answer")
        status, body = httpio.parse_response(b"".join(chunks))
    except socket.timeout:
        raise RequestError(f"{where}: no answer within {sock.gettimeout()}s") from None
    except (OSError, ValueError) as e:
        raise RequestError(f"{where}: {e}") from None
    return Response(status, body, httpio.addr(local), httpio.addr(peer))


def stream(ns: str, dst_ip: str, port: int, *, uid: int, gid: int, timeout: float = 2.0) -> Response:
    """Open a TCP stream (as pilot-agent opens its xDS stream), half-close, wait for the peer's close.

    For servers that speak no HTTP, such as istiod's 15012; status is 0 and body
    whatever the peer sent before closing.
    """
    with connect(ns, dst_ip, port, uid=uid, gid=gid, timeout=timeout) as sock:
        local, peer = httpio.addr(sock.getsockname()), httpio.addr(sock.getpeername())
        try:
            sock.shutdown(socket.SHUT_WR)
            chunks = []
            while chunk := sock.recv(65536):
                chunks.append(chunk)
        except OSError as e:
            raise RequestError(f"stream to {peer}: {e.strerror or e}") from None
        return Response(0, b"".join(chunks).decode(errors="replace"), local, peer)


def request(ns: str, dst_ip: str, port: int, *, uid: int, gid: int, path: str = "/",
            src_port: int | None = None, timeout: float = 2.0) -> Response:
    """GET http://dst_ip:port/path from pod namespace `ns` as uid/gid; the socket is closed after."""
    with connect(ns, dst_ip, port, uid=uid, gid=gid, src_port=src_port, timeout=timeout) as sock:
        return get(sock, path)


def dns_query(ns: str, dst_ip: str, port: int, name: str, *, transport: str, uid: int, gid: int,
              src_port: int | None = None, timeout: float = 2.0) -> Response:
    """Ask `name`'s A record of dst_ip:port over UDP (one datagram) or TCP (length-prefixed), as
    a resolver library does, from pod namespace `ns` as uid/gid.

    The UDP socket is connected, as glibc's is: the kernel then takes only an answer from
    dst_ip:port, so an answer reaches the app only if conntrack gave it back the address it
    asked.  status is the answer's RCODE; body {"name", "rcode", "answers"} as JSON.
    """
    kind = socket.SOCK_DGRAM if transport == "udp" else socket.SOCK_STREAM
    where = f"DNS {name} over {transport} to {dst_ip}:{port} from {ns} as {uid}:{gid}"
    with netns.entered(ns), netns.fs_identity(uid, gid):
        sock = socket.socket(socket.AF_INET, kind)
    query = dns.query(name, id=int.from_bytes(os.urandom(2), "big"))
    with sock:
        sock.settimeout(timeout)
        try:
            if src_port is not None:
                sock.bind(("0.0.0.0", src_port))
            sock.connect((dst_ip, port))
            local, peer = httpio.addr(sock.getsockname()), httpio.addr(sock.getpeername())
            if transport == "udp":
                sock.send(query)
                reply = sock.recv(65535)
            else:
                sock.sendall(dns.frame(query))
                sock.shutdown(socket.SHUT_WR)
                chunks = []
                while chunk := sock.recv(65536):
                    chunks.append(chunk)
                reply = dns.unframe(b"".join(chunks))
            answer = dns.parse(reply)
        except socket.timeout:
            raise RequestError(f"{where}: no answer within {timeout}s") from None
        except (OSError, dns.DnsFormatError) as e:
            raise RequestError(f"{where}: {getattr(e, 'strerror', None) or e}") from None
    if not answer.response or answer.id != dns.parse(query).id:
        raise RequestError(f"{where}: the answer is not a response to the query")
    return Response(answer.rcode, json.dumps(dns.describe(reply)), local, peer)
