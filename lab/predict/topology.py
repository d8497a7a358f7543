"""The lab as predict sees it: the namespaces lab.world builds, the sockets lab.processes
opens in them, and the sidecar's rules with the routing TPROXY adds.

    node:      br0 10.244.0.1/24, forwards 10.96.0.10 to kube-dns; kube-proxy's rules in its
               nat table (lab/rules/kubeproxy.py) DNAT every other Service VIP:port to its
               endpoint and masquerade a pod's call to its own Service (hairpin); any other
               address of the Service range has no route there
    pods:      eth0 10.244.0.N/24, default and 10.96.0.0/16 via 10.244.0.1; lo 127.0.0.1/8
    sidecar:   the rules; Envoy 15001, 15006 (transparent in TPROXY mode), 15090, 15021,
               127.0.0.1:15000; pilot-agent 15020 and, when the rules capture DNS, 127.0.0.1:15053;
               the app on 8080
    remote: 9080;  istiod: 15012;  kube-dns: 53 (UDP on 10.96.0.10 and its pod IP, TCP on any)
A dual-stack lab (an ip6tables dump among the rules, or native rules with `ip6` ones) mirrors
it with the IPv6 plan, ::6 on the sidecar's lo; pilot-agent, its DNS proxy and kube-dns stay
IPv4 only, as the lab runs them.  The sidecar's rules are what each backend wrote into it, in
the order written (Written): the lab's pods hold one backend's, a pod written twice both.

A PodSpec says how the sidecar pod runs where not as a running default pod (lab.podspec):
its init containers' time (no Envoy, pilot-agent or app yet), Envoy's inbound of an era
(1.9's 127.0.0.1:port), an app bound to 127.0.0.1, the proxy's user, a KubeVirt VM behind
k6t-eth0 (10.0.2.1; the VM 10.0.2.2, its default route through the pod).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from .. import path, plan, podspec
from ..podspec import PodSpec
from ..rules import features, kubeproxy
from ..rules.nftset import RuleSet as NftRules
from ..rules.save import Dump
from . import inet, iptables, nft
from .hooks import Hooks
from .packet import Owner, Packet, Socket
from .stack import InterfaceAddress, Namespace, Route

NODE = plan.NODE
# How the article's notation names each namespace: the pods as lab.plan does, the node and the VM.
LABELS = {**plan.POD_LABELS, NODE: "node", plan.VM: "VM"}
# The process behind each port the rules send connections to, and the side of it the port is
# (lab.path's names for both, so a predicted path names proxies as a measured one does).
ROLES = {**{port: ("Envoy", role) for port, role in path.PROXIES.items()},
         **{port: ("pilot-agent", role) for port, role in path.AGENT_PROXIES.items()}}


@dataclass(frozen=True)
class Written:
    """Rules one backend wrote into the sidecar pod, in the order it wrote them: iptables-save
    dumps (legacy xtables and iptables-nft hold the same tables), then native nftables tables.
    `backend` names the tables in a pod whose rules more than one backend wrote ("" otherwise)."""

    backend: str = ""
    dumps: tuple[Dump, ...] = ()
    nft: NftRules | None = None

    def groups(self) -> list[list]:
        """Its tables, one list per rule set written at once (lab.predict.hooks)."""
        out = [iptables.tables(d, self.backend) for d in self.dumps]
        return out + ([nft.tables(self.nft, self.backend)] if self.nft is not None else [])


@dataclass(frozen=True)
class Proxy:
    """A listener the sidecar's rules send connections to, and what the path calls it."""

    process: str  # "Envoy" | "pilot-agent"
    port: int
    role: str  # "Outbound" | "Inbound" | "DNS"

    @property
    def name(self) -> str:
        """`Envoy 15001 (Outbound)`, as lab.path writes it."""
        return path.proxy_name(self.port, role=self.role)

    @property
    def looped(self) -> str:
        """What the path calls it when the flow came back into it: `Envoy 15006 (loop)`."""
        return path.proxy_name(self.port, loop=True)


