"""Fire each scenario's traffic in a lab and judge it by three witnesses.

The witnesses: TRACE events from every pod, the sidecar's nat rule counters (and those of
its raw table's own chains, DNS capture's conntrack zones), and the proxies' logs (Envoy's
access log, pilot-agent's DNS log).  The path comes from the first and third; the second
must agree with the first, rule for rule, or the result says so.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

from . import path as paths
from . import dualstack, interrupts, plan, processes, workloads
from .errors import LabError
from .rules import profiles, xtables
from .rules.save import BUILTIN_CHAINS
from .scenario import Scenario
from .sidecar.httpio import addr
from .trace import TraceError, TraceEvent, TraceReader
from .world import Lab


@dataclass
class Result:
    scenario: Scenario
    measured: paths.Path = field(default_factory=paths.Path)
    legs: list[paths.Leg] = field(default_factory=list)
    rule_hits: list[str] = field(default_factory=list)
    counter_deltas: dict[str, int] = field(default_factory=dict)  # rule (paths.rule_ref) -> packets during the scenario
    trace_rule_events: dict[str, int] = field(default_factory=dict)  # rule (paths.rule_ref) -> TRACE `rule` events
    rule_lines: dict[str, str] = field(default_factory=dict)
    endpoint: str = ""  # "pod ip:port" where the last leg's SYN reached INPUT
    response: dict | None = None
    events: list[TraceEvent] = field(default_factory=list)
    failure: str | None = None
    profile: str | None = profiles.DEFAULT  # whose expectation applies; None: a pod's own rules, none known
    sidecar_uid: int = plan.PROXY_UID  # Envoy's and pilot-agent's uid in the lab (0 in TPROXY mode)

    @property
    def expected_path(self) -> str | None:
        return None if self.profile is None else self.scenario.expected_for(self.profile)

    @property
    def counters_agree(self) -> bool:
        """Every rule TRACE saw moved its counter by as many packets (nat, raw) or at least as
        many (mangle: see _exact), and no nat or raw counter moved without TRACE seeing it."""
        for ref in set(self.counter_deltas) | set(self.trace_rule_events):
            moved, seen = self.counter_deltas.get(ref, 0), self.trace_rule_events.get(ref, 0)
            if moved != seen if _exact(ref) else moved < seen:
                return False
        return True

    @property
    def measured_path(self) -> str:
        return str(self.measured) if self.failure is None else ""

    @property
    def article_differences(self) -> list[str]:
        s = self.scenario
        if self.failure or not s.has_article_claim:
            return []
        if s.article_path:
            return paths.differences(paths.parse(s.article_path), self.measured)
        proxies = [h.name for h in self.measured.hops if h.kind == "proxy"]
        if list(s.article_proxies or ()) != proxies:
            return [f"the article says the traffic passes {', '.join(s.article_proxies) or 'no proxy'}; "
                    f"the kernel sends it through {', '.join(proxies) or 'no proxy'}"]
        return []

    @property
    def matches_article(self) -> bool | None:
        """None when the article says nothing about the traffic (a DNS query, say)."""
        if not self.scenario.has_article_claim:
            return None
        return self.failure is None and not self.article_differences

    @property
    def agreement(self) -> str:
        """One word for the reports: "agrees", "differs", "no claim", or "-" for a failed run."""
        if self.failure:
            return "-"
        return {True: "agrees", False: "differs", None: "no claim"}[self.matches_article]

    @property
    def path_as_expected(self) -> bool:
        """The measured path is the profile's (with no expectation known, any measured path is)."""
        expected = self.expected_path
        return self.failure is None and (expected is None or self.measured_path == str(paths.parse(expected)))

    @property
    def verdict(self) -> str:
        return "pass" if self.path_as_expected and self.counters_agree and self.endpoint else "fail"


def _trace_rule(ports: tuple[int, ...], protocol: str = "tcp") -> tuple[str, ...]:
    return ("-p", protocol, "-m", "multiport", "--ports", ",".join(map(str, ports)), "-j", "TRACE")


def _witnessed(table: str, chain: str) -> bool:
    """The rules whose counters are checked against TRACE's events: nat's, mangle's (TPROXY
    mode), and the raw table's own chains (DNS capture's conntrack zones); raw's built-in
    chains hold the TRACE rules themselves."""
    return table in ("nat", "mangle") or table == "raw" and chain not in BUILTIN_CHAINS["raw"]


def _exact(ref: str) -> bool:
    """Must this rule's counter equal its TRACE events, or only cover them?

    nat judges a connection's first packet only, and raw's zone rules see the scenario's
    datagrams only, so theirs must be equal.  mangle sees every packet of every connection in
    the pod, and a connection's last ACK may pass after its events were read: its counter
    must have moved by at least as many packets as TRACE reported, never fewer.
    """
    return not ref.startswith("mangle:")


