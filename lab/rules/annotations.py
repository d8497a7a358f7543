"""A pod's Istio interception annotations, and the istio-iptables options Istio's injector makes of them.

    istio-lab run --annotations pod.yaml --profile istio-1.25

The injector renders its template with the pod's annotations: each interception
annotation becomes an argument of istio-init's `istio-iptables`, and an absent one
leaves the install's default, which is what a profile's options hold.  A present but
empty annotation is not an absent one: the template passes the empty value on
(istio/istio#28106), so `includeOutboundIPRanges: ""` captures no outbound traffic.
What the injector would refuse, or let through to make istio-init fail, is one line
naming the key; annotations the injector does not read are left alone.
"""

from __future__ import annotations

import difflib
import ipaddress
import re
from dataclasses import dataclass, field, replace
from typing import Callable, Mapping

from ..errors import LabError
from . import builder
from .builder import Version

TRAFFIC = "traffic.sidecar.istio.io/"
MODE = "sidecar.istio.io/interceptionMode"
STATUS_PORT = "status.sidecar.istio.io/port"
INCLUDE_IP_RANGES = TRAFFIC + "includeOutboundIPRanges"
EXCLUDE_IP_RANGES = TRAFFIC + "excludeOutboundIPRanges"
INCLUDE_INBOUND_PORTS = TRAFFIC + "includeInboundPorts"
EXCLUDE_INBOUND_PORTS = TRAFFIC + "excludeInboundPorts"
INCLUDE_OUTBOUND_PORTS = TRAFFIC + "includeOutboundPorts"
EXCLUDE_OUTBOUND_PORTS = TRAFFIC + "excludeOutboundPorts"
KUBEVIRT_INTERFACES = TRAFFIC + "kubevirtInterfaces"
EXCLUDE_INTERFACES = TRAFFIC + "excludeInterfaces"
REROUTE_VIRTUAL_INTERFACES = "istio.io/reroute-virtual-interfaces"  # kubevirtInterfaces' new name

STATUS_PORT_DEFAULT = "15020"  # values.global.proxy.statusPort, in every modelled version
# The ports the template excludes ahead of the pod's own: Envoy's Prometheus port from 1.5,
# the readiness port from 1.6 (newest first).
TEMPLATE_EXCLUDED = (((1, 6), ("15090", "15021")), ((1, 5), ("15090",)), (builder.OLDEST, ()))


class AnnotationError(LabError):
    """An annotation Istio would refuse, or one the lab cannot model; one line naming the key."""


@dataclass(frozen=True)
class PodAnnotations:
    """The interception annotations of one pod, as written: strings, as Kubernetes keeps them."""

    source: str
    values: Mapping[str, str] = field(default_factory=dict)
    notes: tuple[str, ...] = ()  # what the injector will not see, found while reading


@dataclass(frozen=True)
class IstioInit:
    """What the injector gives the pod's istio-init: istio-iptables' options, and what it ignored."""

    options: builder.Options
    notes: tuple[str, ...] = ()


# --- values, as the injector validates them and istio-iptables splits them -------------------

def _ports(text: str, v: Version) -> tuple[int, ...]:
    """A port list as the injector's parsePorts reads it: trimmed, comma-separated, each 0-65535."""
    if not text.strip():
        return ()
    ports = []
    for item in text.strip().split(","):
        if not re.fullmatch(r"\d+", item.strip()) or int(item) > 65535:
            raise ValueError(f"{item!r} is not a port (0-65535): Istio's injector rejects the pod")
        ports.append(int(item))
    return tuple(ports)


def _status_port(text: str, v: Version) -> tuple[int, ...]:
    if text.strip() == "":
        raise ValueError("empty: Istio's injector rejects the pod (0 turns the status port off)")
    return _ports(text, v)


def _inbound_ports(text: str, v: Version) -> tuple[str, ...]:
    return ("*",) if text == "*" else tuple(str(port) for port in _ports(text, v))


