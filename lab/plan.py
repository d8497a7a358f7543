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
}

PROXY_UID = PROXY_GID = 1337  # the uid/gid the rules exempt (istio-iptables -u/-g)
APP_UID = APP_GID = 1000



@dataclass(frozen=True)
class Identity:
    """Who a process runs as: the container securityContext's runAsUser/runAsGroup and added capabilities."""

    uid: int
    gid: int
    capabilities: tuple[str, ...] = ()


# The istio-proxy container (Envoy and pilot-agent), by inbound interception mode, as Istio's
# injection template sets it: TPROXY needs NET_ADMIN for IP_TRANSPARENT and SO_MARK, and
# the template then runs the container as uid 0, gid 1337 (its iptables still say -u 1337).
SIDECAR_IDENTITY = {
    "REDIRECT": Identity(PROXY_UID, PROXY_GID),
    "TPROXY": Identity(0, PROXY_GID, ("NET_ADMIN",)),
}

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


@dataclass(frozen=True)
class Service:
    """A Kubernetes Service as Envoy's EDS sees it: VIP:port -> endpoint pod:port."""

    name: str
    vip: str
    port: int
    pod: str
    target_port: int


SERVICES = (
    Service("app", "10.96.0.80", 8080, "sidecar", Port.SIDECAR_APP),
    Service("remote", "10.96.0.90", 9080, "remote", Port.REMOTE_APP),
    Service("istiod", "10.96.0.12", 15012, "istiod", Port.ISTIOD),
)
