"""A stub Envoy: the two transparent proxies iptables redirects to, plus the ports around them.

One asyncio process, uid/gid 1337 in the sidecar pod:
  15001 outbound  original destination via SO_ORIGINAL_DST; a Service VIP:port goes to its
                  endpoint (as EDS would), anything else to the original destination
                  (PassthroughCluster); the upstream socket is Envoy's own, unbound.
  15006 inbound   connects to the original destination from 127.0.0.6, as Envoy's inbound
                  passthrough does since Istio 1.10, so ISTIO_OUTPUT rule 1 lets it out.
                  As an Istio 1.9 or older Envoy (inbound="localhost"), a port of one of the
                  pod's Services goes to 127.0.0.1:port instead, from an unbound socket, as
                  those releases' inbound clusters did; other ports still pass through.
                  In TPROXY mode both listeners are transparent (IP_TRANSPARENT), and the
                  inbound side keeps the client's address instead (Istio's original_src
                  listener filter): it binds the client's IP and marks the socket 1337, so
                  the app's replies are routed back to Envoy by the fwmark rule.
  15000 admin     127.0.0.1 only: /ready, /stats, /stats/prometheus
  15090 stats     /stats/prometheus    15021 readiness: /healthz/ready
In a dual-stack pod every port also listens on IPv6 (:: or ::1, a socket of its own beside
the IPv4 one, as Istio's listeners take an additional address); an IPv6 connection's
original destination comes from IP6T_SO_ORIGINAL_DST, a Service's IPv6 VIP goes to the
endpoint's IPv6 address, and the inbound passthrough binds ::6 (InboundPassthroughClusterIpv6).
Real Envoy serves 15090 and 15021 by proxying to its admin port and to pilot-agent over
localhost; the stub answers them itself, so a scrape makes no extra localhost connection.

One listener for both directions (Istio 1.0 and 1.1, and 1.5 with listed inbound ports: the
rules send inbound and outbound traffic to the same port, `one_listener`): as Envoy then did
(use_original_dst hands the connection to the listener of its original destination), a
connection to the pod's own address is inbound, any other outbound; the access log says
which ("role").

A connection that comes back into a side of Envoy it already passed (a rule sent one of
Envoy's own upstream connections, or one of theirs, to a side of Envoy the flow had
passed: istio/istio#23369) is a loop (the outbound side's upstream reaching the inbound
side is not: that is type 4): real Envoy would dial again and again until it ran out of
sockets; the stub logs it ("loop": true) and closes it, so the loop is seen exactly twice
and stops.  Each upstream socket remembers the sides its flow passed.  A failed upstream connection is logged with its local
address, taken when the SYN left, so the leg that died can be followed.

Access log: one JSON line per proxied connection, appended with one write(2) to an O_APPEND
file when the upstream ends its side (EOF), before that EOF is passed to the downstream; or,
for a connection that fails, before the downstream socket is closed.  So any client that
reads to EOF finds its line in the file by the time it sees EOF, whether or not it
half-closed, and through both proxies in turn (15006's line is written before 15001 sees
EOF).  Bytes the downstream sends after the upstream has finished are forwarded, not counted.
"""

from __future__ import annotations

import asyncio
import errno
import json
import os
import resource
import socket
import time
from collections import Counter
from dataclasses import dataclass

from .. import addr, plan
from . import httpio

SO_ORIGINAL_DST = 80  # linux/netfilter_ipv4.h, level SOL_IP
IP6T_SO_ORIGINAL_DST = 80  # linux/netfilter_ipv6/ip6_tables.h, level SOL_IPV6
SOL_IPV6 = getattr(socket, "SOL_IPV6", 41)
IP_TRANSPARENT = 19  # linux/in.h: bind non-local addresses, accept TPROXY'd connections
IPV6_TRANSPARENT = 75  # linux/in6.h: the same for IPv6
TRANSPARENT = {socket.AF_INET: (socket.SOL_IP, IP_TRANSPARENT), socket.AF_INET6: (SOL_IPV6, IPV6_TRANSPARENT)}
ORIGINAL_SRC_MARK = plan.INBOUND_MARK  # Istio's original_src filter: mark = 1337, TPROXY's own
BACKLOG = 1024
PASSTHROUGH = "PassthroughCluster"
INBOUND_PASSTHROUGH = "InboundPassthroughClusterIpv4"
INBOUND_PASSTHROUGH6 = "InboundPassthroughClusterIpv6"
OUTBOUND, INBOUND = "Outbound", "Inbound"  # Envoy's two sides, as the path names them


