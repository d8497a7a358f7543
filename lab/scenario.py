"""Scenario files: one kind of traffic, the article's claim, and the kernel's path.

A scenario is data (scenarios/*.yaml).  Loading checks every field and names
the file and field of the first problem; nothing runs until all files load.
"""

from __future__ import annotations

import ipaddress
import os
import re
from dataclasses import dataclass
from pathlib import Path as PathLib

import yaml

from . import dns, plan, podspec
from . import path as paths
from .addr import Address
from .errors import LabError
from .path import Path
from .podspec import PodSpec
from .rules import annotations, features, profiles

# An installed wheel carries the scenario files as lab/scenarios; a checkout has them at its top.
_HERE = PathLib(__file__).resolve().parent
SCENARIO_DIR = _HERE / "scenarios" if (_HERE / "scenarios").is_dir() else _HERE.parent / "scenarios"
PROTOCOLS = ("http", "tcp", "dns", "udp")  # udp: one datagram to an echo (not DNS)
TRANSPORTS = ("udp", "tcp")  # how a DNS query travels
TRIGGERS = ("client", "pilot-agent-redial")
ID_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")  # ids are typed on command lines and shown in reports
_LAB_NETWORKS = [ipaddress.ip_network(n) for n in (plan.POD_SUBNET, plan.SERVICE_RANGE, "127.0.0.0/8")]
# How `istio-lab list` groups scenarios, and `run --group` picks them: a file says `group:`,
# or its kind says it (a type, a variant of one, a DNS capture scenario).
GROUPS = {"types": "The article's traffic types", "variants": "Their variants",
          "dns": "DNS capture", "problems": "The problems people hit (Istio's most reported interception issues)",
          "other": "Other traffic"}
BACKENDS = ("legacy", "nft")  # what may write a scenario's rules (lab.backend's names)
ISSUE_RE = re.compile(r"^[A-Za-z0-9_.-]+/[A-Za-z0-9_.-]+#\d+$")  # istio/istio#4286


class ScenarioError(LabError):
    """A scenario file the lab cannot use: names the file, the field and the problem."""


@dataclass(frozen=True)
class Source:
    """Who sends: a process in a pod, as a user or as the container it belongs to."""

    pod: str
    label: str  # the name the article's notation gives it, e.g. "Local Pod"
    process: str = ""
    uid: int = plan.APP_UID
    gid: int = plan.APP_GID
    container: str | None = None  # plan.ISTIO_PROXY: runs as the sidecar container does

    def identity(self, inbound_mode: str, sidecar: plan.Identity | None = None) -> plan.Identity:
        """Who the flow is sent as.  A process of the istio-proxy container runs as the
        container does, and Istio's injection decides that by the inbound mode (uid 0, gid
        1337 and NET_ADMIN under TPROXY): the data names the container, the lab's mode the user
        (or the lab's own `sidecar` identity, where its pod overrides injection's)."""
        if self.container == plan.ISTIO_PROXY:
            return sidecar or plan.SIDECAR_IDENTITY[inbound_mode]
        return plan.Identity(self.uid, self.gid)


@dataclass(frozen=True)
class Traffic:
    """One flow: from whom, to which address as dialed, how, and what the notation calls its end."""

    source: Source
    to: Address
    label: str  # the destination's name in the notation
    protocol: str = "http"  # "http": one GET; "tcp": a stream opened and half-closed; "dns": one query;
    # "udp": one datagram, echoed
    transport: str = "tcp"  # "udp" for a DNS query over UDP, and for "udp"
    query: str = ""  # the name a DNS query asks for
    trigger: str = "client"  # "client": the lab dials; "pilot-agent-redial": the real agent re-dials istiod
    timeout: float = 2.0  # seconds the client waits for each step (connect, an answer)

    @property
    def family(self) -> int:
        return self.to.family

    @property
    def endpoint_pod(self) -> str:
        """The pod the flow should end in: a VIP's endpoint, a pod IP's pod, or the source for loopback."""
        service = plan.service_at(self.to.ip, self.to.port)
        return service.pod if service else plan.pod_at(self.to.ip) or self.source.pod


