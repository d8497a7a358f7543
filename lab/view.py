"""The view-model: what every report shows of a run, worked out once.

The terminal report, the JSON document, the Markdown summary and the HTML page render
these values and decide nothing: which counters to list and in what order, what the
article's claim reads as, why a scenario failed, where the flow ended.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .addr import Address
from .compare import ArticleComparison
from .join import Leg
from .measure import Measurement
from .netfilter import RuleRef
from .path import Path
from .rules import profiles
from .scenario import Scenario, Source
from .verdict import Verdict


@dataclass(frozen=True)
class CounterRow:
    """A witnessed rule that moved or that TRACE saw: its counter beside TRACE's events."""

    rule: RuleRef
    moved: int
    traced: int
    line: str
    plays: str = ""  # the xtables table the rule's table is or plays (nat for istio-proxy-nat)


@dataclass(frozen=True)
class ScenarioView:
    id: str
    title: str
    type: int | None
    variant_of: str | None
    explanation: str
    profile: str | None  # whose expectation applied; None for a pod's own rules matching no profile
    passed: bool
    failure: str | None  # why the flow was not measured (then there is no path)
    problems: tuple[str, ...]  # why it failed, one line each
    measured: Path | None
    expected: Path | None
    article: ArticleComparison
    article_note: str  # why the article makes no claim
    default_differences: tuple[str, ...] | None  # a pod's own rules: where they leave the default profile's path
    default_path: Path | None
    counters: tuple[CounterRow, ...]  # the flow's rules first, in the order it matched them
    counters_agree: bool
    reached_pod: str
    reached: Address | None
    legs: tuple[Leg, ...]
    rule_hits: tuple[RuleRef, ...]
    source: Source
    sender_uid: int | None  # who the flow was sent as (the kernel's owner match sees this uid)
    sidecar_uid: int | None  # who Envoy and pilot-agent run as
    family: int
    response: dict = field(default_factory=dict)
    evidence: tuple[str, ...] = ()  # a failed flow's raw evidence, so a log alone explains it
    group: str = "other"  # scenario.GROUPS
    issues: tuple[str, ...] = ()  # the upstream issues the scenario shows
    pod: str = ""  # how its sidecar pod ran, where not as a running default pod (PodSpec.describe)
    rules: str = ""  # its rules, where not the run's own (a scenario's own pod annotations, its profile)
    ending: str = "reached"  # how the measured path ends: "reached", "died", "closed", "loop"
    told: str = ""  # what the client was told when its flow failed (a timeout, a refusal)

    @property
    def verdict(self) -> str:
        return "pass" if self.passed else "fail"

    @property
    def measured_text(self) -> str:
        return str(self.measured) if self.measured else ""

    @property
    def agreement(self) -> str:
        return self.article.agreement

    @property
    def article_text(self) -> str:
        """The article's words for the terminal: its path verbatim, or its sentence."""
        claim = self.article.claim
        if claim is None:
            return f"(no claim) {self.article_note}"
        return claim.path_text or "(a picture only) " + claim.sentence

    @property
    def article_short(self) -> str:
        claim = self.article.claim
        if claim is None:
            return "(no claim)"
        return claim.path.short() if claim.path else "(picture) " + ", ".join(claim.proxies or ())

    @property
    def reached_text(self) -> str:
        if self.ending in ("died", "closed") and self.measured:
            return str(self.measured.hops[-1])
        if self.ending == "loop" and self.measured:
            return f"looped back into {self.measured.hops[-1].name.split(' (')[0]}"
        return f"{self.reached_pod} {self.reached}" if self.reached else ""

    def counters_in(self, table: str) -> list[CounterRow]:
        """The rules that moved in the tables that are or play `table` (nat, raw, mangle)."""
        return [row for row in self.counters if (row.plays or row.rule.table) == table and row.moved]


@dataclass(frozen=True)
class RunView:
    scenarios: tuple[ScenarioView, ...]
    lab: str = ""
    profile: str | None = None  # the rules' profile (None: a dump that matches none)
    rules_name: str = ""  # the profile's name or the dump's file
    notes: tuple[str, ...] = ()  # what fitting a dump to the lab changed
    backend: str = "legacy"  # the netfilter backend the rules went through

    @property
    def passed(self) -> int:
        return sum(s.passed for s in self.scenarios)

    @property
    def agreeing(self) -> int:
        return sum(s.article.matches is True for s in self.scenarios)

    @property
    def all_passed(self) -> bool:
        return all(s.passed for s in self.scenarios)


def _counter_rows(measured: Measurement) -> tuple[CounterRow, ...]:
    refs = list(dict.fromkeys([*(r for r in measured.rule_hits if r in measured.counters),
                               *sorted(measured.counters), *sorted(measured.trace_counts)]))
    return tuple(CounterRow(ref, measured.counters.get(ref, 0), measured.trace_counts.get(ref, 0),
                            measured.rules.get(ref, ""), measured.layout.role(ref.table)) for ref in refs)


