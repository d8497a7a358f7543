"""What predict's tests ask about: the scenarios' flows, generated flows, generated Istio options,
and what the lab's measurement can say about a flow today.

Generated flows are issue 16's: from any pod, as uids and gids among 0, 1000, 1337 and
65534, to a pod, a Service VIP, 127.0.0.1, the pod's own IP or istiod, on the ports Istio
treats specially and the lab's own.  Generated options are istio-iptables': include and
exclude, inbound and outbound, ports and CIDRs, the proxy's uid and gid, DNS capture,
TPROXY, IPv6, across the versions the builder models.
"""

from __future__ import annotations

from hypothesis import strategies as st

from lab import plan
from lab.predict import Flow, Prediction
from lab.predict.notation import marks, to_path
from lab.predict.stack import Death
from lab.predict.topology import NODE
from lab.rules import builder
from lab.scenario import Scenario

IDS = (0, 1000, 1337, 65534)
PORTS = (15001, 15006, 15008, 15090, 15021, 15020, 15000, 22, 53, 8080, 9080, 15012)
SOURCES = ("sidecar", "sidecar", "sidecar", "remote", "prometheus", "istiod", "kube-dns")
LISTENING = {"sidecar": plan.Port.SIDECAR_APP, "remote": plan.Port.REMOTE_APP, "istiod": plan.Port.ISTIOD,
             "kube-dns": plan.Port.DNS}  # each pod's own server, drawn as often as all other ports


def scenario_flow(s: Scenario, mode: str) -> Flow:
    """A scenario's traffic as a Flow, its source as the lab runs it under the inbound mode
    (the istio-proxy container is uid 0, gid 1337 in TPROXY mode)."""
    traffic, who = s.traffic, s.traffic.source.identity(mode)
    return Flow(traffic.source.pod, traffic.to.ip, traffic.to.port, who.uid, who.gid,
                transport=traffic.transport, query=traffic.query or None,
                source_label=traffic.source.label, destination_label=traffic.label)


@st.composite
def flows(draw, dual_stack: bool = False) -> Flow:
    source = draw(st.sampled_from(SOURCES))
    kind = draw(st.sampled_from(("pod", "service", "localhost", "own", "istiod")))
    port = draw(st.sampled_from(PORTS))
    if kind == "pod":
        pod = draw(st.sampled_from(sorted(plan.PODS)))
        address = plan.PODS[pod]
        port = draw(st.sampled_from((port, LISTENING.get(pod, port))))
    elif kind == "service":
        service = draw(st.sampled_from(plan.SERVICES))
        address, port = service.vip, draw(st.sampled_from((service.port, port)))
    elif kind == "localhost":
        address = plan.LOCALHOST[4]
    elif kind == "own":
        address = plan.PODS[source]
    else:
        address = plan.PODS["istiod"]
    if dual_stack and draw(st.booleans()):
        address = plan.ipv6_twin(address)
    return Flow(source, address, port, draw(st.sampled_from(IDS)), draw(st.sampled_from(IDS)))


def _some(items: tuple) -> st.SearchStrategy[tuple]:
    return st.lists(st.sampled_from(items), unique=True, max_size=len(items)).map(tuple)


VERSIONS = ("1.4", "1.5", "1.6", "1.7", "1.10", "1.13", "1.18", "1.22", "1.25", "1.30")


@st.composite
def options(draw, single_owner: bool = False) -> tuple[str, builder.Options]:
    """(version, istio-iptables options); `single_owner`: one uid and one gid, as `--rules` takes them."""
    version = draw(st.sampled_from(VERSIONS))
    v = builder.parse_version(version)
    modern = v >= builder.MODERN
    uids = ((1337,), (1500,)) if single_owner else ((1337,), (1500,), (1337, 0))
    gids = ((), (1337,), (1600,)) if single_owner else ((), (1337,), (1600,), (1337, 1000))
    chosen = builder.Options(
        proxy_uid=draw(st.sampled_from(uids)),
        proxy_gid=draw(st.sampled_from(gids)),
        mode=draw(st.sampled_from(("REDIRECT", "TPROXY"))) if modern else "REDIRECT",
        outbound_cidrs=draw(st.sampled_from((("*",), ("10.96.0.0/16",), ("10.244.0.0/24", "10.96.0.0/16"),
                                             ("127.0.0.0/8", "10.96.0.0/16"), ("10.244.0.20/32",)))),
        outbound_exclude_cidrs=draw(_some(("10.96.0.90/32", "10.244.0.30/32", "10.244.0.0/24"))),
        inbound_ports=draw(st.sampled_from((("*",), (), ("8080",), ("8080", "15090")))),
        inbound_exclude_ports=draw(_some((15090, 15021, 15020, 8080, 22))),
        outbound_ports=draw(_some((9080, 15012))) if v >= (1, 7) else (),
        outbound_exclude_ports=draw(_some((9080, 15012, 53))),
        exclude_interfaces=draw(st.sampled_from(((), ("eth0",)))) if v >= (1, 12) else (),
        dns_servers=draw(st.sampled_from(((), (plan.RESOLVER,)))) if modern else (),
        ipv6=draw(st.booleans()) if modern and not single_owner else False,
    )
    return version, chosen


# --- what the lab's measurement says today ----------------------------------------------------------

def measurable_today(prediction: Prediction, protocol: str = "tcp") -> str | None:
    """The path as the lab measures it today, or None where it measures nothing but a failure.

    The lab ends a path where the flow died when it was refused (no listener) and marks a
    loop; a flow killed by a DROP or REJECT rule, or with no route, is still only a failure.
    A leg a proxy opened that dies so leaves no access-log upstream, and a proxy that closes
    leaves none either: a stream (protocol "tcp": opened, half-closed, read to EOF) is then
    measured to that proxy; a request that wants an answer (HTTP, DNS) fails.
    """
    ms = marks(prediction.walk)
    ending = prediction.walk.ending.kind
    refused = ending == "died" and prediction.walk.legs[-1].end.kind == "refused"
    if ending in ("died", "closed") and not refused:
        last = max((i for i, m in enumerate(ms) if m.kind == "proxy"), default=None)
        if last is None or protocol != "tcp":
            return None
        ms = ms[:last + 1]
    return str(to_path(ms))


def failure_words(prediction: Prediction) -> tuple[str, ...]:
    """What the lab's failure message may say for this flow: always, where measurable_today gives
    no path; "timed out" also where a leg finds no route at the node, which answers
    "unreachable" only while its ICMP rate limit allows (ip_error: a small burst, then about
    one a second), so a client or Envoy may wait out its timeout instead."""
    walk = prediction.walk
    late = ("timed out", "no answer within")
    if walk.ending.kind == "loop":
        return late  # the stub Envoy dials itself until the client gives up
    if len(walk.legs) > 1 or walk.ending.kind == "closed":  # a proxy took it, then closed it
        words = ("no answer", "not connected", "reset", "closed")
    else:
        words = {"refused": ("refused",), "unreachable": ("unreachable", "No route"),
                 "REJECT": ("refused", "unreachable"), "DROP": late}[walk.legs[-1].end.kind]
    return words + late if unreachable_at_node(prediction) else words


def unreachable_at_node(prediction: Prediction) -> bool:
    return any(isinstance(leg.end, Death) and leg.end.kind == "unreachable" and leg.end.namespace == NODE
               for leg in prediction.walk.legs)
