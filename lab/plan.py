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

# What the article's notation calls each pod.
POD_LABELS = {"sidecar": "Local Pod", "remote": "Remote Pod", "istiod": "Istiod", "prometheus": "Prometheus",
              "kube-dns": "kube-dns"}

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
ISTIO_PROXY = "istio-proxy"  # the sidecar container: Envoy and pilot-agent
SIDECAR_IDENTITY = {
    "REDIRECT": Identity(PROXY_UID, PROXY_GID),
    "TPROXY": Identity(0, PROXY_GID, ("NET_ADMIN",)),
}

INBOUND_PASSTHROUGH_SOURCE = "127.0.0.6"  # Envoy binds it for inbound, since Istio 1.10

# IPv6, for dual-stack labs: a ULA plan mirroring the IPv4 one, address for address
# (10.244.0.10 -> fd00:10:244::10), so a scenario's IPv4 addresses have IPv6 twins.
POD_PREFIX6 = 64
GATEWAY6 = "fd00:10:244::1"
POD_SUBNET6 = "fd00:10:244::/64"
SERVICE_RANGE6 = "fd00:10:96::/112"
PODS6 = {
    "sidecar": "fd00:10:244::10",
    "remote": "fd00:10:244::20",
    "istiod": "fd00:10:244::30",
    "prometheus": "fd00:10:244::40",
    "kube-dns": "fd00:10:244::50",
}
INBOUND_PASSTHROUGH_SOURCE6 = "::6"  # Istio's InboundPassthroughBindIpv6, on the sidecar's lo as ::6/128
LOCALHOST = {4: "127.0.0.1", 6: "::1"}
WILDCARD = {4: "0.0.0.0", 6: "::"}  # what a listener binds for any address of a family


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
    TUNNEL = 15008  # HBONE: ISTIO_INBOUND returns it first from Istio 1.7 on


# TPROXY mode's marks (istio-iptables' defaults): an inbound packet diverted to Envoy, whose
# mark is also the policy route's fwmark and the one Envoy's original_src sets; and Envoy's own
# connections to the app over lo.
INBOUND_MARK = 1337
OUTBOUND_MARK = 1338


@dataclass(frozen=True)
class Service:
    """A Kubernetes Service as Envoy's EDS sees it: VIP:port -> endpoint pod:port."""

    name: str
    vip: str
    port: int
    pod: str
    target_port: int
    vip6: str  # the Service's IPv6 ClusterIP in a dual-stack lab
    namespace: str = "default"
    protocols: tuple[str, ...] = ("tcp",)  # the Service port's protocols (kube-proxy writes a rule for each)

    @property
    def fqdn(self) -> str:
        return f"{self.name}.{self.namespace}.svc.{CLUSTER_DOMAIN}"


CLUSTER_DOMAIN = "cluster.local"
RESOLVER = "10.96.0.10"  # kube-dns's ClusterIP: every pod's resolv.conf nameserver

SERVICES = (
    Service("app", "10.96.0.80", 8080, "sidecar", Port.SIDECAR_APP, "fd00:10:96::80"),
    Service("remote", "10.96.0.90", 9080, "remote", Port.REMOTE_APP, "fd00:10:96::90", protocols=("tcp", "udp")),
    Service("istiod", "10.96.0.12", 15012, "istiod", Port.ISTIOD, "fd00:10:96::12"),
    Service("kube-dns", RESOLVER, Port.DNS, "kube-dns", Port.DNS, "fd00:10:96::a", namespace="kube-system",
            protocols=("udp", "tcp")),
)

# VIPs the node routes to a pod that holds the address itself: kube-dns holds the resolver's
# address 10.96.0.10 and answers from it, and the node forwards it there (forwarding in the
# lab's node namespace only).  Every other Service VIP is DNATed by the node's kube-proxy
# rules (lab/rules/kubeproxy.py) to its endpoint, as in a cluster; Envoy resolves them
# itself (as EDS does) for the traffic it captures.
HELD_VIPS = {"kube-dns": (RESOLVER,)}
NODE = "node"  # the namespace that plays the node: the bridge, the gateway, kube-proxy's rules
MASQUERADE_MARK = 0x4000  # kube-proxy's KUBE-MARK-MASQ bit: hairpin traffic is masqueraded

# A KubeVirt VM in the sidecar pod (kubevirtInterfaces): virt-launcher's masquerade binding
# gives the pod an interface facing the VM (k6t-eth0, 10.0.2.1/24) and the VM 10.0.2.2; the
# lab makes the VM a namespace of its own on a veth whose other end is that interface.
VM = "vm"
VM_INTERFACE = "k6t-eth0"
VM_PREFIX, VM_GATEWAY, VM_ADDRESS = 24, "10.0.2.1", "10.0.2.2"
VM_PREFIX6, VM_GATEWAY6, VM_ADDRESS6 = 120, "fd10:0:2::1", "fd10:0:2::2"

# Per-namespace sysctls a pod is given, as a pod's securityContext.sysctls would set them:
# kube-dns binds port 53 as a user with no capabilities (CoreDNS adds NET_BIND_SERVICE).
POD_SYSCTLS = {"kube-dns": {"net/ipv4/ip_unprivileged_port_start": "53"}}


def icmp_sysctls(ipv6: bool) -> dict[str, str]:
    """Every namespace of a lab sends each ICMP error it owes: by default the kernel limits the
    errors sent to one peer (a burst of 6, then one a second: icmp_ratelimit, measured), so a
    datagram to a closed port was refused or met silence depending on the flows before it.
    The node's "no route" errors keep their own limit (route.error_cost: host-wide, left alone)."""
    return {"net/ipv4/icmp_ratelimit": "0", **({"net/ipv6/icmp/ratelimit": "0"} if ipv6 else {})}


def service_at(address: str, port: int) -> Service | None:
    """The Service whose VIP (either family) and port these are."""
    return next((s for s in SERVICES if address in (s.vip, s.vip6) and s.port == port), None)


def pod_at(address: str) -> str | None:
    """The pod holding this address (either family)."""
    return next((pod for pods in (PODS, PODS6) for pod, ip in pods.items() if ip == address), None)


def ipv6_twin(address: str) -> str:
    """The IPv6 address that plays an IPv4 one's part: a pod's, a VIP's, or localhost's.

    Only these have twins: IPv6 has one loopback address (::1), not a /8.
    """
    twins = {PODS[pod]: PODS6[pod] for pod in PODS}
    twins |= {s.vip: s.vip6 for s in SERVICES}
    twins |= {LOCALHOST[4]: LOCALHOST[6], INBOUND_PASSTHROUGH_SOURCE: INBOUND_PASSTHROUGH_SOURCE6}
    try:
        return twins[address]
    except KeyError:
        raise ValueError(f"{address} has no IPv6 twin in the lab's plan") from None
