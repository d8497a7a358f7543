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