def _split(ref: str) -> tuple[str, str]:
    """(table, chain) of a rule named by paths.rule_ref."""
    chain = ref.rsplit("#", 1)[0]
    return tuple(chain.split(":", 1)) if ":" in chain else ("nat", chain)


def _counters(ns: str, family: int, tables: tuple[str, ...]) -> dict[str, int]:
    out = {}
    for table in tables:
        for key, packets in xtables.packet_counts(ns, table, family).items():
            chain, num = key.rsplit("#", 1)
            if _witnessed(table, chain):
                out[paths.rule_ref(table, chain, int(num))] = packets
    return out


class Witnesses:
    """TRACE readers on every pod for the lab's life, TRACE rules per scenario.

    In a dual-stack lab the same for ip6tables: IPv6 tables made to exist in every pod,
    the sidecar's IPv6 nat rules read, and an IPv6 scenario's TRACE rules in ip6tables raw.
    """

    def __init__(self, lab: Lab):
        self.lab = lab
        self.readers: list[TraceReader] = []
        self.families = (4, 6) if lab.ipv6 else (4,)
        sidecar = lab.pod("sidecar").ns
        self.rule_lines_by_family = {f: {paths.rule_ref(table, r.chain, r.num): r.line
                                         for table in paths.SHOWN_TABLES for r in xtables.listing(sidecar, table, f)}
                                     for f in self.families}
        # Only tables holding a witnessed rule are read per scenario: a table read costs a
        # handle, and the default profile has rules in nat alone.
        self.counted_tables = {f: tuple(t for t in ("raw", "mangle", "nat")
                                        if any(_split(ref)[0] == t and _witnessed(*_split(ref)) for ref in lines))
                               for f, lines in self.rule_lines_by_family.items()}
        try:
            for pod in lab.pods.values():
                for family in self.families:
                    xtables.touch(pod.ns, family)
                self.readers.append(TraceReader(pod.ns, pod.name))
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        for reader in self.readers:
            reader.close()
        self.readers = []

    @contextlib.contextmanager
    def tracing(self, scenario: Scenario):
        """TRACE rules at the head of raw PREROUTING and OUTPUT in the pods the scenario
        crosses, for its ports only (in ip6tables for an IPv6 scenario); removed after."""
        traced = [_trace_rule(scenario.traced_ports)]
        if scenario.traced_udp_ports:
            traced.append(_trace_rule(scenario.traced_udp_ports, "udp"))
        rules = [(chain, rule) for rule in traced for chain in ("PREROUTING", "OUTPUT")]
        placed = []
        try:
            for pod in scenario.traced_pods:
                ns = self.lab.pod(pod).ns
                xtables.insert(ns, "raw", rules, scenario.family)
                placed.append(ns)
            for reader in self.readers:
                reader.drain(settle=0)  # whatever came before belongs to no scenario
            yield
        finally:
            for ns in placed:
                xtables.delete(ns, "raw", rules, scenario.family)

    def events(self) -> dict[str, list[TraceEvent]]:
        """Everything queued now.  No settle window is needed: every leg's SYN has been
        through every hook before the client gets its answer, and only SYNs make hops;
        a straggling final ACK is discarded by the next scenario's tracing()."""
        return {reader.pod: reader.drain(settle=0) for reader in self.readers}




@dataclass
class Observation:
    """What the witnesses saw of one scenario: enough to judge it again offline."""

    response_local: str  # the client socket's address: the first leg's client
    response_status: int
    response_body: str
    events: dict[str, list[TraceEvent]]  # pod -> TRACE events
    counters_before: dict[str, int]  # rule "CHAIN#N" (nat) or "raw:CHAIN#N" -> packets
    counters_after: dict[str, int]
    rule_lines: dict[str, str]  # rule, named as in the counters (paths.rule_ref) -> its line, as applied
    access_log: list[dict]  # Envoy's access log, then pilot-agent's DNS log


def _fire(lab: Lab, scenario: Scenario) -> workloads.Response:
    if scenario.trigger == "pilot-agent-redial":
        agent = processes.redial_istiod(lab, family=scenario.family)
        return workloads.Response(0, "", agent, addr((scenario.address, scenario.port)))
    src = scenario.source
    if scenario.protocol == "dns":
        return workloads.dns_query(lab.pod(src.pod).ns, scenario.address, scenario.port, scenario.query,
                                   transport=scenario.transport, uid=src.uid, gid=src.gid)
    fire = workloads.request if scenario.protocol == "http" else workloads.stream
    # The sidecar's own processes run as the inbound mode has them (uid 0 in TPROXY mode);
    # a scenario's uid/gid are those of the default sidecar.
    sidecar = processes.identity(lab, src.process) if src.pod == "sidecar" else None
    uid, gid = (sidecar.uid, sidecar.gid) if sidecar else (src.uid, src.gid)
    return fire(lab.pod(src.pod).ns, scenario.address, scenario.port, uid=uid, gid=gid)