class Topology:
    """Every namespace of a lab whose sidecar holds the rules `written`, in write order."""

    def __init__(self, written: Sequence[Written], spec: PodSpec = PodSpec()):
        dumps = [d for w in written for d in w.dumps]
        native = next((w.nft for w in written if w.nft is not None), None)
        self.mode = features.inbound_mode(dumps, native)  # REDIRECT or TPROXY: Envoy and its identity follow it
        self.spec = spec
        sidecar = spec.sidecar_identity(self.mode)
        self.proxy_owner = Owner(sidecar.uid, sidecar.gid)
        self.dual_stack = any(d.family == 6 for d in dumps) or (native is not None and features.nft_ipv6(native))
        self.dns_proxy = features.DNS_CAPTURE in features.of(dumps, native)
        self.one_listener = features.one_listener(dumps, native)  # Envoy serves inbound on its outbound port too
        groups = [group for w in written for group in w.groups()]
        # ip rule fwmark M lookup 133; ip route add local default dev lo table 133: per family, for
        # the mark a TPROXY rule sets (an inet table's, for each family of the pod)
        marks = {(features.tproxy_mark(d), d.family) for d in dumps}
        if native is not None:
            marks |= {(features.nft_tproxy_mark(native), family) for family in self._families()}
        marked: dict[int, list[Route]] = {}
        for mark, family in sorted((mark, family) for mark, family in marks if mark is not None):
            marked.setdefault(mark, []).append(Route(inet.network("::/0" if family == 6 else "0.0.0.0/0"),
                                                     "lo", local=True))
        self.namespaces = {name: self._pod(name) for name in plan.PODS}
        self.namespaces["sidecar"].hooks = {family: Hooks(family, groups) for family in (4, 6)}
        self.namespaces["sidecar"].marked_routes = marked
        self.namespaces[NODE] = self._node()
        if spec.vm:
            self._vm()
        self._neighbours = {(a.family, a.address): (ns, a.device) for ns in self.namespaces.values()
                            for a in ns.addresses if a.device != "lo"}

    def neighbour(self, family: int, address: int) -> tuple[Namespace, str] | None:
        """Who answers ARP (or neighbour discovery) for `address` on the bridge, on which device."""
        return self._neighbours.get((family, address))

    def proxy(self, namespace: str, sock: Socket, packet: Packet | None = None) -> Proxy | None:
        """The proxy a socket is, and the side of it that takes `packet`: with one listener for
        both sides, the side its original destination names (the pod's own address: inbound)."""
        if namespace != "sidecar" or sock.port not in ROLES:
            return None
        process, role = ROLES[sock.port]
        if sock.process != process.lower():
            return None
        if self.one_listener and sock.port == plan.Port.OUTBOUND and packet is not None and packet.conn is not None:
            own = {inet.parse(ip)[1] for ip in (plan.PODS["sidecar"], plan.PODS6["sidecar"])}
            role = path.PROXIES[plan.Port.INBOUND if packet.conn.original_dst in own else plan.Port.OUTBOUND]
        return Proxy(process, sock.port, role)

    # --- building ---------------------------------------------------------------------------

    def _families(self) -> tuple[int, ...]:
        return (4, 6) if self.dual_stack else (4,)

    def _pod(self, name: str) -> Namespace:
        ip4 = plan.PODS[name]
        addresses = [InterfaceAddress.of("lo", "127.0.0.1/8"), InterfaceAddress.of("lo", "::1/128"),
                     InterfaceAddress.of("eth0", f"{ip4}/{plan.POD_PREFIX}")]
        addresses += [InterfaceAddress.of("eth0", f"{vip}/32") for vip in plan.HELD_VIPS.get(name, ())]
        gateway = inet.parse(plan.GATEWAY)[1]
        routes = [Route(inet.network(plan.POD_SUBNET), "eth0"), Route(inet.network("0.0.0.0/0"), "eth0", gateway),
                  Route(inet.network(plan.SERVICE_RANGE), "eth0", gateway)]
        if self.dual_stack:
            addresses.append(InterfaceAddress.of("eth0", f"{plan.PODS6[name]}/{plan.POD_PREFIX6}"))
            if name == "sidecar":
                addresses.append(InterfaceAddress.of("lo", f"{plan.INBOUND_PASSTHROUGH_SOURCE6}/128"))
            gateway6 = inet.parse(plan.GATEWAY6)[1]
            routes += [Route(inet.network(plan.POD_SUBNET6), "eth0"), Route(inet.network("::/0"), "eth0", gateway6),
                       Route(inet.network(plan.SERVICE_RANGE6), "eth0", gateway6)]
        return Namespace(name, addresses, routes, sockets=self._sockets(name))

    def _vm(self) -> None:
        """The VM behind the sidecar's k6t-eth0, and that interface's address in the sidecar."""
        sidecar = self.namespaces["sidecar"]
        sidecar.addresses.append(InterfaceAddress.of(plan.VM_INTERFACE, f"{plan.VM_GATEWAY}/{plan.VM_PREFIX}"))
        sidecar.routes.append(Route(inet.network(f"{plan.VM_GATEWAY}/{plan.VM_PREFIX}"), plan.VM_INTERFACE))
        addresses = [InterfaceAddress.of("lo", "127.0.0.1/8"), InterfaceAddress.of("lo", "::1/128"),
                     InterfaceAddress.of("eth0", f"{plan.VM_ADDRESS}/{plan.VM_PREFIX}")]
        routes = [Route(inet.network(f"{plan.VM_GATEWAY}/{plan.VM_PREFIX}"), "eth0"),
                  Route(inet.network("0.0.0.0/0"), "eth0", inet.parse(plan.VM_GATEWAY)[1])]
        if self.dual_stack:
            sidecar.addresses.append(InterfaceAddress.of(plan.VM_INTERFACE, f"{plan.VM_GATEWAY6}/{plan.VM_PREFIX6}"))
            sidecar.routes.append(Route(inet.network(f"{plan.VM_GATEWAY6}/{plan.VM_PREFIX6}"), plan.VM_INTERFACE))
            addresses.append(InterfaceAddress.of("eth0", f"{plan.VM_ADDRESS6}/{plan.VM_PREFIX6}"))
            routes += [Route(inet.network(f"{plan.VM_GATEWAY6}/{plan.VM_PREFIX6}"), "eth0"),
                       Route(inet.network("::/0"), "eth0", inet.parse(plan.VM_GATEWAY6)[1])]
        self.namespaces[plan.VM] = Namespace(plan.VM, addresses, routes)

    def _node(self) -> Namespace:
        addresses = [InterfaceAddress.of("lo", "127.0.0.1/8"),
                     InterfaceAddress.of("br0", f"{plan.GATEWAY}/{plan.POD_PREFIX}")]
        routes = [Route(inet.network(plan.POD_SUBNET), "br0")]
        routes += [Route(inet.network(f"{vip}/32"), "br0", inet.parse(plan.PODS[pod])[1])
                   for pod, vips in plan.HELD_VIPS.items() for vip in vips]
        if self.dual_stack:
            addresses.append(InterfaceAddress.of("br0", f"{plan.GATEWAY6}/{plan.POD_PREFIX6}"))
            routes.append(Route(inet.network(plan.POD_SUBNET6), "br0"))
        hooks = {family: Hooks(family, [iptables.tables(kubeproxy.dump(family))]) for family in self._families()}
        return Namespace(NODE, addresses, routes, forwarding=True, hooks=hooks)

    def _sockets(self, pod: str) -> list[Socket]:
        P = plan.Port
        out: list[Socket] = []

        def listen(process: str, port: int, families=self._families(), address: dict[int, str] | None = None,
                   proto: str = "tcp", transparent: bool = False) -> None:
            """One socket per family, bound to the wildcard or to address[family]."""
            for family in families:
                where = None if address is None else inet.parse(address[family])[1]
                out.append(Socket(proto, family, where, port, process, transparent))

        if pod == "sidecar" and self.spec.stage == podspec.INIT:
            return out  # istio-init's rules are in; Envoy, pilot-agent and the app are not started
        if pod == "sidecar":
            tproxy = self.mode == "TPROXY"
            listen("envoy", P.OUTBOUND, transparent=tproxy)
            listen("envoy", P.INBOUND, transparent=tproxy)
            listen("envoy", P.STATS)
            listen("envoy", P.READY)
            listen("envoy", P.ADMIN, address=plan.LOCALHOST)
            listen("pilot-agent", P.AGENT, families=(4,))
            if self.dns_proxy:
                for proto in ("udp", "tcp"):
                    listen("pilot-agent", P.DNS_PROXY, families=(4,), address=plan.LOCALHOST, proto=proto)
            listen("app", P.SIDECAR_APP, address=plan.LOCALHOST if self.spec.app_localhost else None)
        elif pod == "remote":
            listen("app", P.REMOTE_APP)
            listen("app", P.REMOTE_APP, proto="udp")  # the remote Service's port is TCP and UDP: it echoes
        elif pod == "istiod":
            listen("istiod", P.ISTIOD)
        elif pod == "kube-dns":
            for address in (*plan.HELD_VIPS["kube-dns"], plan.PODS["kube-dns"]):
                listen("kube-dns", P.DNS, families=(4,), address={4: address}, proto="udp")
            listen("kube-dns", P.DNS, families=(4,))
        return out
