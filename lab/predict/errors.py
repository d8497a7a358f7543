"""The one way predict says no."""

from __future__ import annotations


class CannotPredict(Exception):
    """A rule or a flow whose outcome predict does not know: a match or target it does not
    model, or something the kernel itself would refuse.  One line, never a guess; the CLI
    maps it to exit status 3."""

    def __init__(self, problem: str):
        super().__init__(f"cannot predict: {problem}")
        self.problem = problem