@dataclass(frozen=True)
class Endpoint:
    ip: str
    port: int
    cluster: str


@dataclass(frozen=True)
class Config:
    access_log: str  # pre-created by the harness, writable by uid 1337
    endpoints: dict[tuple[str, int], Endpoint]  # Service VIP:port -> endpoint, as EDS gives it
    # Shorter than the harness's clients wait (2 s): a client whose upstream Envoy could not
    # reach (dropped, no route) hears Envoy close, after its access-log line, before it gives up.
    connect_timeout: float = 1.0
    inbound_mode: str = "REDIRECT"  # or "TPROXY": transparent listeners, the client's source kept
    families: tuple[int, ...] = (4,)  # (4, 6) in a dual-stack pod
    inbound: str = "original-dst"  # Istio 1.10 on; "localhost": 1.9's inbound clusters to 127.0.0.1
    service_ports: tuple[int, ...] = ()  # the pod's own Services' target ports (inbound="localhost")
    one_listener: bool = False  # the rules send inbound traffic to the outbound port too (Istio <= 1.1)
    pod_addresses: tuple[str, ...] = (plan.PODS["sidecar"], plan.PODS6["sidecar"])  # inbound, with one_listener

    @property
    def transparent(self) -> bool:
        return self.inbound_mode == "TPROXY"


def endpoints_from(services=plan.SERVICES, pods=plan.PODS, pods6=plan.PODS6) -> dict[tuple[str, int], Endpoint]:
    """Each VIP:port, of either family, to its endpoint pod's address of the same family."""
    out = {}
    for s in services:
        cluster = f"outbound|{s.port}||{s.fqdn}"
        out[s.vip, s.port] = Endpoint(pods[s.pod], s.target_port, cluster)
        out[s.vip6, s.port] = Endpoint(pods6[s.pod], s.target_port, cluster)
    return out


def original_dst(sock) -> tuple[str, int]:
    """Where the client meant to go before REDIRECT rewrote it (struct sockaddr_in, or
    struct sockaddr_in6 for an IPv6 connection: family, port, flowinfo, address, scope)."""
    if sock.family == socket.AF_INET6:
        raw = sock.getsockopt(SOL_IPV6, IP6T_SO_ORIGINAL_DST, 28)
        return socket.inet_ntop(socket.AF_INET6, raw[8:24]), int.from_bytes(raw[2:4], "big")
    raw = sock.getsockopt(socket.SOL_IP, SO_ORIGINAL_DST, 16)
    return socket.inet_ntoa(raw[4:8]), int.from_bytes(raw[2:4], "big")


class Stats:
    """Envoy-style counters, keyed (scope, name, stat): ("listener", "0.0.0.0_15001", "downstream_cx_total")."""

    GAUGES = {"downstream_cx_active"}

    def __init__(self, listeners: list[int]):
        self.values: Counter[tuple[str, str, str]] = Counter()
        for port in listeners:  # listeners are known up front: their zeros are worth showing
            for stat in ("downstream_cx_total", "downstream_cx_active"):
                self.values["listener", f"0.0.0.0_{port}", stat] += 0

    def add(self, scope: str, name: str, stat: str, n: int = 1) -> None:
        self.values[scope, name, stat] += n

    def text(self) -> str:
        return "".join(f"{scope}.{name}.{stat}: {v}\n" for (scope, name, stat), v in sorted(self.values.items()))

    def prometheus(self) -> str:
        lines, typed = ["# TYPE envoy_server_live gauge", "envoy_server_live 1"], set()
        for (scope, name, stat), v in sorted(self.values.items(), key=lambda kv: (kv[0][0], kv[0][2], kv[0][1])):
            metric = f"envoy_{scope}_{stat}"
            if metric not in typed:
                typed.add(metric)
                lines.append(f"# TYPE {metric} {'gauge' if stat in self.GAUGES else 'counter'}")
            lines.append(f'{metric}{{{scope}="{name}"}} {v}')
        return "\n".join(lines) + "\n"


INBOUND_MODES = ("original-dst", "localhost")


