"""A lab: a fabric namespace playing the node, and pods wired to its bridge.

    ilab-<labid>-node:   br0 10.244.0.1/24  <- veth ->  ilab-<labid>-<pod>: eth0
Every link, address and route lives in the lab's own namespaces.

A dual-stack lab (ipv6=True) adds the IPv6 plan beside the IPv4 one: fd00:10:244::1/64 on
the bridge, each pod's fd00:10:244::N/64, IPv6 default and Service routes, and ::6/128 on
the sidecar pod's lo, as istio-iptables adds it.  The addresses are added with IFA_F_NODAD:
duplicate address detection would hold them tentative (unusable) for about a second, and
no other host shares the lab's bridge.
"""

from __future__ import annotations

import contextlib
import os
import socket
import secrets
import string
from dataclasses import dataclass
from typing import Iterator

from pyroute2 import IPRoute

from . import interrupts, netns, plan, record
from .netns import LO_INDEX
from .podspec import PodSpec
from .errors import LabError
from . import backend as backends
from .rules import kubeproxy
from .rules.xtables import RuleError

BRIDGE = "br0"
IFA_F_NODAD = 0x02  # linux/if_addr.h: usable at once, no duplicate address detection
NUD_PERMANENT = 0x80  # linux/neighbour.h


@dataclass(frozen=True)
class Pod:
    name: str
    ns: str
    ip: str
    ip6: str | None = None  # in a dual-stack lab


@contextlib.contextmanager
def ipr(ns: str) -> Iterator[object]:
    """A pyroute2 IPRoute socket opened inside `ns` (it stays bound there)."""
    with netns.entered(ns):
        sock = IPRoute()
    try:
        yield sock
    finally:
        sock.close()


def new_labid() -> str:
    alphabet = string.ascii_lowercase + string.digits
    return "".join(secrets.choice(alphabet) for _ in range(6))