@dataclass(frozen=True)
class Expectation:
    """The path the kernel was measured to take, per profile: the default profile's, and each
    profile's own where it differs."""

    default: Path
    by_profile: tuple[tuple[str, Path], ...] = ()
    not_measured: tuple[tuple[str, str], ...] = ()  # profile -> why no path is recorded under it
    ipv6: tuple[tuple[str, Path], ...] = ()  # profile -> the IPv6 twin's path where it is not the IPv4 one's

    def path(self, profile: str) -> Path:
        return dict(self.by_profile).get(profile, self.default)

    def over_ipv6(self) -> "Expectation":
        """The IPv6 twin's expectation: the IPv4 path under each profile, but where the IPv6
        packet takes other rules (one inet table numbers both families' rules in one chain)."""
        return Expectation(self.default, tuple({**dict(self.by_profile), **dict(self.ipv6)}.items()),
                           self.not_measured)


@dataclass(frozen=True)
class ArticleClaim:
    """What the article says about the traffic, verbatim."""

    sentence: str
    path_text: str = ""  # its path in its own notation; "" when it draws only a picture
    proxies: tuple[str, ...] | None = None  # the proxies its words name, when it gives no path

    @property
    def path(self) -> Path | None:
        return paths.parse(self.path_text) if self.path_text else None


@dataclass(frozen=True)
class Scenario:
    id: str
    title: str
    type: int | None  # the article's traffic type, 1-6; None for traffic the article does not cover
    variant_of: str | None
    traffic: Traffic
    expected: Expectation | None  # None: a flow asked about with no expectation (the plugin's, a probe's)
    article: ArticleClaim | None  # None: the article makes no claim (article_note says why)
    explanation: str
    file: str
    article_note: str = ""
    feature: str | None = None  # the rule feature it is about: `run` picks it only when the rules have it
    group: str = "other"  # GROUPS
    issues: tuple[str, ...] = ()  # the upstream issues it shows, "istio/istio#4286"
    profile: str | None = None  # the profile it is written for: `run` uses it when given no rules
    annotations: annotations.PodAnnotations | None = None  # its pod's own interception annotations
    pod: PodSpec = PodSpec()  # how its sidecar pod runs
    backends: tuple[str, ...] = ()  # its pod's rules written by these backends, in order (legacy, nft); () the run's

    @property
    def own_rules(self) -> bool:
        """Its pod has annotations of its own: its rules are a profile's with them on top."""
        return self.annotations is not None


class _Fields:
    """Typed access to a mapping that reports `file: field: problem` on misuse."""

    def __init__(self, data, file: str, where: str = ""):
        if not isinstance(data, dict):
            raise ScenarioError(f"{file}: {where or 'top level'}: expected a mapping, got {type(data).__name__}")
        self.data, self.file, self.where = data, file, where

    def _name(self, key) -> str:
        if not (isinstance(key, str) and re.fullmatch(r"[\w.-]+", key)):
            key = repr(key)  # a key from the file may be a number, null, "" or hold a newline
        return f"{self.where}.{key}" if self.where else key

    def fail(self, key: str, problem: str) -> ScenarioError:
        return ScenarioError(f"{self.file}: {self._name(key)}: {problem}")

    def get(self, key: str, kind, required: bool = True, default=None):
        if key not in self.data or self.data[key] is None:
            if required:
                raise self.fail(key, "missing")
            return default
        value = self.data[key]
        if kind is int and isinstance(value, bool) or not isinstance(value, kind):
            raise self.fail(key, f"expected {kind.__name__}, got {type(value).__name__} {value!r}")
        if kind is str and not value.strip() and required:
            raise self.fail(key, "empty")
        return value

    def sub(self, key: str) -> "_Fields":
        return _Fields(self.get(key, dict), self.file, self._name(key))

    def unknown(self, allowed: set[str]) -> None:
        extra = sorted(set(self.data) - allowed, key=str)  # YAML keys may be numbers, null, ...
        if extra:
            raise self.fail(extra[0], f"unknown field (allowed: {', '.join(sorted(allowed))})")


