"""The lab as a library: bring up a lab with a rule set, fire flows, get their results,
tear down.  The CLI, the pytest plugin and the tests all go through here.

    with api.Session(ruleset.profile("istio-1.13")) as session:
        result = session.run(scenario)            # a scenario file's flow
        result = session.request("sidecar", "10.96.0.90", 9080, uid=1000)   # any flow
"""

from __future__ import annotations

from dataclasses import dataclass

from . import backend as backends
from . import dualstack, interrupts, plan, preflight, processes, record
from . import path as paths
from .addr import Address
from .backend import Backend
from .errors import LabError
from .observe import Witnesses, observe
from .podspec import PodSpec
from .result import Result, conclude
from .rules import routing
from .rules.ruleset import RuleSet
from .rules.xtables import RuleError
from .scenario import PROTOCOLS, Expectation, Scenario, Source, Traffic
from .trace import TraceError
from .world import Lab, ipr


class RulesRefused(LabError):
    """The kernel (or the backend's tool) refused a rule of the rule set: bad input."""


def ready_machine(backend: Backend) -> list[str]:
    """Preflight for the backend (PreflightError names every missing piece), then reap the
    labs whose owner died (a SIGKILLed run, say); returns the ids of the labs reaped."""
    preflight.check(backend.name)
    return record.reap_orphans()


def bring_up(lab: Lab, rules: RuleSet, backend: Backend) -> None:
    """The sidecar's rules and the policy routing TPROXY needs, then the processes (rules
    first, as Istio's init container).  Rules that capture DNS get pilot-agent's DNS proxy,
    as ISTIO_META_DNS_CAPTURE turns on both."""
    sidecar = lab.pod("sidecar").ns
    if lab.record.backend != backend.name:
        raise LabError(f"lab {lab.labid} was made for the {lab.record.backend} backend, not {backend.name}")
    try:
        backend.apply_rules(sidecar, rules)
    except RuleError as e:
        raise RulesRefused(f"{rules.name}: {e}") from None
    with interrupts.held(), ipr(sidecar) as sock:
        for dump in rules.dumps:
            routing.apply(sock, dump)
        if rules.nft is not None:
            routing.apply_native(sock, rules.nft, (4, 6) if lab.ipv6 else (4,))
    processes.start(lab, rules.inbound_mode, dns_proxy="dns-capture" in rules.features,
                    one_listener=rules.one_listener)


@dataclass(frozen=True)
class Flow:
    """A flow asked about by address, not by scenario file (the plugin's, a probe's).

    protocol "http": one GET; "tcp": a stream opened, half-closed and read to its end; "udp":
    one datagram (an echo answers it where one listens; a datagram delivered to a socket that
    does not answer is still a path); "dns": one query for `query`, over `transport`."""

    source: str  # a pod
    to: Address
    uid: int = plan.APP_UID
    gid: int = plan.APP_GID
    protocol: str = "http"
    query: str = ""  # "dns": the name asked
    transport: str = ""  # "dns": "udp" or "tcp" (default udp); the others imply theirs
    timeout: float = 2.0  # seconds the client waits for each step
    source_label: str = ""  # how the path names its ends (default: the lab's pod labels)
    destination_label: str = ""

    def scenario(self, expect: str = "") -> Scenario:
        if self.source not in plan.PODS:
            raise LabError(f"no pod {self.source!r} (pods: {', '.join(plan.PODS)})")
        if self.protocol not in PROTOCOLS:
            raise LabError(f"protocol {self.protocol!r} is not one of {', '.join(PROTOCOLS)}")
        if self.protocol == "dns" and not self.query:
            raise LabError("a DNS query needs the name it asks (query)")
        try:
            expected = Expectation(paths.parse(expect)) if expect else None
        except ValueError as e:  # a path the notation cannot read fails here, not as a wrong verdict
            raise LabError(f"expect: {e}") from None
        service = plan.service_at(self.to.ip, self.to.port)
        to = service.pod if service else plan.pod_at(self.to.ip) or self.source
        transport = (self.transport or "udp") if self.protocol == "dns" else "udp" if self.protocol == "udp" else "tcp"
        source = Source(self.source, self.source_label or plan.POD_LABELS[self.source], "", self.uid, self.gid)
        traffic = Traffic(source, self.to, self.destination_label or plan.POD_LABELS[to], self.protocol, transport,
                          self.query, timeout=self.timeout)
        return Scenario(id="flow", title=f"{self.source} as {self.uid}:{self.gid} -> {self.to}", type=None,
                        variant_of=None, traffic=traffic, expected=expected, article=None, explanation="", file="")


class Session:
    """A lab with a rule set applied, its processes up and its witnesses bound.  A context
    manager: it always tears down."""

    def __init__(self, rules: RuleSet, backend: Backend | str = backends.AUTO, labid: str | None = None,
                 spec: PodSpec = PodSpec()):
        self.rules = rules
        self.backend = backends.choose(backend, rules.native)[0] if isinstance(backend, str) else backend
        if rules.written:  # rules written by both backends: the lab reads both
            self.backend = backends.mixed(rules.written)
        self.lab = Lab(labid, ipv6=rules.dual_stack, spec=spec.resolved(rules.istio), backend=self.backend.name)
        self.witnesses: Witnesses | None = None

    def __enter__(self) -> "Session":
        return self.open()

    def open(self) -> "Session":
        """Build the lab, apply the rules, start the processes, bind the witnesses."""
        self.lab.create()
        try:
            bring_up(self.lab, self.rules, self.backend)
            self.witnesses = Witnesses(self.lab, self.backend)
        except BaseException:
            self.close()
            raise
        return self

    def close(self, keep_namespaces: bool = False) -> None:
        """Tear the lab down; with `keep_namespaces`, everything but its namespaces, which
        lab.destroy() removes later (world.Lab.stop says why a run of labs would)."""
        try:
            if self.witnesses is not None:
                self.witnesses.close()
                self.witnesses = None
        finally:
            if keep_namespaces:
                self.lab.stop()
            else:
                self.lab.destroy()

    def __exit__(self, *exc) -> None:
        self.close()

    def run(self, s: Scenario) -> Result:
        """Fire the scenario's flow and conclude; a flow that could not be measured is a
        failed Result that says why, not an exception."""
        try:
            seen = observe(self.lab, self.witnesses, s.traffic)
        except (LabError, TraceError) as e:
            return conclude(s, self.rules.profile, None, str(e))
        return conclude(s, self.rules.profile, seen)

    def run_all(self, scenarios: list[Scenario]) -> list[Result]:
        """Every scenario; in a dual-stack lab each followed by its IPv6 twin."""
        if self.lab.ipv6:
            scenarios = dualstack.both_families(scenarios)
        return [self.run(s) for s in scenarios]

    def request(self, source: str, address: str, port: int, *, uid: int = plan.APP_UID, gid: int | None = None,
                protocol: str = "http", expect: str = "", query: str = "", transport: str = "",
                timeout: float = 2.0) -> Result:
        """One flow from a pod as uid/gid (gid defaults to uid) to address:port; with `expect`
        (a path in the article's notation) its verdict says whether the kernel took it."""
        flow = Flow(source, Address(address, port), uid, uid if gid is None else gid, protocol, query, transport,
                    timeout)
        return self.run(flow.scenario(expect))
