"""What predict's tests ask about: the scenarios' flows, generated flows, generated Istio options,
and what the lab's measurement can say about a flow today.

Generated flows are issue 16's: from any pod, as uids and gids among 0, 1000, 1337 and
65534, to a pod, a Service VIP, 127.0.0.1, the pod's own IP or istiod, on the ports Istio
treats specially and the lab's own; TCP, and one in five UDP.  Generated options are istio-iptables': include and
exclude, inbound and outbound, ports and CIDRs, the proxy's uid and gid, DNS capture,
TPROXY, IPv6, across the versions the builder models; for Istio's native nftables rules
(istio-iptables --native-nftables, from 1.27) the same, IPv6 CIDRs and INVALID_DROP too.
"""

from __future__ import annotations

from pathlib import Path

from hypothesis import strategies as st

from lab import plan
from lab.predict import Flow, Prediction
from lab.predict.stack import Death
from lab.predict.topology import NODE
from lab.rules import builder, nftbuilder, nftset
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
    transport = draw(st.sampled_from(("tcp", "tcp", "tcp", "tcp", "udp")))
    return Flow(source, address, port, draw(st.sampled_from(IDS)), draw(st.sampled_from(IDS)), transport=transport)


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


NATIVE_VERSIONS = ("1.27", "1.28", "1.30")


@st.composite
def nft_options(draw) -> tuple[str, nftbuilder.NftOptions]:
    """(version, options) of Istio's native nftables rules: one uid and one gid, as `--rules`
    fits them; dual stack or not (one inet table holds both families' rules)."""
    ipv6 = draw(st.booleans())
    cidrs = ("10.96.0.90/32", "10.244.0.30/32", "10.244.0.0/24") + (("fd00:10:96::90/128", "fd00:10:244::/64")
                                                                    if ipv6 else ())
    included = (("*",), ("10.96.0.0/16",), ("10.244.0.0/24", "10.96.0.0/16"), ("127.0.0.0/8", "10.96.0.0/16"),
                ("10.244.0.20/32",)) + ((("10.96.0.0/16", "fd00:10:96::/112"),) if ipv6 else ())
    chosen = nftbuilder.NftOptions(
        proxy_uid=draw(st.sampled_from(((1337,), (1500,)))),
        proxy_gid=draw(st.sampled_from(((), (1337,), (1600,)))),
        mode=draw(st.sampled_from(("REDIRECT", "TPROXY"))),
        outbound_cidrs=draw(st.sampled_from(included)),
        outbound_exclude_cidrs=draw(_some(cidrs)),
        inbound_ports=draw(st.sampled_from((("*",), (), ("8080",), ("8080", "15090")))),
        inbound_exclude_ports=draw(_some((15090, 15021, 15020, 8080, 22))),
        outbound_ports=draw(_some((9080, 15012))),
        outbound_exclude_ports=draw(_some((9080, 15012, 53))),
        exclude_interfaces=draw(st.sampled_from(((), ("eth0",)))),
        dns_servers=draw(st.sampled_from(((), (plan.RESOLVER,)))),
        ipv6=ipv6,
        drop_invalid=draw(st.booleans()),
    )
    return draw(st.sampled_from(NATIVE_VERSIONS)), chosen


@st.composite
def nft_edited(draw):
    """An edit a user makes to a pod's nft rules, as (text -> (text, what it did)): none; a table
    of their own with a drop or a reject at output (filter, or a route chain at mangle's
    priority), or a drop at input; inbound sent to the outbound port."""
    kind = draw(st.sampled_from(("none", "none", "output-drop", "route-drop", "output-reject", "input-drop",
                                 "one-port")))
    port = draw(st.sampled_from(EDIT_PORTS))
    reject = draw(st.sampled_from(("", " with tcp reset", " with icmpx port-unreachable")))
    chains = {"output-drop": ("filter hook output priority filter", f"tcp dport {port} counter drop"),
              "route-drop": ("route hook output priority mangle - 5", f"tcp dport {port} counter drop"),
              "output-reject": ("filter hook output priority 0", f"meta l4proto tcp tcp dport {port} counter reject{reject}"),
              "input-drop": ("filter hook input priority 0", f"tcp dport {port} drop")}

    def edit(text: str) -> tuple[str, str]:
        if kind in chains:
            spec, rule = chains[kind]
            table = f"table inet user {{\n\tchain {kind} {{\n\t\ttype {spec}; policy accept;\n\t\t{rule}\n\t}}\n}}\n"
            return text + table, f"; table inet user: {rule}"
        if kind == "one-port" and "redirect to :15006" in text:
            return text.replace("redirect to :15006", "redirect to :15001"), "; inbound redirected to 15001"
        return text, ""

    return edit