def _port(f: _Fields, key: str) -> int:
    port = f.get(key, int)
    if not 1 <= port <= 65535:
        raise f.fail(key, f"port {port} is out of range 1-65535")
    return port


def _id(f: _Fields, key: str, required: bool = True) -> int:
    value = f.get(key, int, required, 0)
    if not 0 <= value <= 65535:
        raise f.fail(key, f"{value} is not a uid/gid the lab uses (0-65535)")
    return value


def _scenario_id(top: _Fields) -> str:
    value = top.get("id", str)
    if not ID_RE.match(value):
        raise top.fail("id", f"{value!r} is not a scenario id (up to 64 lowercase letters, digits, '.', '_', '-')")
    return value


def _pod(f: _Fields, key: str) -> str:
    pod = f.get(key, str)
    if pod not in plan.PODS:
        raise f.fail(key, f"unknown pod {pod!r} (pods: {', '.join(plan.PODS)})")
    return pod


def _destination(to: _Fields) -> str:
    """The address to dial: a pod's IP, a Service VIP, or a literal inside the lab."""
    given = [k for k in ("pod", "service", "address") if k in to.data]
    if len(given) != 1:
        raise to.fail("pod", "give exactly one of pod, service, address")
    if given[0] == "pod":
        return plan.PODS[_pod(to, "pod")]
    if given[0] == "service":
        name = to.get("service", str)
        for s in plan.SERVICES:
            if s.name == name:
                return s.vip
        raise to.fail("service", f"unknown service {name!r} (services: {', '.join(s.name for s in plan.SERVICES)})")
    address = to.get("address", str)
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        raise to.fail("address", f"{address!r} is not an IP address") from None
    if not any(ip in net for net in _LAB_NETWORKS):
        raise to.fail("address", f"{address} is outside the lab (traffic stays in {', '.join(map(str, _LAB_NETWORKS))})")
    return address


def _dns_query(traffic: _Fields, to: _Fields, protocol: str) -> tuple[str, str]:
    """(transport, name) of a DNS scenario; both empty for other traffic."""
    if protocol != "dns":
        for f, key in ((to, "transport"), (traffic, "query")):
            if key in f.data:
                raise f.fail(key, "only a DNS scenario (protocol: dns) asks a name")
        return "", ""
    transport = to.get("transport", str)
    if transport not in TRANSPORTS:
        raise to.fail("transport", f"{transport!r} is not one of {', '.join(TRANSPORTS)}")
    name = traffic.get("query", str)
    try:
        dns.query(name, id=0)
    except (dns.DnsFormatError, UnicodeError):
        raise traffic.fail("query", f"{name!r} is not a DNS name") from None
    return transport, name


def _path(f: _Fields, key: str, text: str) -> Path:
    try:
        return paths.parse(text)
    except ValueError as e:
        raise f.fail(key, str(e)) from None


def _expectation(expected: _Fields) -> Expectation:
    """expected.path, and expected.profiles: {profile name: path} where a profile's path differs."""
    given = _by_profile(expected, "profiles", "expected a path in the article's notation")
    by_profile = [(name, _path(expected, f"profiles.{name}", text)) for name, text in given.items()]
    unmeasured = _by_profile(expected, "not_measured", "say why no path is recorded under it")
    for name in unmeasured:
        if name in given:
            raise expected.fail(f"not_measured.{name}", "has a path in expected.profiles too")
    twins = _by_profile(expected, "ipv6", "expected the IPv6 twin's path in the article's notation")
    ipv6 = [(name, _path(expected, f"ipv6.{name}", text)) for name, text in twins.items()]
    return Expectation(_path(expected, "path", expected.get("path", str)), tuple(by_profile),
                       tuple((name, " ".join(why.split())) for name, why in unmeasured.items()), tuple(ipv6))


