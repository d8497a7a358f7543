"""Judge a measurement against its expectation: the path the kernel was measured to take
under the profile, the counters agreeing with TRACE, and the flow arriving somewhere, or
ending where the witnesses say it died or looped (a path that ends so is a path)."""

from __future__ import annotations

from dataclasses import dataclass

from .measure import Measurement
from .path import Path


@dataclass(frozen=True)
class Verdict:
    expected: Path | None  # None: no expectation known (a pod's own rules that match no profile)
    failure: str | None = None  # why the flow could not be measured, or did not arrive
    path_as_expected: bool = False
    counters_agree: bool = False

    @property
    def passed(self) -> bool:
        return self.failure is None and self.path_as_expected and self.counters_agree

    def __str__(self) -> str:
        return "pass" if self.passed else "fail"


def judge(measured: Measurement | None, expected: Path | None, failure: str | None = None) -> Verdict:
    """`failure`: the flow could not be measured (no Measurement).  A measured flow whose last
    leg was delivered nowhere fails too: a path that ends nowhere is not a path."""
    if measured is None:
        return Verdict(expected, failure or "not measured")
    delivered = measured.transport == "udp" and measured.reached is not None and "no answer" in (measured.error or "")
    if measured.ending == "reached" and measured.error and not delivered:  # it died, and nothing witnessed says where
        return Verdict(expected, measured.error.split(": ", 1)[-1])
    if measured.reached is None and measured.ending == "reached":
        last = measured.legs[-1]
        return Verdict(expected, f"the last leg {last.client} > {last.server} never reached INPUT in any pod")
    as_expected = expected is None or str(measured.path) == str(expected)
    return Verdict(expected, None, as_expected, measured.counters_agree)
