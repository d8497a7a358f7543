"""What the sidecar's proxies do with a connection the rules sent them, as the lab's stubs do it.

  Envoy 15001 (outbound): the original destination (SO_ORIGINAL_DST: conntrack's original
      tuple); a Service VIP:port goes to its endpoint pod, anything else to the original
      destination; dialled from an unbound socket as the sidecar's identity.
  Envoy 15006 (inbound): the original destination, dialled from 127.0.0.6 (::6); in TPROXY
      mode from the client's own address, transparent, with mark 1337 (original_src); as
      Istio 1.9 and older (PodSpec envoy_inbound "localhost"), a port of the pod's own
      Services at 127.0.0.1:port from an unbound socket.
  Both close a connection addressed to their own port (Istio's blackhole filter chains).
  pilot-agent 15053 (DNS): answers a name in its table (the lab's Services) itself,
      forwards any other to 10.96.0.10:53 over the protocol it came in on, as its identity.
lab/sidecar/envoy.py and lab/sidecar/dnsproxy.py are the stubs; this is their routing, read
for the legs they open.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

from .. import dns, plan, podspec
from ..sidecar import envoy
from . import inet
from .packet import Owner
from .stack import Delivered
from .topology import Proxy, Topology

ORIGINAL_SRC_MARK = envoy.ORIGINAL_SRC_MARK  # Istio's original_src filter marks with 1337


@dataclass(frozen=True)
class Client:
    """A socket about to connect: where, as whom, bound to what, with which SO_MARK."""

    namespace: str
    owner: Owner
    address: int | None = None  # bound source address (None: the route's)
    mark: int = 0


@dataclass(frozen=True)
class Dial:
    client: Client
    family: int
    proto: str
    address: int
    port: int


@dataclass(frozen=True)
class Stop:
    """The proxy ends the flow itself: it answered (DNS), or it closed the connection."""

    answered: bool
    why: str = ""


@functools.cache
def _endpoints() -> dict[tuple[str, int], envoy.Endpoint]:
    return envoy.endpoints_from()


@functools.cache
def _names() -> dns.Resolver:
    return dns.Resolver(dns.service_names())


def closes(proxy: Proxy, delivered: Delivered) -> Stop | None:
    """What Envoy closes before it looks any further, a loop included (as the stub does): a
    connection with no original destination, or addressed to the listener's own port."""
    if proxy.role == "DNS":
        return None
    conn = delivered.packet.conn
    if conn is None:
        return Stop(answered=False, why="no original destination, closed")
    if conn.original_dport == proxy.port:
        return Stop(answered=False, why="blackhole, closed")
    return None


def relay(topology: Topology, proxy: Proxy, delivered: Delivered, query: str | None) -> Dial | Stop:
    """The proxy's next leg for the connection (or datagram) `delivered`; `query` is the DNS
    name asked, if any (none: the DNS proxy answers, as it does a name in its table or a
    query it cannot read)."""
    p = delivered.packet
    if proxy.role == "DNS":
        if query is None or _names()(query) is not None:
            return Stop(answered=True)
        resolver = inet.parse(plan.RESOLVER)[1]
        return Dial(Client("sidecar", topology.proxy_owner), 4, p.proto, resolver, plan.Port.DNS)
    closed = closes(proxy, delivered)
    if closed is not None:
        return closed
    dst, port = p.conn.original_dst, p.conn.original_dport
    if proxy.role == "Outbound":
        endpoint = _endpoints().get((inet.text(p.family, dst), port))
        if endpoint is not None:
            family, dst = inet.parse(endpoint.ip)
            return Dial(Client("sidecar", topology.proxy_owner), family, p.proto, dst, endpoint.port)
        return Dial(Client("sidecar", topology.proxy_owner), p.family, p.proto, dst, port)
    if topology.mode == "TPROXY":
        client = Client("sidecar", topology.proxy_owner, p.src, mark=ORIGINAL_SRC_MARK)
    elif topology.spec.envoy_inbound == podspec.LOCALHOST and port in envoy.pod_service_ports():
        # Istio 1.9 and older: a port of the pod's own Services goes to 127.0.0.1:port, unbound
        return Dial(Client("sidecar", topology.proxy_owner), p.family, p.proto,
                    inet.parse(plan.LOCALHOST[p.family])[1], port)
    else:
        source = plan.INBOUND_PASSTHROUGH_SOURCE if p.family == 4 else plan.INBOUND_PASSTHROUGH_SOURCE6
        client = Client("sidecar", topology.proxy_owner, inet.parse(source)[1])
    return Dial(client, p.family, p.proto, dst, port)