def _by_profile(expected: _Fields, key: str, wanted: str) -> dict[str, str]:
    """expected.KEY: {profile name: non-empty text}, every name a known profile."""
    given = expected.get(key, dict, required=False, default={})
    known = profiles.names(native_nftables=None)
    for name, text in given.items():
        if name not in known:
            raise expected.fail(key, f"unknown profile {name!r} (profiles: {', '.join(known)})")
        if not isinstance(text, str) or not text.strip():
            raise expected.fail(f"{key}.{name}", wanted)
    return given


def _article(article: _Fields) -> tuple[ArticleClaim | None, str]:
    """(the claim, or None with the note that says why the article makes none)."""
    article.unknown({"path", "claim", "proxies", "note"})
    note = article.get("note", str, required=False, default="")
    if note:
        if set(article.data) != {"note"}:
            raise article.fail("note", "says the article makes no claim: give it alone, without path, claim or proxies")
        return None, note
    proxies = article.get("proxies", list, required=False)
    if proxies is not None and not all(isinstance(p, str) for p in proxies):
        raise article.fail("proxies", f"expected a list of proxy names, got {proxies!r}")
    text = article.get("path", str, required=False, default="")
    if not text and proxies is None:
        raise article.fail("path", "missing (or give article.proxies when the article has no path in words)")
    if text:
        _path(article, "path", text)
    return ArticleClaim(article.get("claim", str), text, tuple(proxies) if proxies is not None else None), ""


def _source(src: _Fields, vm: bool = False) -> Source:
    src.unknown({"pod", "process", "uid", "gid", "container", "label"})
    if src.data.get("pod") == plan.VM:  # the KubeVirt VM behind the sidecar pod, when its pod has one
        if not vm:
            raise src.fail("pod", f"{plan.VM!r}: only a scenario whose pod has a VM (pod.vm: true) sends from it")
        return Source(plan.VM, src.get("label", str), src.get("process", str, required=False, default=""),
                      _id(src, "uid"), _id(src, "gid"))
    container = src.get("container", str, required=False)
    if container is not None:
        if container != plan.ISTIO_PROXY:
            raise src.fail("container", f"{container!r}: the lab runs one container besides the apps, {plan.ISTIO_PROXY}")
        for key in ("uid", "gid"):
            if key in src.data:
                raise src.fail(key, f"the {plan.ISTIO_PROXY} container's user follows the inbound mode: give no {key}")
        return Source(_pod(src, "pod"), src.get("label", str), src.get("process", str, required=False, default=""),
                      container=container)
    return Source(_pod(src, "pod"), src.get("label", str), src.get("process", str, required=False, default=""),
                  _id(src, "uid"), _id(src, "gid"))


def _traffic(traffic: _Fields, vm: bool = False) -> Traffic:
    traffic.unknown({"from", "to", "trigger", "query"})
    trigger = traffic.get("trigger", str, required=False, default="client")
    if trigger not in TRIGGERS:
        raise traffic.fail("trigger", f"{trigger!r} is not one of {', '.join(TRIGGERS)}")
    to = traffic.sub("to")
    to.unknown({"pod", "service", "address", "port", "protocol", "transport", "label"})
    protocol = to.get("protocol", str, required=False, default="http")
    if protocol not in PROTOCOLS:
        raise to.fail("protocol", f"{protocol!r} is not one of {', '.join(PROTOCOLS)}")
    transport, query = _dns_query(traffic, to, protocol)
    found = Traffic(_source(traffic.sub("from"), vm), Address(_destination(to), _port(to, "port")),
                    to.get("label", str), protocol, transport or ("udp" if protocol == "udp" else "tcp"), query, trigger)
    istiod = Address(plan.PODS["istiod"], plan.Port.ISTIOD)
    if trigger == "pilot-agent-redial" and found.to != istiod:
        raise traffic.fail("trigger", f"pilot-agent re-dials istiod only ({istiod})")
    return found


