"""The address and port plan every lab shares.

Each lab has its own fabric namespace, so the same plan serves all of them
side by side: nothing here is ever configured in the host namespace.
"""

from __future__ import annotations

from dataclasses import dataclass

POD_PREFIX = 24
GATEWAY = "10.244.0.1"
POD_SUBNET = "10.244.0.0/24"
SERVICE_RANGE = "10.96.0.0/16"

PODS = {
    "sidecar": "10.244.0.10",  # the article's "Local Pod": app + Envoy + pilot-agent
    "remote": "10.244.0.20",
    "istiod": "10.244.0.30",
    "prometheus": "10.244.0.40",
    "kube-dns": "10.244.0.50",  # the cluster's DNS server (CoreDNS's role), at the resolver address
}

PROXY_UID = PROXY_GID = 1337  # Envoy and pilot-agent
APP_UID = APP_GID = 1000

INBOUND_PASSTHROUGH_SOURCE = "127.0.0.6"  # Envoy binds it for inbound, since Istio 1.10


class Port:
    OUTBOUND = 15001
    INBOUND = 15006
    ADMIN = 15000
    STATS = 15090
    AGENT = 15020
    READY = 15021
    ISTIOD = 15012
    SIDECAR_APP = 8080
    REMOTE_APP = 9080
    DNS = 53
    DNS_PROXY = 15053  # pilot-agent's DNS proxy, when DNS capture is on


@dataclass(frozen=True)
class Service:
    """A Kubernetes Service as Envoy's EDS sees it: VIP:port -> endpoint pod:port."""

    name: str
    vip: str
    port: int
    pod: str
    target_port: int
    namespace: str = "default"

    @property
    def fqdn(self) -> str:
        return f"{self.name}.{self.namespace}.svc.{CLUSTER_DOMAIN}"


CLUSTER_DOMAIN = "cluster.local"
RESOLVER = "10.96.0.10"  # kube-dns's ClusterIP: every pod's resolv.conf nameserver

SERVICES = (
    Service("app", "10.96.0.80", 8080, "sidecar", Port.SIDECAR_APP),
    Service("remote", "10.96.0.90", 9080, "remote", Port.REMOTE_APP),
    Service("istiod", "10.96.0.12", 15012, "istiod", Port.ISTIOD),
    Service("kube-dns", RESOLVER, Port.DNS, "kube-dns", Port.DNS, namespace="kube-system"),
)

# VIPs the node routes to a pod that holds the address itself.  The lab has no kube-proxy:
# Envoy resolves the other VIPs (as EDS does), but DNS to the resolver leaves the pod
# unproxied whenever DNS capture is off, and pilot-agent forwards to it, so kube-dns holds
# 10.96.0.10 and the node forwards to it (forwarding in the lab's node namespace only).
HELD_VIPS = {"kube-dns": (RESOLVER,)}

# Per-namespace sysctls a pod is given, as a pod's securityContext.sysctls would set them:
# kube-dns binds port 53 as a user with no capabilities (CoreDNS adds NET_BIND_SERVICE).
POD_SYSCTLS = {"kube-dns": {"net/ipv4/ip_unprivileged_port_start": "53"}}
