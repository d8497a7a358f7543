"""The node's Service rules, as kube-proxy's iptables mode writes them: each Service VIP:port
DNATed to its endpoint pod:port in the node's nat table.

    -A PREROUTING -j KUBE-SERVICES          (and OUTPUT: the node's own connections)
    -A POSTROUTING -j KUBE-POSTROUTING
    -A KUBE-SERVICES -d 10.96.0.90/32 -p tcp -m tcp --dport 9080 -j KUBE-SVC-REMOTE
    -A KUBE-SVC-REMOTE -j KUBE-SEP-REMOTE
    -A KUBE-SEP-REMOTE -s 10.244.0.20/32 -j KUBE-MARK-MASQ
    -A KUBE-SEP-REMOTE -p tcp -m tcp -j DNAT --to-destination 10.244.0.20:9080

kube-proxy's own structure (a chain per Service port, one per endpoint, the masquerade
mark for hairpin traffic), with readable chain names where kube-proxy writes a hash of the
Service's name (KUBE-SVC-XGLOHA7QRQ3V22RZ), no comments, and MASQUERADE without
--random-fully, so a hairpin connection keeps its source port.  The lab's pods reach the
node as their gateway (a Service VIP is routed through it), so a SYN to a VIP that Envoy
did not take (uid 1337, an excluded port or range, UDP) is DNATed here, in the node, and
forwarded to the endpoint; a pod calling its own Service is hairpinned back out of its own
bridge port (hairpin mode on, as the kubelet sets it) and masqueraded, as kube-proxy's
KUBE-SEP rule 1 asks, since a pod drops a packet that comes in with its own address.

A VIP a pod holds itself (plan.HELD_VIPS: kube-dns's 10.96.0.10) is routed to that pod, not
DNATed.  A dual-stack lab gets the same rules in ip6tables for the Services' IPv6 VIPs.
"""

from __future__ import annotations

import re

from .. import plan
from ..netfilter import BUILTIN_CHAINS
from .save import Dump, RuleLine, TableDump

SERVICES_CHAIN = "KUBE-SERVICES"
MARK_MASQ = "KUBE-MARK-MASQ"
POSTROUTING_CHAIN = "KUBE-POSTROUTING"


def _suffix(service: plan.Service) -> str:
    return re.sub(r"[^A-Z0-9]+", "-", service.name.upper())


def svc_chain(service: plan.Service) -> str:
    return f"KUBE-SVC-{_suffix(service)}"


def sep_chain(service: plan.Service) -> str:
    return f"KUBE-SEP-{_suffix(service)}"


def dnatted(services=plan.SERVICES) -> list[plan.Service]:
    """The Services whose VIP the node DNATs: all but those a pod holds itself."""
    held = {vip for vips in plan.HELD_VIPS.values() for vip in vips}
    return [s for s in services if s.vip not in held]


def dump(family: int = 4, services=plan.SERVICES) -> Dump:
    """The node's nat table for one family (4: iptables, 6: ip6tables)."""
    pods, host = (plan.PODS6, 128) if family == 6 else (plan.PODS, 32)
    mark = f"{plan.MASQUERADE_MARK:#x}"
    rules = [
        ("PREROUTING", f"-j {SERVICES_CHAIN}"),
        ("OUTPUT", f"-j {SERVICES_CHAIN}"),
        ("POSTROUTING", f"-j {POSTROUTING_CHAIN}"),
        (MARK_MASQ, f"-j MARK --set-xmark {mark}/{mark}"),
        (POSTROUTING_CHAIN, f"-m mark ! --mark {mark}/{mark} -j RETURN"),
        (POSTROUTING_CHAIN, f"-j MARK --set-xmark 0x0/{mark}"),
        (POSTROUTING_CHAIN, "-j MASQUERADE"),
    ]
    chains = [SERVICES_CHAIN, MARK_MASQ, POSTROUTING_CHAIN]
    for s in dnatted(services):
        vip, endpoint = (s.vip6, pods[s.pod]) if family == 6 else (s.vip, pods[s.pod])
        to = f"[{endpoint}]:{s.target_port}" if family == 6 else f"{endpoint}:{s.target_port}"
        svc, sep = svc_chain(s), sep_chain(s)
        chains += [svc, sep]
        for proto in s.protocols:
            rules.append((SERVICES_CHAIN, f"-d {vip}/{host} -p {proto} -m {proto} --dport {s.port} -j {svc}"))
        rules.append((svc, f"-j {sep}"))
        rules.append((sep, f"-s {endpoint}/{host} -j {MARK_MASQ}"))
        for proto in s.protocols:
            rules.append((sep, f"-p {proto} -m {proto} -j DNAT --to-destination {to}"))
    table = TableDump("nat", dict.fromkeys(BUILTIN_CHAINS["nat"], "ACCEPT"), sorted(chains))
    table.rules = [RuleLine(chain, tuple(spec.split())) for chain, spec in rules]
    return Dump({"nat": table}, family)