def _outbound_ports(text: str, v: Version) -> tuple[int, ...]:
    """The injector never checks includeOutboundPorts: istio-iptables hands each item to iptables' --dport."""
    ports = []
    for item in filter(None, text.split(",")):  # istio-iptables drops empty items
        if not re.fullmatch(r"\d+", item.strip()) or int(item) > 65535:
            raise ValueError(f"{item!r} is not a port: Istio's injector lets it through and istio-iptables "
                             f"hands it to iptables as --dport {item.strip()}")
        ports.append(int(item))
    return tuple(ports)


def _cidrs(text: str, v: Version, wildcard: bool = False) -> tuple[str, ...]:
    """A CIDR list as the injector checks it: split on commas only, each item address/length."""
    if text == "*":
        if wildcard:
            return ("*",)
        raise ValueError("'*' would exclude every destination: Istio's injector rejects the pod")
    if text == "":
        return ()
    for item in text.split(","):
        if item != item.strip():
            raise ValueError(f"{item!r} has a space: Istio splits the list on commas only, and its injector "
                             f"rejects the pod")
        if not _is_cidr(item):
            raise ValueError(f"{item!r} is not a CIDR such as 10.0.0.0/8: Istio's injector rejects the pod")
    return tuple(text.split(","))


def _is_cidr(text: str) -> bool:
    """address/length, as Go's ParseCIDR takes it: no bare address, no netmask."""
    try:
        return bool(re.fullmatch(r"[0-9A-Fa-f:.]+/\d{1,3}", text) and ipaddress.ip_network(text, strict=False))
    except ValueError:
        return False


def _included_cidrs(text: str, v: Version) -> tuple[str, ...]:
    return _cidrs(text, v, wildcard=True)


def _interfaces(text: str, v: Version) -> tuple[str, ...]:
    """Interface names, which istio-iptables gives iptables as they are (empty items dropped);
    Istio 1.30's injector checks them first."""
    if text == "":
        return ()
    names = []
    for item in text.split(","):
        if v >= (1, 30) and not re.fullmatch(r"[a-zA-Z][a-zA-Z0-9_.\-]{0,14}", item.strip()):
            raise ValueError(f"{item!r} is not an interface name: Istio 1.30's injector rejects the pod")
        if item and not builder.IFNAME.fullmatch(item):
            raise ValueError(f"{item!r} is not an interface name: istio-iptables would give it to iptables as is")
        if item:
            names.append(item)
    return tuple(names)


def _mode(text: str, v: Version) -> str:
    if text == "NONE":
        raise ValueError("NONE: Istio adds no istio-init container, so the pod has no rules for the lab to test")
    if text not in builder.MODES:
        raise ValueError(f"{text!r} is not REDIRECT, TPROXY or NONE: Istio's injector rejects the pod")
    return text


@dataclass(frozen=True)
class Annotation:
    """One annotation the injection template reads: the istio-iptables option it sets, and since when."""

    flag: str
    option: str  # the builder.Options field it sets
    value: Callable[[str, Version], object]  # the option's value; ValueError says what Istio makes of bad text
    since: Version = builder.OLDEST


ANNOTATIONS = {
    MODE: Annotation("-m", "mode", _mode),
    INCLUDE_IP_RANGES: Annotation("-i", "outbound_cidrs", _included_cidrs),
    EXCLUDE_IP_RANGES: Annotation("-x", "outbound_exclude_cidrs", _cidrs),
    INCLUDE_INBOUND_PORTS: Annotation("-b", "inbound_ports", _inbound_ports),
    EXCLUDE_INBOUND_PORTS: Annotation("-d", "inbound_exclude_ports", _ports),
    STATUS_PORT: Annotation("-d", "inbound_exclude_ports", _status_port),  # the status port is excluded too
    INCLUDE_OUTBOUND_PORTS: Annotation("-q", "outbound_ports", _outbound_ports, (1, 7)),
    EXCLUDE_OUTBOUND_PORTS: Annotation("-o", "outbound_exclude_ports", _ports),
    KUBEVIRT_INTERFACES: Annotation("-k", "kubevirt_interfaces", _interfaces),
    REROUTE_VIRTUAL_INTERFACES: Annotation("-k", "kubevirt_interfaces", _interfaces, (1, 25)),
    EXCLUDE_INTERFACES: Annotation("-c", "exclude_interfaces", _interfaces, (1, 15)),
}


