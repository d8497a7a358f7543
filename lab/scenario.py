"""Scenario files: one kind of traffic, the article's claim, and the kernel's path.

A scenario is data (scenarios/*.yaml).  Loading checks every field and names
the file and field of the first problem; nothing runs until all files load.
"""

from __future__ import annotations

import ipaddress
import os
import re
from dataclasses import dataclass
from pathlib import Path

from . import dns, plan
from .errors import LabError
from .rules import features

SCENARIO_DIR = Path(__file__).resolve().parent.parent / "scenarios"
PROTOCOLS = ("http", "tcp", "dns")
TRANSPORTS = ("udp", "tcp")  # how a DNS query travels
TRIGGERS = ("client", "pilot-agent-redial")
ID_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")  # ids are typed on command lines and shown in reports
_LAB_NETWORKS = [ipaddress.ip_network(n) for n in (plan.POD_SUBNET, plan.SERVICE_RANGE, "127.0.0.0/8")]


class ScenarioError(LabError):
    """A scenario file the lab cannot use: names the file, the field and the problem."""


@dataclass(frozen=True)
class Endpoint:
    pod: str
    label: str  # the name the article's notation gives it, e.g. "Local Pod"
    process: str = ""
    uid: int = 0
    gid: int = 0


@dataclass(frozen=True)
class Scenario:
    id: str
    title: str
    type: int | None  # the article's traffic type, 1-6; None for traffic the article does not cover
    variant_of: str | None
    article_path: str  # verbatim; "" when the article shows the path only as a picture
    article_claim: str  # the article's sentence about this traffic, verbatim
    article_proxies: tuple[str, ...] | None  # the proxies the claim names, when it gives no path
    source: Endpoint
    address: str  # the destination as dialed
    port: int
    protocol: str  # "http": one GET; "tcp": a stream opened and half-closed (istiod's xDS); "dns": one query
    trigger: str  # "client": the lab dials as from.uid/gid; "pilot-agent-redial": the real agent re-dials istiod
    destination: str  # label of where the traffic should end
    expected_path: str  # under the default profile (the article's Istio)
    explanation: str
    file: str
    expected_by_profile: tuple[tuple[str, str], ...] = ()  # (profile, path) where a profile's path differs
    family: int = 4  # 6: the scenario's IPv6 twin (lab.dualstack), addresses mapped to the IPv6 plan
    article_note: str = ""  # why the article makes no claim about this traffic (then claim, path are "")
    query: str = ""  # the name a DNS scenario asks for
    transport: str = ""  # "udp" | "tcp" for a DNS query
    feature: str | None = None  # the rule feature it is about: `run` picks it only when the rules have it

    @property
    def has_article_claim(self) -> bool:
        return not self.article_note

    def expected_for(self, profile: str) -> str:
        """The path measured under `profile`: its own where recorded, else the default's."""
        return dict(self.expected_by_profile).get(profile, self.expected_path)

    @property
    def endpoint_pod(self) -> str:
        """The pod the traffic should end in: a VIP's endpoint, a pod IP's pod, or the source for loopback."""
        service = plan.service_at(self.address, self.port)
        return service.pod if service else plan.pod_at(self.address) or self.source.pod

    @property
    def traced_pods(self) -> tuple[str, ...]:
        """The pod whose rules decide the path, and the one that shows where it ends."""
        return tuple(dict.fromkeys(("sidecar", self.endpoint_pod)))

    @property
    def traced_ports(self) -> tuple[int, ...]:
        """The ports whose packets the scenario traces: its own and the proxies'."""
        ports = {self.port, plan.Port.OUTBOUND, plan.Port.INBOUND}
        service = plan.service_at(self.address, self.port)
        ports |= {service.target_port} if service else set()
        if self.protocol == "dns":
            ports.add(plan.Port.DNS_PROXY)
        return tuple(sorted(ports))

    @property
    def traced_udp_ports(self) -> tuple[int, ...]:
        """A UDP query's ports: the resolver's and the DNS proxy's (none for TCP traffic)."""
        return (self.port, plan.Port.DNS_PROXY) if self.transport == "udp" else ()


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


def _expected_by_profile(expected: _Fields) -> tuple[tuple[str, str], ...]:
    """expected.profiles: {profile name: path}, for the profiles whose measured path differs."""
    from .rules import profiles

    given = expected.get("profiles", dict, required=False, default={})
    known = profiles.names()
    for name, text in given.items():
        if name not in known:
            raise expected.fail("profiles", f"unknown profile {name!r} (profiles: {', '.join(known)})")
        if not isinstance(text, str) or not text.strip():
            raise expected.fail(f"profiles.{name}", "expected a path in the article's notation")
    return tuple(given.items())


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


