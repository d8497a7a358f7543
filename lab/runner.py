"""Run scenarios in as many labs as their rules and pods need: one lab per distinct rule set
and pod.

A scenario runs under the rules the command line chose (a profile, a pod's own dump, a
profile with a pod's annotations), or, when it chose none, under the profile the scenario
is written for (`profile:` in its file; the default otherwise).  A scenario whose pod has
annotations of its own gets that profile's version and options with its annotations on
top, as Istio's injector would hand them to istio-init; one whose pod runs otherwise (an
init container's time, an app bound to localhost, a VM behind it) gets a lab built so.
Scenarios that share both share a lab; results come back in the order asked.
"""

from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass, field
from typing import Iterator

from . import dualstack, interrupts
from .api import Session
from .backend import Backend
from .errors import LabError
from .podspec import PodSpec
from .result import Result, conclude
from .rules import annotations, profiles, ruleset
from .rules.ruleset import RuleSet
from .scenario import Scenario
from .world import Lab as World


@dataclass(frozen=True)
class Choice:
    """The rules the command line chose: a profile, a pod's own dump, a pod's annotations."""

    profile: str | None = None
    dump: RuleSet | None = None  # --rules FILE
    annotations: annotations.PodAnnotations | None = None  # --annotations FILE (on the profile)


@dataclass
class Lab:
    """One lab to build: its rules, its pod, the scenarios it runs."""

    rules: RuleSet
    spec: PodSpec
    scenarios: list[Scenario] = field(default_factory=list)
    rules_of: dict[str, RuleSet] = field(default_factory=dict)  # scenario id -> the rules it asked for
    profile: str = ""  # the profile the command line chose, when it chose one (a matrix's column)
    backend: str = ""  # the backend a matrix runs it on ("": the run's)


def rules_for(s: Scenario, choice: Choice, cache: dict | None = None) -> RuleSet:
    """The rules a scenario runs under (LabError when they cannot be built); a scenario whose
    rules both backends write gets them so (RuleSet.written)."""
    rules = _rules_for(s, choice, {} if cache is None else cache)
    if not s.backends:
        return rules
    if rules.native:
        raise LabError(f"its rules are written by {' and '.join(s.backends)}: iptables rules, "
                       f"not {rules.name}'s native nftables ones")
    return dataclasses.replace(rules, written=s.backends)


def _rules_for(s: Scenario, choice: Choice, cache: dict) -> RuleSet:
    if choice.dump is not None:
        if s.own_rules:
            raise LabError(f"{s.id}: its pod's annotations need a profile's options, and --rules gives a dump")
        return choice.dump
    base = choice.profile or s.profile or profiles.DEFAULT
    key = (s.id if s.own_rules else None, base)
    if key not in cache:
        cache[key] = _build(s, choice, base)
    return cache[key]


def _build(s: Scenario, choice: Choice, base: str) -> RuleSet:
    if not s.own_rules and choice.annotations is None:
        return ruleset.profile(base)
    if not s.own_rules:
        return ruleset.from_annotations(choice.annotations, base)
    if choice.annotations is None:
        return ruleset.from_annotations(s.annotations, base, expect=base)
    # The pod's file first, the scenario's own annotations over it: the scenario is about those.
    values = {**choice.annotations.values, **s.annotations.values}
    both = annotations.PodAnnotations(f"{choice.annotations.source} + {s.annotations.source}", values,
                                      choice.annotations.notes + s.annotations.notes)
    own = ruleset.from_annotations(s.annotations, base, expect=base)
    merged = ruleset.from_annotations(both, base)
    same = merged.key() == own.key()
    return dataclasses.replace(merged, profile=base if same else None)