def _str(v: Version) -> str:
    return f"{v[0]}.{v[1]}"


# --- the injection ------------------------------------------------------------------------

def inject(pod: PodAnnotations, version: str | Version, base: builder.Options = builder.Options()) -> IstioInit:
    """istio-iptables' options for the pod, as that Istio version's injector sets them.

    `base` is the install's defaults (a profile's options): what an absent annotation leaves.
    """
    v = builder.parse_version(version)
    values = dict(pod.values)
    notes = list(pod.notes)
    for key in list(values):
        since = ANNOTATIONS[key].since
        if v < since:
            notes.append(f"{key}: ignored: Istio {_str(v)}'s injection template passes no "
                         f"{ANNOTATIONS[key].flag} for it (it does from {_str(since)} on)")
            del values[key]
    if KUBEVIRT_INTERFACES in values and REROUTE_VIRTUAL_INTERFACES in values:
        notes.append(f"{KUBEVIRT_INTERFACES}: ignored: {REROUTE_VIRTUAL_INTERFACES} is set too, and wins")
        del values[KUBEVIRT_INTERFACES]

    def problem(key: str, text: str) -> AnnotationError:
        return AnnotationError(f"{pod.source}: {key}: {text}")

    changes = {}
    for key, text in values.items():
        annotation = ANNOTATIONS[key]
        try:
            changes[annotation.option] = annotation.value(text, v)
        except ValueError as e:
            raise problem(key, str(e)) from None
    if EXCLUDE_INBOUND_PORTS in values or STATUS_PORT in values:
        capture_all = changes.get("inbound_ports", base.inbound_ports) == ("*",)
        try:
            changes["inbound_exclude_ports"] = _excluded_inbound(
                v, values.get(STATUS_PORT, STATUS_PORT_DEFAULT), values.get(EXCLUDE_INBOUND_PORTS, ""), capture_all)
        except ValueError as e:
            raise problem(STATUS_PORT if STATUS_PORT in values else EXCLUDE_INBOUND_PORTS, str(e)) from None
    options = replace(base, **changes)
    options.check(pod.source)
    return IstioInit(options, tuple(notes))


def _excluded_inbound(v: Version, status_port: str, excluded: str, capture_all: bool) -> tuple[int, ...]:
    """istio-iptables' -d as the template writes it: its own ports, the pod's, then the status port
    unless the pod lists it already (the template's excludeInboundPort)."""
    status = status_port.strip()
    if status in ("", "0") or status in excluded.split(","):
        pod_ports = excluded
    else:
        pod_ports = ",".join([p.strip() for p in excluded.split(",") if p.strip()] + [status])
    istios = next(ports for since, ports in TEMPLATE_EXCLUDED if v >= since)
    text = ",".join(istios + (pod_ports,)) if v < (1, 7) or pod_ports else ",".join(istios)
    if text.endswith(",") and capture_all:  # 1.5 and 1.6 write "15090,15021," with nothing after
        raise ValueError(f"Istio {_str(v)}'s template writes -d {text!r} here, and istio-iptables {_str(v)} "
                         f"fails on the empty port (istio/istio#24722)")
    return tuple(int(p) for p in text.split(",") if p.strip())


# --- reading: a pod (or workload) manifest, a mapping of annotations, or KEY=VALUE lines --------

def read(file: str) -> PodAnnotations:
    try:
        with open(file, encoding="utf-8") as f:
            text = f.read()
    except OSError as e:
        raise AnnotationError(f"{file}: cannot read: {e.strerror}") from None
    except UnicodeDecodeError as e:
        raise AnnotationError(f"{file}: not UTF-8 text ({e.reason})") from None
    return parse(text, file)


_KEY_VALUE = re.compile(r"\s*[^\s:=#]+=")  # a KEY=VALUE line: annotation keys hold no ':', '=' or space