class Lab:
    """One isolated cluster on this kernel. Use as a context manager: it always tears down."""

    def __init__(self, labid: str | None = None, detached: bool = False, ipv6: bool = False,
                 spec: PodSpec = PodSpec(), backend: str = "legacy"):
        self.labid = new_labid() if labid is None else labid  # "" is a bad id, not "any id"
        if not record.LABID_RE.match(self.labid):
            raise LabError(f"bad lab id {self.labid!r}: use 1-12 lowercase letters and digits")
        self.record = record.Record.new(self.labid, detached)
        self.record.ipv6 = ipv6
        self.record.backend = backend  # in the record from the first save: the reaper and `rules` read it
        self.node = record.ns_name(self.labid, "node")
        self.ipv6 = ipv6
        self.spec = spec  # how the sidecar pod runs (lab.podspec)
        self.pods = {name: Pod(name, record.ns_name(self.labid, name), ip, plan.PODS6[name] if ipv6 else None)
                     for name, ip in plan.PODS.items()}
        if spec.vm:  # a KubeVirt VM behind the sidecar pod's k6t-eth0 (kubevirtInterfaces)
            self.pods[plan.VM] = Pod(plan.VM, record.ns_name(self.labid, plan.VM), plan.VM_ADDRESS,
                                     plan.VM_ADDRESS6 if ipv6 else None)
        self.up = False

    @property
    def run_dir(self) -> str:
        return self.record.dir

    def pod(self, name: str) -> Pod:
        try:
            return self.pods[name]
        except KeyError:
            raise LabError(f"no pod {name!r} in the lab (pods: {', '.join(self.pods)})") from None

    @property
    def sidecar_identity(self) -> plan.Identity:
        """Who Envoy and pilot-agent run as (the record's inbound mode, set when they start)."""
        return self.spec.sidecar_identity(self.record.inbound_mode)

    def namespace(self, name: str) -> str:
        """The namespace of a pod, or of the node (plan.NODE)."""
        return self.node if name == plan.NODE else self.pod(name).ns

    def namespaces(self) -> list[str]:
        return [self.node] + [p.ns for p in self.pods.values()]

    def create(self) -> "Lab":
        if record.lab_namespaces(self.labid) or os.path.exists(self.run_dir):
            raise LabError(f"lab {self.labid} already exists (istio-lab down {self.labid})")
        self.up = True  # from here an interrupt tears down what there is, the record's directory too
        try:
            self.record.save()  # before any namespace: a crash from here on is reapable
            # Signals held: pyroute2 runs each request on an asyncio loop, and a Ctrl-C inside
            # one leaves the loop in pieces that complain as they are collected.  The few
            # milliseconds of the build are not worth that; the interrupt lands after it.
            with interrupts.held():
                netns.create(self.node)
                with ipr(self.node) as node:
                    bridge = self._build_fabric(node)
                    for pod in self.pods.values():
                        if pod.name != plan.VM:
                            self._build_pod(node, bridge, pod)
                    self._route_held_vips(node, bridge)
                    if self.ipv6:
                        self._neighbours6(node, bridge)
                if plan.VM in self.pods:
                    self._build_vm(self.pods[plan.VM])
                self._kube_proxy()
        except BaseException:
            self.destroy()
            raise
        return self

    def _build_fabric(self, node) -> int:
        node.link("set", index=LO_INDEX, state="up")
        node.link("add", ifname=BRIDGE, kind="bridge")
        bridge = node.link_lookup(ifname=BRIDGE)[0]
        node.addr("add", index=bridge, address=plan.GATEWAY, prefixlen=plan.POD_PREFIX)
        if self.ipv6:
            node.addr("add", index=bridge, address=plan.GATEWAY6, prefixlen=plan.POD_PREFIX6, flags=IFA_F_NODAD)
        node.link("set", index=bridge, state="up")
        return bridge

    def _build_pod(self, node, bridge: int, pod: Pod) -> None:
        netns.create(pod.ns)
        node.link("add", ifname=pod.name, kind="veth", master=bridge, state="up",
                  peer={"ifname": "eth0", "net_ns_fd": netns.path(pod.ns)})
        # Hairpin, as the kubelet sets it on a pod's bridge port: a pod's own Service VIP,
        # DNATed by the node back to the pod, goes out of the port it came in by.
        node.brport("set", index=node.link_lookup(ifname=pod.name)[0], mode=1)
        with ipr(pod.ns) as inside:
            inside.link("set", index=LO_INDEX, state="up")
            eth0 = inside.link_lookup(ifname="eth0")[0]
            inside.addr("add", index=eth0, address=pod.ip, prefixlen=plan.POD_PREFIX)
            inside.link("set", index=eth0, state="up")
            for vip in plan.HELD_VIPS.get(pod.name, ()):
                inside.addr("add", index=eth0, address=vip, prefixlen=32)
            inside.route("add", dst="default", gateway=plan.GATEWAY)
            inside.route("add", dst=plan.SERVICE_RANGE, gateway=plan.GATEWAY)
            if pod.ip6:
                self._ipv6_pod(inside, eth0, pod)
        netns.set_sysctls(pod.ns, {**plan.icmp_sysctls(pod.ip6 is not None), **plan.POD_SYSCTLS.get(pod.name, {})})

    def _neighbours6(self, node, bridge: int) -> None:
        """The pods' IPv6 addresses as permanent neighbours of the node.  A SYN the node DNATs
        (br_netfilter, at the bridge) to a pod whose neighbour entry is not resolved yet is
        dropped, not queued (measured: the first IPv6 connection to a VIP needed its SYN
        retransmitted); IPv4's ARP has no such gap here."""
        for pod in self.pods.values():
            if pod.ip6 and pod.name != plan.VM:
                with ipr(pod.ns) as inside:
                    mac = inside.get_links(inside.link_lookup(ifname="eth0")[0])[0].get_attr("IFLA_ADDRESS")
                node.neigh("add", dst=pod.ip6, lladdr=mac, ifindex=bridge, state=NUD_PERMANENT)

    @staticmethod
    def _ipv6_pod(inside, eth0: int, pod: Pod) -> None:
        inside.addr("add", index=eth0, address=pod.ip6, prefixlen=plan.POD_PREFIX6, flags=IFA_F_NODAD)
        for dst in ("::/0", plan.SERVICE_RANGE6):
            inside.route("add", dst=dst, gateway=plan.GATEWAY6, family=socket.AF_INET6)
        if pod.name == "sidecar":  # IPv6 lo holds ::1/128 only; Envoy's inbound passthrough binds ::6
            inside.addr("add", index=LO_INDEX, address=plan.INBOUND_PASSTHROUGH_SOURCE6, prefixlen=128)

    def _route_held_vips(self, node, bridge: int) -> None:
        """The node forwards a held VIP to its pod, and (DNATed) every other VIP to its endpoint.
        No ICMP redirects: they would teach the pods a shortcut and change later packets' next hop."""
        for pod, vips in plan.HELD_VIPS.items():
            for vip in vips:
                node.route("add", dst=f"{vip}/32", gateway=self.pods[pod].ip, oif=bridge)
        sysctls = {"net/ipv4/ip_forward": "1", "net/ipv4/conf/all/send_redirects": "0",
                   f"net/ipv4/conf/{BRIDGE}/send_redirects": "0", **plan.icmp_sysctls(self.ipv6)}
        if self.ipv6:  # the IPv6 VIPs are DNATed and forwarded too
            sysctls["net/ipv6/conf/all/forwarding"] = "1"
        netns.set_sysctls(self.node, sysctls)

    def _kube_proxy(self) -> None:
        """kube-proxy's Service DNAT in the node's nat table (and ip6tables' in a dual-stack lab),
        through the lab's backend, as kube-proxy writes with the node's iptables."""
        for family in (4, 6) if self.ipv6 else (4,):
            try:
                backends.get(self.record.backend).apply(self.node, kubeproxy.dump(family))
            except RuleError as e:
                raise LabError(f"the node's kube-proxy rules: {e}") from None

    def _build_vm(self, vm: Pod) -> None:
        """The VM's namespace, on a veth whose other end is the sidecar pod's k6t-eth0."""
        netns.create(vm.ns)
        sidecar = self.pods["sidecar"].ns
        with ipr(sidecar) as pod:
            pod.link("add", ifname=plan.VM_INTERFACE, kind="veth", state="up",
                     peer={"ifname": "eth0", "net_ns_fd": netns.path(vm.ns)})
            nic = pod.link_lookup(ifname=plan.VM_INTERFACE)[0]
            pod.addr("add", index=nic, address=plan.VM_GATEWAY, prefixlen=plan.VM_PREFIX)
            if vm.ip6:
                pod.addr("add", index=nic, address=plan.VM_GATEWAY6, prefixlen=plan.VM_PREFIX6, flags=IFA_F_NODAD)
        with ipr(vm.ns) as inside:
            inside.link("set", index=LO_INDEX, state="up")
            eth0 = inside.link_lookup(ifname="eth0")[0]
            inside.addr("add", index=eth0, address=vm.ip, prefixlen=plan.VM_PREFIX)
            inside.link("set", index=eth0, state="up")
            inside.route("add", dst="default", gateway=plan.VM_GATEWAY)
            if vm.ip6:
                inside.addr("add", index=eth0, address=vm.ip6, prefixlen=plan.VM_PREFIX6, flags=IFA_F_NODAD)
                inside.route("add", dst="::/0", gateway=plan.VM_GATEWAY6, family=socket.AF_INET6)
        netns.set_sysctls(vm.ns, plan.icmp_sysctls(vm.ip6 is not None))

    def destroy(self) -> None:
        if self.up:
            record.destroy(self.labid)
            self.up = False

    def stop(self) -> None:
        """Kill its processes and leave its namespaces (destroy() removes them later).

        Removing a namespace is cheap for us and dear for the kernel: its cleanup runs later in
        a worker that holds the rtnl lock through RCU grace periods, and every lab being built
        meanwhile waits on that lock (measured: two processes building labs side by side took
        60 ms a lab while each removed its last, 16-31 ms when the removals came at the end).
        A run of several labs stops each when it is done and removes them all at the end."""
        if self.up:
            record.stop(self.labid)

    def __enter__(self) -> "Lab":
        return self.create()

    def __exit__(self, *exc) -> None:
        self.destroy()

    def describe(self) -> list[tuple[str, str, str]]:
        """(pod, namespace, address) rows, node first."""
        rows = [("node", self.node, f"{self._cidrs(plan.GATEWAY, plan.GATEWAY6)} on {BRIDGE}")]
        rows += [(p.name, p.ns, f"{self._cidrs(p.ip, p.ip6)} on eth0") for p in self.pods.values() if p.name != plan.VM]
        if plan.VM in self.pods:
            vm = self.pods[plan.VM]
            six = f", {vm.ip6}/{plan.VM_PREFIX6}" if vm.ip6 else ""
            rows.append((vm.name, vm.ns, f"{vm.ip}/{plan.VM_PREFIX}{six} on eth0, behind the sidecar's {plan.VM_INTERFACE}"))
        return rows

    def _cidrs(self, ip: str, ip6: str) -> str:
        return f"{ip}/{plan.POD_PREFIX}, {ip6}/{plan.POD_PREFIX6}" if self.ipv6 else f"{ip}/{plan.POD_PREFIX}"