def nft_text(version: str, options: nftbuilder.NftOptions) -> str:
    """The rule set as `nft list ruleset` lays it out, in Istio's words."""
    return nftset.text(nftbuilder.build(version, options))


# --- what the kernel can show ----------------------------------------------------------------

def unreachable_at_node(prediction: Prediction) -> bool:
    """A leg the node has no route for: the node answers "unreachable" only while its ICMP rate
    limit allows (ip_error: a small burst, then about one a second); past it the dialer waits
    out its timeout.  TRACE shows where the SYN died either way, so the path is the same; only
    the time differs."""
    return any(isinstance(leg.end, Death) and leg.end.kind == "unreachable" and leg.end.namespace == NODE
               for leg in prediction.walk.legs)


def dies_silently(prediction: Prediction) -> bool:
    """A leg whose first packet is dropped without a word (a DROP rule or policy, TPROXY with no
    socket): its dialer learns nothing until its timeout."""
    return any(isinstance(leg.end, Death) and leg.end.kind == "DROP" for leg in prediction.walk.legs)


# --- rule sets edited by hand, as users do ---------------------------------------------------

ISTIO_1_0 = Path(__file__).parent / "data" / "dumps" / "istio-1.0.rules"
EDIT_PORTS = (9080, 8080, 22, 15008)  # not 15012: pilot-agent must reach istiod for the lab to come up


def _insert(text: str, table: str, chain: str, rule: str) -> str:
    """The dump with `-A chain rule` first in its chain (the table made, with only that rule, if absent)."""
    lines = text.splitlines()
    if f"*{table}" not in lines:
        return text + f"*{table}\n:{chain} ACCEPT [0:0]\n-A {chain} {rule}\nCOMMIT\n"
    start = lines.index(f"*{table}")
    end = next(i for i in range(start, len(lines)) if lines[i] == "COMMIT")
    first = next((i for i in range(start, end) if lines[i].startswith(f"-A {chain} ")), None)
    if first is None:  # after the last rule of the table
        first = next((i + 1 for i in range(end - 1, start, -1) if lines[i].startswith(("-A ", ":"))), end)
    return "\n".join(lines[:first] + [f"-A {chain} {rule}"] + lines[first:]) + "\n"


@st.composite
def edited(draw):
    """An edit a user makes to a pod's dump, as (text -> (text, what it did)): none; a DROP in
    mangle OUTPUT, a REJECT in filter OUTPUT, a DROP in filter INPUT, written the short way
    (`-p tcp --dport N`, no `-m tcp`); inbound sent to the outbound port; an Istio 1.0 pod's
    dump instead; or Istio's chains gone (an uninjected pod)."""
    kind = draw(st.sampled_from(("none", "none", "mangle-drop", "filter-reject", "filter-drop-in", "uninjected",
                                 "one-port", "istio-1.0")))
    port = draw(st.sampled_from(EDIT_PORTS))
    reject = draw(st.sampled_from(("", " --reject-with tcp-reset", " --reject-with icmp-port-unreachable")))

    def edit(text: str) -> tuple[str, str]:
        if kind == "mangle-drop":  # not nat: iptables refuses DROP there (the legacy loader alone takes it)
            return _insert(text, "mangle", "OUTPUT", f"-p tcp --dport {port} -j DROP"), f"; mangle OUTPUT DROP {port}"
        if kind == "filter-reject":
            return _insert(text, "filter", "OUTPUT", f"-p tcp --dport {port} -j REJECT{reject}"), \
                f"; filter OUTPUT REJECT{reject} {port}"
        if kind == "filter-drop-in":
            return _insert(text, "filter", "INPUT", f"-p tcp --dport {port} -j DROP"), f"; filter INPUT DROP {port}"
        if kind == "one-port" and "--to-ports 15006" in text:  # inbound to the outbound port, as Istio 1.0, 1.1
            return text.replace("--to-ports 15006", "--to-ports 15001"), "; inbound redirected to 15001"
        if kind == "istio-1.0":
            return ISTIO_1_0.read_text(), "; replaced by an Istio 1.0 pod's dump"
        if kind == "uninjected":
            return "*nat\n:PREROUTING ACCEPT [0:0]\n:INPUT ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n" \
                   ":POSTROUTING ACCEPT [0:0]\nCOMMIT\n", "; uninjected (no Istio chain)"
        return text, ""

    return edit