def _issues(top: _Fields) -> tuple[str, ...]:
    given = top.data.get("issue")
    if given is None:
        return ()
    items = given if isinstance(given, list) else [given]
    for item in items:
        if not isinstance(item, str) or not ISSUE_RE.match(item):
            raise top.fail("issue", f"{item!r} is not an upstream issue such as istio/istio#4286 (a list for several)")
    return tuple(items)


def _pod_spec(pod: _Fields) -> tuple[annotations.PodAnnotations | None, PodSpec]:
    """A scenario's pod: its own annotations, and how it runs (lab.podspec)."""
    pod.unknown({"annotations", "stage", "envoy_inbound", "app_listens", "proxy", "vm"})
    own = None
    if "annotations" in pod.data:
        try:
            own = annotations.from_mapping(pod.get("annotations", dict, required=False, default={}),
                                           f"{os.path.basename(pod.file)}: pod.annotations")
        except annotations.AnnotationError as e:
            raise ScenarioError(str(e)) from None
    stage = pod.get("stage", str, required=False, default=podspec.RUNNING)
    if stage not in podspec.STAGES:
        raise pod.fail("stage", f"{stage!r} is not one of {', '.join(podspec.STAGES)}")
    inbound = pod.get("envoy_inbound", str, required=False, default=podspec.ORIGINAL_DST)
    if inbound not in podspec.ENVOY_INBOUND:
        raise pod.fail("envoy_inbound", f"{inbound!r} is not one of {', '.join(podspec.ENVOY_INBOUND)}")
    listens = pod.get("app_listens", str, required=False, default="any")
    if listens not in ("any", "localhost"):
        raise pod.fail("app_listens", f"{listens!r} is not any or localhost")
    proxy = None
    if "proxy" in pod.data:
        p = pod.sub("proxy")
        p.unknown({"uid", "gid", "capabilities"})
        caps = p.get("capabilities", list, required=False, default=[])
        for cap in caps:
            if cap not in ("NET_ADMIN",):
                raise p.fail("capabilities", f"{cap!r}: the lab's sidecar may keep NET_ADMIN only")
        proxy = plan.Identity(_id(p, "uid"), _id(p, "gid"), tuple(caps))
    vm = pod.get("vm", bool, required=False, default=False)
    return own, PodSpec(stage, inbound, listens == "localhost", proxy, vm)


def _backends(top: _Fields) -> tuple[str, ...]:
    """`backends: [legacy, nft]`: the pod's rules written by each, in this order (the last
    written captures first, where both hook at one priority)."""
    given = top.get("backends", list, required=False, default=[])
    if any(b not in BACKENDS for b in given) or len(set(given)) != len(given):
        raise top.fail("backends", f"{given!r}: give {' and '.join(BACKENDS)}, each at most once, in the order "
                                   f"they write the rules")
    return tuple(given)


def _group(top: _Fields, scenario_type: int | None, variant_of: str | None, feature: str | None) -> str:
    given = top.get("group", str, required=False)
    if given is not None:
        if given not in GROUPS:
            raise top.fail("group", f"{given!r} is not one of {', '.join(GROUPS)}")
        return given
    if feature == features.DNS_CAPTURE:
        return "dns"
    if variant_of:
        return "variants"
    return "types" if scenario_type is not None else "other"