def plan(scenarios: list[Scenario], choice: Choice, named: bool = False) -> tuple[list[Lab], list[str]]:
    """The labs to build for the scenarios, and a line for each scenario left out.

    Left out, unless named: a scenario about a feature its rules lack (DNS queries when DNS is
    not captured), one whose file records no path under the profile (expected.not_measured,
    with why), and one whose rules cannot be built (a TPROXY pod under a profile older than
    1.25); named, the last is an error."""
    labs: dict[tuple, Lab] = {}
    skipped, cache = [], {}
    for s in scenarios:
        try:
            rules = rules_for(s, choice, cache)
        except LabError as e:
            if named:
                raise
            skipped.append(f"{s.id}: left out: {e}")
            continue
        if not named and s.feature is not None and s.feature not in rules.features:
            continue
        why = dict(s.expected.not_measured).get(rules.profile) if s.expected and rules.profile else None
        if why and not named:
            skipped.append(f"{s.id}: left out under {rules.profile}: {why}")
            continue
        spec = s.pod.resolved(rules.istio)
        key = (rules.key(), rules.profile, spec)
        lab = labs.setdefault(key, Lab(rules, spec, profile=choice.profile or ""))
        lab.scenarios.append(s)
        lab.rules_of[s.id] = rules
    for lab in labs.values():
        if lab.rules.dual_stack:
            dualstack.both_families(lab.scenarios)  # a scenario with no IPv6 twin fails here, before any lab
    return list(labs.values()), skipped


def run_lab(lab: Lab, backend: Backend, show_rules: str = "", kept: list[World] | None = None) -> tuple[list[Result], str]:
    """Build one lab, run its scenarios, tear it down: the results (IPv6 twins after their
    scenario), each view saying its rules where they are not `show_rules` (the run's own),
    and the lab's id.  With `kept`, its namespaces are left for the caller to remove (after
    its other labs: world.Lab.stop) and the lab is added to the list."""
    out = []
    session = Session(lab.rules, backend, spec=lab.spec)
    if kept is not None:
        kept.append(session.lab)  # before it is built: whatever is made of it is removed at the end
    session.open()
    try:
        for result in session.run_all(lab.scenarios):
            own = lab.rules_of[result.scenario.id.removesuffix(dualstack.SUFFIX)]
            shown = {"pod": lab.spec.describe()}  # as the lab ran it: "as-released" made one era's
            if own.name != show_rules or own.written:
                shown["rules"] = own.summary
            out.append(dataclasses.replace(result, view=dataclasses.replace(result.view, **shown)))
    finally:
        session.close(keep_namespaces=kept is not None)
    return out, session.lab.labid


@contextlib.contextmanager
def removing(kept: list[World]) -> Iterator[list[World]]:
    """A list for run_lab's `kept`: every lab in it is destroyed as the block ends."""
    try:
        yield kept
    finally:
        with interrupts.held():  # a Ctrl-C now would leave the rest
            for world in kept:
                world.destroy()


def failed(lab: Lab, why: str, show_rules: str = "") -> list[Result]:
    """Each of the lab's scenarios (and IPv6 twins) as a failure that says why: a lab that could
    not be built, in a run that goes on with its other labs."""
    scenarios = dualstack.both_families(lab.scenarios) if lab.rules.dual_stack else lab.scenarios
    out = []
    for s in scenarios:
        own = lab.rules_of[s.id.removesuffix(dualstack.SUFFIX)]
        result = conclude(s, own.profile, None, why)
        shown = {"pod": lab.spec.describe()}
        if own.name != show_rules or own.written:
            shown["rules"] = own.summary
        out.append(dataclasses.replace(result, view=dataclasses.replace(result.view, **shown)))
    return out


def in_order(results: list[Result], order: list[Scenario]) -> list[Result]:
    """The results in `order`, each scenario's IPv6 twin after it."""
    by_id: dict[str, list[Result]] = {}
    for result in results:
        by_id.setdefault(result.scenario.id.removesuffix(dualstack.SUFFIX), []).append(result)
    return [r for s in order for r in by_id.get(s.id, [])]


def run(labs: list[Lab], order: list[Scenario], backend: Backend, show_rules: str = "") -> tuple[list[Result], str]:
    """Run every lab's scenarios, one lab after another; the results in `order` (IPv6 twins
    after their scenario).  Returns the results and the last lab's id."""
    results, labid = [], ""
    with removing([]) as kept:
        for lab in labs:
            done, labid = run_lab(lab, backend, show_rules, kept if len(labs) > 1 else None)
            results += done
    return in_order(results, order), labid