def parse(data, file: str) -> Scenario:
    top = _Fields(data, file)
    top.unknown({"id", "title", "type", "variant_of", "article", "traffic", "expected", "explanation", "feature"})
    article = top.sub("article")
    article.unknown({"path", "claim", "proxies", "note"})
    note = article.get("note", str, required=False, default="")
    if note and set(article.data) != {"note"}:
        raise article.fail("note", "says the article makes no claim: give it alone, without path, claim or proxies")
    traffic = top.sub("traffic")
    traffic.unknown({"from", "to", "trigger", "query"})
    trigger = traffic.get("trigger", str, required=False, default="client")
    if trigger not in TRIGGERS:
        raise traffic.fail("trigger", f"{trigger!r} is not one of {', '.join(TRIGGERS)}")
    src, to = traffic.sub("from"), traffic.sub("to")
    src.unknown({"pod", "process", "uid", "gid", "label"})
    to.unknown({"pod", "service", "address", "port", "protocol", "transport", "label"})
    protocol = to.get("protocol", str, required=False, default="http")
    if protocol not in PROTOCOLS:
        raise to.fail("protocol", f"{protocol!r} is not one of {', '.join(PROTOCOLS)}")
    transport, query = _dns_query(traffic, to, protocol)
    feature = top.get("feature", str, required=False)
    if feature is not None and feature not in features.FEATURES:
        raise top.fail("feature", f"{feature!r} is not one of {', '.join(features.FEATURES)}")
    expected = top.sub("expected")
    expected.unknown({"path", "profiles"})
    by_profile = _expected_by_profile(expected)
    proxies = article.get("proxies", list, required=False)
    if proxies is not None and not all(isinstance(p, str) for p in proxies):
        raise article.fail("proxies", f"expected a list of proxy names, got {proxies!r}")
    scenario_type = top.get("type", int, required=not note)
    if scenario_type is not None and not 1 <= scenario_type <= 6:
        raise top.fail("type", f"the article has traffic types 1-6, not {scenario_type}")
    scenario = Scenario(
        id=_scenario_id(top),
        title=top.get("title", str),
        type=scenario_type,
        variant_of=top.get("variant_of", str, required=False),
        article_path=article.get("path", str, required=False, default=""),
        article_claim=article.get("claim", str, required=not note, default=""),
        article_proxies=tuple(proxies) if proxies is not None else None,
        source=Endpoint(_pod(src, "pod"), src.get("label", str), src.get("process", str), _id(src, "uid"), _id(src, "gid")),
        address=_destination(to),
        port=_port(to, "port"),
        protocol=protocol,
        trigger=trigger,
        destination=to.get("label", str),
        expected_path=expected.get("path", str),
        explanation=top.get("explanation", str),
        file=file,
        expected_by_profile=by_profile,
        article_note=note,
        query=query,
        transport=transport,
        feature=feature,
    )
    if trigger == "pilot-agent-redial" and (scenario.address, scenario.port) != (plan.PODS["istiod"], plan.Port.ISTIOD):
        raise traffic.fail("trigger", f"pilot-agent re-dials istiod only ({plan.PODS['istiod']}:{plan.Port.ISTIOD})")
    if not scenario.article_path and scenario.article_proxies is None and not note:
        raise article.fail("path", "missing (or give article.proxies when the article has no path in words)")
    from . import path as pathlib  # the notation must read back

    texts = [("article.path", scenario.article_path), ("expected.path", scenario.expected_path)]
    texts += [(f"expected.profiles.{name}", text) for name, text in by_profile]
    for key, text in texts:
        if text:
            try:
                pathlib.parse(text)
            except ValueError as e:
                raise ScenarioError(f"{file}: {key}: {e}") from None
    return scenario


def load_file(file: str) -> Scenario:
    import yaml

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


def load_all(directory: Path | str | None = None) -> list[Scenario]:
    directory = directory or SCENARIO_DIR
    if not os.path.isdir(directory):
        raise ScenarioError(f"{directory}: no such scenario directory")
    files = sorted(str(p) for p in Path(directory).glob("*.yaml"))
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


def select(scenarios: list[Scenario], ids: list[str]) -> list[Scenario]:
    if not ids:
        return scenarios
    by_id = {s.id: s for s in scenarios}
    unknown = [i for i in ids if i not in by_id]
    if unknown:
        raise ScenarioError(f"unknown scenario id {unknown[0]!r} (istio-lab list shows them)")
    return [by_id[i] for i in ids]