def _problems(verdict: Verdict, measured: Measurement | None, profile: str | None) -> tuple[str, ...]:
    if verdict.failure:
        return (verdict.failure,)
    out = []
    if not verdict.path_as_expected:
        out.append(f"expected ({profile}) {verdict.expected}")
    if measured is not None and not verdict.counters_agree:
        moved = {str(r): measured.counters.get(r, 0) for r in measured.disagreements}
        seen = {str(r): measured.trace_counts.get(r, 0) for r in measured.disagreements}
        out.append(f"rule counters {moved} differ from TRACE rule events {seen}")
    return tuple(out)


def _evidence(measured: Measurement) -> tuple[str, ...]:
    """What the joiner had: the client, the proxies' lines, every TRACE event."""
    out = [f"client {measured.response.local} -> {measured.response.peer}"]
    out += [f"proxy {line.listener}: {line.downstream_peer} (to {line.original_dst}) -> "
            f"{line.upstream_local} > {line.upstream_peer}" + (f" error {line.error}" if line.error else "")
            for line in measured.proxy_lines]
    out += [f"trace {e}" for e in measured.events]
    return tuple(out)


def scenario(s: Scenario, profile: str | None, measured: Measurement | None, verdict: Verdict,
             article: ArticleComparison, default_differences: list[str] | None) -> ScenarioView:
    failed = verdict.failure is not None
    reached = measured.reached if measured else None
    return ScenarioView(
        id=s.id, title=s.title, type=s.type, variant_of=s.variant_of, explanation=s.explanation,
        profile=profile, passed=verdict.passed, failure=verdict.failure,
        problems=() if verdict.passed else _problems(verdict, measured, profile),
        measured=None if failed else measured.path,
        expected=verdict.expected,
        article=article, article_note=s.article_note,
        default_differences=tuple(default_differences) if default_differences is not None else None,
        default_path=s.expected.default if default_differences is not None else None,
        counters=_counter_rows(measured) if measured else (),
        counters_agree=measured.counters_agree if measured else False,
        reached_pod=reached.pod if reached else "",
        reached=reached.address if reached else None,
        legs=measured.legs if measured else (),
        rule_hits=measured.rule_hits if measured else (),
        source=s.traffic.source,
        sender_uid=measured.sender.uid if measured else None,
        sidecar_uid=measured.sidecar.uid if measured else None,
        family=s.traffic.family,
        response={"status": measured.response.status, "local": str(measured.response.local),
                  "body": measured.response.body} if measured else {},
        evidence=_evidence(measured) if measured and not verdict.passed else (),
        group=s.group, issues=s.issues, pod=s.pod.describe(),
        ending=measured.ending if measured else "reached",
        told=measured.error or "" if measured else "",
    )


def run(scenarios: list[ScenarioView], lab: str = "", profile: str | None = profiles.DEFAULT, rules_name: str = "",
        notes: tuple[str, ...] = (), backend: str = "legacy") -> RunView:
    return RunView(tuple(scenarios), lab, profile, rules_name or profile or "", notes, backend)


@dataclass(frozen=True)
class MatrixView:
    """Scenarios × profiles: one RunView per profile (its column), in the order asked."""

    runs: tuple[RunView, ...]
    left_out: tuple[str, ...] = ()  # a profile or a scenario left out, and why, one line each
    backend: str = "legacy"
    labs: int = 0  # labs built
    side_by_side: int = 1  # at most this many at a time

    @property
    def profiles(self) -> tuple[str, ...]:
        return tuple(run.rules_name for run in self.runs)

    @property
    def rows(self) -> tuple[str, ...]:
        """Every scenario id of any column, in the order the columns give them."""
        return tuple(dict.fromkeys(v.id for run in self.runs for v in run.scenarios))

    def cell(self, scenario_id: str, profile: str) -> ScenarioView | None:
        """The scenario's view under the profile; None where it did not run there."""
        run = self.runs[self.profiles.index(profile)]
        return next((v for v in run.scenarios if v.id == scenario_id), None)

    def paths(self, scenario_id: str) -> list[tuple[str, tuple[str, ...]]]:
        """The scenario's distinct measured paths (short form; a failure's reason), each with
        the profiles that took it, in the columns' order."""
        by_path: dict[str, list[str]] = {}
        for run in self.runs:
            v = self.cell(scenario_id, run.rules_name)
            if v is not None:
                key = v.measured.short() if v.measured else f"(not measured: {v.failure})"
                by_path.setdefault(key, []).append(run.rules_name)
        return [(path, tuple(names)) for path, names in by_path.items()]

    @property
    def results(self) -> tuple[ScenarioView, ...]:
        return tuple(v for run in self.runs for v in run.scenarios)

    @property
    def passed(self) -> int:
        return sum(v.passed for v in self.results)

    @property
    def all_passed(self) -> bool:
        return bool(self.runs) and all(run.all_passed for run in self.runs)


def matrix(runs: list[RunView], left_out: tuple[str, ...] = (), backend: str = "legacy", labs: int = 0,
           side_by_side: int = 1) -> MatrixView:
    return MatrixView(tuple(runs), tuple(left_out), backend, labs, side_by_side)