def observe(lab: Lab, witnesses: Witnesses, scenario: Scenario) -> Observation:
    sidecar = lab.pod("sidecar").ns
    interrupts.check()
    processes.check_alive(lab)
    with witnesses.tracing(scenario):
        tables = witnesses.counted_tables[scenario.family]
        before = _counters(sidecar, scenario.family, tables)
        # This scenario's lines only: legs are joined by address, and a port the kernel hands
        # out again (another scenario's connection, earlier) would join a stale leg.
        logged, asked = len(processes.access_log(lab)), len(processes.dns_proxy_log(lab))
        try:
            response = _fire(lab, scenario)
        except workloads.RequestError:
            processes.check_alive(lab)  # a dead proxy is the better answer than "refused"
            raise
        events = witnesses.events()
        after = _counters(sidecar, scenario.family, tables)
    processes.check_alive(lab)
    return Observation(response.local, response.status, response.body, events, before, after,
                       witnesses.rule_lines_by_family[scenario.family],
                       processes.access_log(lab)[logged:] + processes.dns_proxy_log(lab)[asked:])


def judge(scenario: Scenario, seen: Observation, profile: str | None = profiles.DEFAULT) -> Result:
    """Join the witnesses into a path and compare; pure, so recorded runs can be judged again."""
    result = Result(scenario, profile=profile)
    result.response = {"status": seen.response_status, "local": seen.response_local, "body": seen.response_body}
    result.events = [e for events in seen.events.values() for e in events]
    before, after = seen.counters_before, seen.counters_after
    result.rule_lines = seen.rule_lines
    result.counter_deltas = {ref: n - before.get(ref, 0) for ref, n in after.items() if n != before.get(ref, 0)}
    sidecar_events = seen.events["sidecar"]
    for e in sidecar_events:
        if e.kind == "rule" and _witnessed(e.table, e.chain):
            ref = paths.rule_ref(e.table, e.chain, e.rulenum)
            result.trace_rule_events[ref] = result.trace_rule_events.get(ref, 0) + 1
    result.legs = paths.chain_legs(seen.response_local, addr((scenario.address, scenario.port)), seen.access_log)
    rule_counts: dict[str, int] = {}
    for ref in result.rule_lines:
        chain = ref.rsplit("#", 1)[0]
        rule_counts[chain] = rule_counts.get(chain, 0) + 1
    result.measured = paths.build(scenario.source.label, scenario.destination, result.legs, sidecar_events,
                                  rule_counts, result.rule_lines)
    result.rule_hits = [f"{e.chain}#{e.rulenum}" for leg in result.legs
                        for e in paths.syn_events(sidecar_events, leg) if e.table == "nat" and e.kind == "rule"]
    result.endpoint = _endpoint(result.events, result.legs[-1])
    if not result.endpoint:
        result.failure = f"the last leg {result.legs[-1].client} > {result.legs[-1].server} never reached INPUT in any pod"
    return result


def run_one(lab: Lab, witnesses: Witnesses, scenario: Scenario, profile: str | None = profiles.DEFAULT) -> Result:
    sidecar_uid = processes.identity(lab, "envoy").uid
    try:
        result = judge(scenario, observe(lab, witnesses, scenario), profile)
    except (LabError, TraceError) as e:
        result = Result(scenario, failure=str(e), profile=profile)
    result.sidecar_uid = sidecar_uid
    return result


def _endpoint(events: list[TraceEvent], leg: paths.Leg) -> str:
    for e in paths.syn_events(events, leg):
        if e.chain == "INPUT":
            return f"{e.pod} {addr((e.dst, e.dport))}"
    return ""


def run(lab: Lab, scenarios: list[Scenario], profile: str | None = profiles.DEFAULT) -> list[Result]:
    """Every scenario, judged against `profile`'s expectations (None: a foreign rule set);
    in a dual-stack lab each is followed by its IPv6 twin."""
    if lab.ipv6:
        scenarios = dualstack.both_families(scenarios)
    witnesses = Witnesses(lab)
    try:
        return [run_one(lab, witnesses, s, profile) for s in scenarios]
    finally:
        witnesses.close()
