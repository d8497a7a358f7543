"""The conclusion about one flow: measured, judged against its expectation, compared with
the article, and its view for the reports.  What the library API and the pytest plugin hand
back."""

from __future__ import annotations

from dataclasses import dataclass

from . import compare, report, view
from .compare import ArticleComparison
from .measure import Measurement, measure
from .netfilter import RuleRef
from .observe import Observation
from .rules import profiles
from .scenario import Scenario
from .verdict import Verdict, judge
from .view import ScenarioView


@dataclass(frozen=True)
class Result:
    scenario: Scenario
    profile: str | None  # whose expectation applied (None: rules that match no profile)
    measurement: Measurement | None  # None: the flow could not be measured (verdict.failure says why)
    verdict: Verdict
    article: ArticleComparison
    view: ScenarioView

    @property
    def passed(self) -> bool:
        return self.verdict.passed

    @property
    def failure(self) -> str | None:
        return self.verdict.failure

    @property
    def measured_path(self) -> str:
        """The path in the article's notation; "" when the flow was not measured."""
        return self.view.measured_text

    @property
    def rule_hits(self) -> list[str]:
        """The nat rules the flow's legs matched, in order: "OUTPUT#1", "ISTIO_OUTPUT#9", ..."""
        return [str(r) for r in self.view.rule_hits]

    @property
    def agreement(self) -> str:
        """With the article: "agrees", "differs", "no claim" (it says nothing about this flow), "-"."""
        return self.article.agreement

    def counter(self, ref: RuleRef) -> int:
        """Packets the rule's counter moved during the flow."""
        return self.measurement.counters.get(ref, 0) if self.measurement else 0

    def as_json(self) -> dict:
        """The result in `istio-lab run --json`'s schema."""
        return report.as_json(self.view)


def conclude(s: Scenario, profile: str | None, seen: Observation | None, failure: str | None = None) -> Result:
    """Measure what was observed (nothing, with `failure`), judge it, compare it."""
    measured = measure(s.traffic, seen) if seen is not None else None
    expected = s.expected.path(profile) if s.expected and profile else None
    verdict = judge(measured, expected, failure)
    path = measured.path if measured is not None and verdict.failure is None else None
    article = compare.with_article(s.article, path)
    default = None
    if profile is None and s.expected and path is not None:  # a pod's own rules: beside the default's path
        default = compare.with_profile(profiles.DEFAULT, s.expected.default, path)
    return Result(s, profile, measured, verdict, article, view.scenario(s, profile, measured, verdict, article, default))