def pod_service_ports(pod: str = "sidecar", services=plan.SERVICES) -> tuple[int, ...]:
    """The target ports of the Services whose endpoint is the pod: its inbound clusters up to 1.9."""
    return tuple(sorted({s.target_port for s in services if s.pod == pod}))


class Envoy:
    def __init__(self, config: Config):
        self.config = config
        self.stats = Stats([plan.Port.OUTBOUND, plan.Port.INBOUND, plan.Port.STATS, plan.Port.READY])
        self.log_fd = os.open(config.access_log, os.O_WRONLY | os.O_APPEND)
        # Local addresses of Envoy's live upstream sockets -> the sides (Outbound, Inbound) their
        # flow passed: one of them accepted by a side it passed is a loop (outbound's upstream
        # reaching inbound is type 4).
        self.upstreams: dict[tuple[str, int], frozenset[str]] = {}

    async def serve(self) -> None:
        P = plan.Port
        anywhere = [plan.WILDCARD[f] for f in self.config.families]  # one socket per family (asyncio sets IPV6_V6ONLY)
        localhost = [plan.LOCALHOST[f] for f in self.config.families]
        servers = [
            *[await asyncio.start_server(lambda r, w, port=port: self.proxy(port, r, w), sock=self.listener(port, family))
              for port in (P.OUTBOUND, P.INBOUND) for family in self.config.families],
            await asyncio.start_server(httpio.server(self.admin), localhost, P.ADMIN, backlog=BACKLOG),
            await asyncio.start_server(self.counted(P.STATS, self.stats_port), anywhere, P.STATS, backlog=BACKLOG),
            await asyncio.start_server(self.counted(P.READY, self.ready_port), anywhere, P.READY, backlog=BACKLOG),
        ]
        await asyncio.gather(*(s.serve_forever() for s in servers))

    def listener(self, port: int, family: int = 4) -> socket.socket:
        """A proxy's listening socket on 0.0.0.0 (or :: for family 6, IPv6 only), transparent
        in TPROXY mode (as Istio sets `transparent: true` on both virtual listeners)."""
        af, host = (socket.AF_INET6, "::") if family == 6 else (socket.AF_INET, "0.0.0.0")
        sock = socket.socket(af, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if af == socket.AF_INET6:
            sock.setsockopt(SOL_IPV6, socket.IPV6_V6ONLY, 1)  # the IPv4 socket takes IPv4
        if self.config.transparent:
            sock.setsockopt(*TRANSPARENT[af], 1)
        try:
            sock.bind((host, port))
        except OSError as e:  # the port in the message, as asyncio's own servers say it
            sock.close()
            raise OSError(e.errno, f"error while attempting to bind on address ({host!r}, {port}): "
                                   f"{e.strerror.lower()}") from None
        sock.listen(BACKLOG)
        return sock

    # -- the HTTP ports -----------------------------------------------------------------

    def counted(self, port: int, route: httpio.Route):
        serve = httpio.server(route)

        @httpio.held
        async def counted_serve(reader, writer):
            name = f"0.0.0.0_{port}"
            self.stats.add("listener", name, "downstream_cx_total")
            self.stats.add("listener", name, "downstream_cx_active")
            try:
                await serve(reader, writer)
            finally:
                self.stats.add("listener", name, "downstream_cx_active", -1)

        return counted_serve

    async def admin(self, req: httpio.Request) -> tuple[int, str, str]:
        if req.path == "/ready":
            return 200, "LIVE\n", httpio.TEXT
        if req.path == "/stats":
            return 200, self.stats.text(), httpio.TEXT
        if req.path == "/stats/prometheus":
            return 200, self.stats.prometheus(), httpio.PROMETHEUS
        return 404, "admin: /ready /stats /stats/prometheus\n", httpio.TEXT

    async def stats_port(self, req: httpio.Request) -> tuple[int, str, str]:
        if req.path == "/stats/prometheus":
            return 200, self.stats.prometheus(), httpio.PROMETHEUS
        return 404, "", httpio.TEXT

    async def ready_port(self, req: httpio.Request) -> tuple[int, str, str]:
        return (200, "", httpio.TEXT) if req.path == "/healthz/ready" else (404, "", httpio.TEXT)

    # -- the proxies --------------------------------------------------------------------

    def role(self, listener: int, dst: tuple[str, int]) -> str:
        """Which side of Envoy takes a connection: its listener's, or with one listener for both,
        the side its original destination names (the pod's own address: inbound)."""
        if self.config.one_listener and listener == plan.Port.OUTBOUND:
            return INBOUND if dst[0] in self.config.pod_addresses else OUTBOUND
        return INBOUND if listener == plan.Port.INBOUND else OUTBOUND

    def route(self, listener: int, dst: tuple[str, int], client: tuple[str, int]) -> tuple[Endpoint, tuple[str, int] | None]:
        """Upstream endpoint and source address for a connection's original destination."""
        if self.role(listener, dst) == INBOUND:
            six = ":" in dst[0]
            if self.config.inbound == "localhost" and dst[1] in self.config.service_ports and not self.config.transparent:
                cluster = f"inbound|{dst[1]}||"  # 1.9 and older: the app on localhost, from an unbound socket
                return Endpoint(plan.LOCALHOST[6 if six else 4], dst[1], cluster), None
            passthrough = plan.INBOUND_PASSTHROUGH_SOURCE6 if six else plan.INBOUND_PASSTHROUGH_SOURCE
            source = client[0] if self.config.transparent else passthrough
            return Endpoint(*dst, INBOUND_PASSTHROUGH6 if six else INBOUND_PASSTHROUGH), (source, 0)
        return self.config.endpoints.get(dst, Endpoint(*dst, PASSTHROUGH)), None

    def upstream_socket(self, role: str, source: tuple[str, int] | None,
                        af: int = socket.AF_INET) -> socket.socket:
        """The upstream socket of a side, bound to `source` if given; original_src's options
        on the inbound side in TPROXY mode."""
        sock = socket.socket(af, socket.SOCK_STREAM)
        sock.setblocking(False)
        try:
            if role == INBOUND and self.config.transparent:
                sock.setsockopt(*TRANSPARENT[af], 1)  # the client's address is not ours
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, ORIGINAL_SRC_MARK)
            if source is not None:
                sock.bind(source)
        except BaseException:
            sock.close()
            raise
        return sock

    async def proxy(self, listener: int, down_r: asyncio.StreamReader, down_w: asyncio.StreamWriter) -> None:
        httpio.hold(asyncio.current_task())
        t0 = time.monotonic()
        name = f"0.0.0.0_{listener}"
        entry = {"listener": listener,
                 "downstream_peer": addr.text(down_w.get_extra_info("peername")),
                 "downstream_local": addr.text(down_w.get_extra_info("sockname")),
                 "original_dst": None, "upstream_cluster": None, "upstream_local": None, "upstream_peer": None,
                 "bytes_from_downstream": 0, "bytes_to_downstream": 0,
                 "start_time": time.time(), "duration_ms": 0.0, "error": None, "loop": False, "role": None}
        logged = False

        def log() -> None:
            nonlocal logged
            if not logged:
                logged = True
                entry["duration_ms"] = round((time.monotonic() - t0) * 1000, 3)
                os.write(self.log_fd, (json.dumps(entry) + "\n").encode())

        self.stats.add("listener", name, "downstream_cx_total")
        self.stats.add("listener", name, "downstream_cx_active")
        up_w = None
        try:
            try:
                dst = original_dst(down_w.get_extra_info("socket"))
            except OSError as e:
                raise ProxyError(f"no original destination: {e.strerror}") from None
            entry["original_dst"] = addr.text(dst)
            role = entry["role"] = self.role(listener, dst)
            if dst[1] == listener:  # Istio's virtual{Outbound,Inbound}-blackhole: never loop into ourselves
                raise ProxyError("blackhole: connection addressed to the proxy port itself")
            peer = down_w.get_extra_info("peername")
            passed = self.upstreams.get(tuple(peer[:2]), frozenset()) if peer is not None else frozenset()
            if role in passed:
                entry["loop"] = True
                raise ProxyError(f"loop: {addr.text(peer)} is Envoy's own upstream connection, sent back to "
                                 f"its {role.lower()} side at {listener}")
            endpoint, source = self.route(listener, dst, peer)
            entry["upstream_cluster"] = endpoint.cluster
            self.stats.add("cluster", endpoint.cluster, "upstream_cx_total")
            mine = (self.upstreams, passed | {role})
            try:
                sock = self.upstream_socket(role, source, socket.AF_INET6 if ":" in endpoint.ip else socket.AF_INET)
                up_r, up_w = await asyncio.wait_for(self.connect(sock, endpoint, entry, mine),
                                                    self.config.connect_timeout)
            except (OSError, asyncio.TimeoutError) as e:
                self.stats.add("cluster", endpoint.cluster, "upstream_cx_connect_fail")
                why = os.strerror(e.errno) if getattr(e, "errno", None) else "timeout"
                entry["upstream_peer"] = addr.text((endpoint.ip, endpoint.port))  # the leg that died
                raise ProxyError(f"upstream connect to {addr.text((endpoint.ip, endpoint.port))} failed: {why}") from None
            finally:
                self.upstreams.pop(_local(entry), None)
            entry["upstream_local"] = addr.text(up_w.get_extra_info("sockname"))
            entry["upstream_peer"] = addr.text(up_w.get_extra_info("peername"))
            local = tuple(up_w.get_extra_info("sockname")[:2])
            self.upstreams[local] = passed | {role}
            try:
                await self.pump(entry, endpoint.cluster, down_r, down_w, up_r, up_w, log)
            finally:
                self.upstreams.pop(local, None)
        except ProxyError as e:
            entry["error"] = str(e)
        finally:
            log()
            self.stats.add("listener", name, "downstream_cx_active", -1)
            if up_w is not None:
                up_w.close()
            down_w.close()

    async def connect(self, sock: socket.socket, endpoint: Endpoint, entry: dict, mine: tuple[dict, frozenset]):
        """Connect without blocking; the local address is logged (and known as ours, with the
        sides its flow passed) as soon as the SYN has left, so a connection that fails, or
        comes back to us, is still one leg."""
        loop = asyncio.get_running_loop()
        upstreams, passed = mine
        try:
            code = sock.connect_ex((endpoint.ip, endpoint.port))
            entry["upstream_local"] = addr.text(sock.getsockname())
            upstreams[tuple(sock.getsockname()[:2])] = passed
            if code not in (0, errno.EINPROGRESS):
                raise OSError(code, os.strerror(code))
            if code:
                ready = loop.create_future()
                loop.add_writer(sock.fileno(), lambda: ready.done() or ready.set_result(None))
                try:
                    await ready
                finally:
                    loop.remove_writer(sock.fileno())
                code = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                if code:
                    raise OSError(code, os.strerror(code))
        except BaseException:
            sock.close()
            raise
        return await asyncio.open_connection(sock=sock)

    async def pump(self, entry: dict, cluster: str, down_r, down_w, up_r, up_w, log) -> None:
        """Copy both ways, forwarding half-closes; `log` runs before the upstream's EOF is passed on."""

        async def copy(src: asyncio.StreamReader, dst: asyncio.StreamWriter, counter: str, cluster_stat: str,
                       before_eof=None) -> None:
            while data := await src.read(65536):
                entry[counter] += len(data)
                self.stats.add("cluster", cluster, cluster_stat, len(data))
                dst.write(data)
                await dst.drain()
            if before_eof:
                before_eof()
            dst.write_eof()

        upstream = httpio.hold(asyncio.create_task(copy(down_r, up_w, "bytes_from_downstream", "upstream_cx_tx_bytes_total")))
        downstream = httpio.hold(asyncio.create_task(copy(up_r, down_w, "bytes_to_downstream", "upstream_cx_rx_bytes_total", log)))
        finished, pending = await asyncio.wait({upstream, downstream}, return_when=asyncio.FIRST_EXCEPTION)
        failed = next((t for t in finished if t.exception()), None)
        if failed is not None:
            down_w.transport.abort()
            up_w.transport.abort()
            await asyncio.gather(*pending, return_exceptions=True)
            way = "downstream->upstream" if failed is upstream else "upstream->downstream"
            raise ProxyError(f"{way}: {failed.exception()!r}")


def _local(entry: dict) -> tuple[str, int] | None:
    local = entry.get("upstream_local")
    if not local:
        return None
    found = addr.Address.parse(local)
    return found.ip, found.port


class ProxyError(Exception):
    """Why a proxied connection ended badly; goes to the access log's "error"."""


def run(config: Config) -> None:
    """The child's entry point (netns.spawn calls it as uid/gid 1337 in the sidecar pod)."""
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # as Envoy's container does: many sockets
    asyncio.run(Envoy(config).serve())