def parse(text: str, source: str = "<annotations>") -> PodAnnotations:
    """The interception annotations a text holds; every other annotation is left out."""
    lines = [line for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    if lines and all(_KEY_VALUE.match(line) for line in lines):
        return PodAnnotations(source, _interception(_key_values(text, source), source))
    data = _yaml(text, source)
    if data is None:
        return PodAnnotations(source)
    if not isinstance(data, dict):
        raise AnnotationError(f"{source}: expected a pod manifest, a mapping of annotations or KEY=VALUE lines")
    if not {"apiVersion", "kind", "metadata", "spec"} & set(data):
        return PodAnnotations(source, _interception(data, source))
    annotations, notes = _manifest(data, source)
    return PodAnnotations(source, _interception(annotations, source), notes)


def from_mapping(data: dict, source: str) -> PodAnnotations:
    """The interception annotations of a mapping already read (a scenario file's pod), checked
    as a file's are: a misspelt key or a value that is not a string is one line."""
    if not isinstance(data, dict):
        raise AnnotationError(f"{source}: expected a mapping of annotations")
    return PodAnnotations(source, _interception(data, source))


def _key_values(text: str, source: str) -> dict[str, str]:
    """KEY=VALUE lines as `kubectl annotate` takes them; quotes around a value are dropped (KEY="" is empty)."""
    out, where = {}, {}
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        key, _, value = line.strip().partition("=")
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        if key in out:
            raise AnnotationError(f"{source}:{lineno}: {key} is given twice (first on line {where[key]})")
        out[key], where[key] = value, lineno
    return out


def _yaml(text: str, source: str):
    import yaml

    try:
        return yaml.load(text, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    except yaml.YAMLError as e:  # one line: a ReaderError's str() has two
        mark = getattr(e, "problem_mark", None)
        where = f"line {mark.line + 1}: " if mark else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise AnnotationError(f"{source}: {where}bad YAML: {' '.join(str(problem).split())}") from None


def _manifest(data: dict, source: str) -> tuple[dict, tuple[str, ...]]:
    """A pod's annotations, or a workload's pod template's (the only ones the injector reads)."""
    kind = data.get("kind") or "Pod"
    if kind == "List":
        raise AnnotationError(f"{source}: a List: give one pod or workload")
    metadata = _mapping(data, "metadata", source)
    spec = _mapping(data, "spec", source)
    template = spec.get("template") or _mapping(_mapping(spec, "jobTemplate", source), "spec", source).get("template")
    if template is None:
        return _mapping(metadata, "annotations", source), ()
    if not isinstance(template, dict):
        raise AnnotationError(f"{source}: the pod template is not a mapping")
    own = _mapping(metadata, "annotations", source)
    notes = tuple(f"{key}: ignored: it is on the {kind}'s own metadata; Istio reads the pod template's annotations"
                  for key in own if key in ANNOTATIONS)
    return _mapping(_mapping(template, "metadata", source), "annotations", source), notes


def _mapping(data: dict, key: str, source: str) -> dict:
    value = data.get(key)
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise AnnotationError(f"{source}: {key} is not a mapping")
    return value


def _interception(annotations: dict, source: str) -> dict[str, str]:
    """The interception annotations among a pod's; a misspelt one is an error, not a silent no-op."""
    out = {}
    for key, value in annotations.items():
        key = str(key)
        if key not in ANNOTATIONS:
            misspelt = key.startswith(TRAFFIC) or key.lower() in {k.lower() for k in ANNOTATIONS}
            if misspelt:
                near = difflib.get_close_matches(key, list(ANNOTATIONS), n=1)
                hint = f" (did you mean {near[0]}?)" if near else ""
                raise AnnotationError(f"{source}: {key}: not an annotation Istio reads, so it would change "
                                      f"nothing{hint}")
            continue
        if value is None:
            raise AnnotationError(f'{source}: {key}: no value (write "" for an empty one)')
        if not isinstance(value, str):
            raise AnnotationError(f'{source}: {key}: {value!r} is not a string: Kubernetes keeps annotation '
                                  f'values as strings (write "{value}")')
        out[key] = value
    return out