def parse(data, file: str) -> Scenario:
    top = _Fields(data, file)
    top.unknown({"id", "title", "type", "variant_of", "article", "traffic", "expected", "explanation", "feature",
                 "group", "issue", "profile", "pod", "backends"})
    claim, note = _article(top.sub("article"))
    feature = top.get("feature", str, required=False)
    if feature is not None and feature not in features.FEATURES:
        raise top.fail("feature", f"{feature!r} is not one of {', '.join(features.FEATURES)}")
    expected = top.sub("expected")
    expected.unknown({"path", "profiles", "not_measured", "ipv6"})
    scenario_type = top.get("type", int, required=not note)
    if scenario_type is not None and not 1 <= scenario_type <= 6:
        raise top.fail("type", f"the article has traffic types 1-6, not {scenario_type}")
    written_for = top.get("profile", str, required=False)
    if written_for is not None and written_for not in profiles.names(native_nftables=None):
        raise top.fail("profile", f"unknown profile {written_for!r} "
                                  f"(profiles: {', '.join(profiles.names(native_nftables=None))})")
    own, pod = _pod_spec(top.sub("pod")) if "pod" in top.data else (None, PodSpec())
    variant_of = top.get("variant_of", str, required=False)
    return Scenario(
        id=_scenario_id(top),
        title=top.get("title", str),
        type=scenario_type,
        variant_of=variant_of,
        traffic=_traffic(top.sub("traffic"), pod.vm),
        expected=_expectation(expected),
        article=claim,
        explanation=top.get("explanation", str),
        file=file,
        article_note=note,
        feature=feature,
        group=_group(top, scenario_type, variant_of, feature),
        issues=_issues(top),
        profile=written_for,
        annotations=own,
        pod=pod,
        backends=_backends(top),
    )


def load_file(file: str) -> Scenario:
    try:
        with open(file, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise ScenarioError(f"{file}: cannot read: {e.strerror}") from None
    try:
        text = raw.decode()
    except UnicodeDecodeError as e:
        line = raw[:e.start].count(b"\n") + 1
        raise ScenarioError(f"{file}: line {line}: not UTF-8 text ({e.reason})") from None
    try:
        data = yaml.load(text, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    except yaml.YAMLError as e:  # the message must stay one line: a ReaderError's str() has two
        mark = getattr(e, "problem_mark", None)
        at = mark.index if mark else getattr(e, "position", None)
        where = f"line {text[:at].count(chr(10)) + 1}" if at is not None else "?"
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ScenarioError(f"{file}: {where}: bad YAML: {' '.join(str(problem).split())}") from None
    return parse(data, file)


def load_all(directory: PathLib | str | None = None) -> list[Scenario]:
    directory = directory or SCENARIO_DIR
    if not os.path.isdir(directory):
        raise ScenarioError(f"{directory}: no such scenario directory")
    files = sorted(str(p) for p in PathLib(directory).glob("*.yaml"))
    if not files:  # a lab built to run nothing would only hide a mistyped directory
        raise ScenarioError(f"{directory}: no scenario files (*.yaml)")
    scenarios = sorted((load_file(f) for f in files), key=lambda s: s.type is None)  # the article's types first
    seen: dict[str, str] = {}
    for s in scenarios:
        if s.id in seen:
            raise ScenarioError(f"{s.file}: id: {s.id!r} is also the id of {seen[s.id]}")
        seen[s.id] = s.file
    for s in scenarios:
        if s.variant_of and s.variant_of not in seen:
            raise ScenarioError(f"{s.file}: variant_of: no scenario {s.variant_of!r}")
    return scenarios


def for_features(scenarios: list[Scenario], have: frozenset[str]) -> list[Scenario]:
    """What `istio-lab run` picks for rules with features `have`: every scenario but those about
    a feature the rules lack (DNS queries when DNS is not captured).  Named, one runs anyway."""
    return [s for s in scenarios if s.feature is None or s.feature in have]


def in_group(scenarios: list[Scenario], group: str | None) -> list[Scenario]:
    """The scenarios of one group (`run --group`); all for None."""
    if group is None:
        return scenarios
    if group not in GROUPS:
        raise ScenarioError(f"no group {group!r} (groups: {', '.join(GROUPS)})")
    return [s for s in scenarios if s.group == group]


def select(scenarios: list[Scenario], ids: list[str]) -> list[Scenario]:
    if not ids:
        return scenarios
    by_id = {s.id: s for s in scenarios}
    unknown = [i for i in ids if i not in by_id]
    if unknown:
        raise ScenarioError(f"unknown scenario id {unknown[0]!r} (istio-lab list shows them)")
    return [by_id[i] for i in ids]
