"""Record what the witnesses saw of every scenario under every profile, so measuring, judging
and the reports are tested without root (tests/test_judging.py, tests/test_reports.py), and of
every problem scenario in the lab it needs, under the profile it is written for
(tests/test_problems.py).

    sudo .venv/bin/python -m tests.record_observations   # rewrites tests/data/observations/
    sudo .venv/bin/python -m tests.record_observations istio-1.27-nft ...   # those profiles only

Native nftables profiles are recorded on the nft backend (the only one that takes them).
"""

import json
import os

from lab import api, dualstack, runner, scenario
from lab.observe import observe
from lab.rules import profiles, ruleset

OUT = os.path.join(os.path.dirname(__file__), "data", "observations")
PROBLEMS = "problems"  # the file of the problem scenarios' observations


def path(profile: str) -> str:
    return os.path.join(OUT, f"{profile}.json")


def load(profile: str) -> dict:
    """{scenario id: Observation as JSON} recorded under the profile."""
    with open(path(profile)) as f:
        return json.load(f)


def main(only: list[str] | None = None) -> None:
    os.makedirs(OUT, exist_ok=True)
    every = [s for s in scenario.load_all() if s.group != "problems"]  # each problem needs a lab of its own
    for name in only or profiles.names(native_nftables=None):
        rules = ruleset.profile(name)
        chosen = scenario.for_features(every, rules.features)
        if rules.dual_stack:
            chosen = dualstack.both_families(chosen)
        with api.Session(rules) as session:
            recorded = {s.id: observe(session.lab, session.witnesses, s.traffic).as_json() for s in chosen}
        with open(path(name), "w") as f:
            json.dump(recorded, f, sort_keys=True, separators=(",", ":"))
        print(f"recorded {len(recorded)} scenarios under {name} to {path(name)}")
    if not only:
        record_problems()


def record_problems() -> None:
    """{id: {"profile": the profile it ran under, "observation": ...}} for each problem scenario."""
    problems = [s for s in scenario.load_all() if s.group == "problems"]
    labs, _ = runner.plan(problems, runner.Choice())
    recorded = {}
    for lab in labs:
        with api.Session(lab.rules, spec=lab.spec) as session:
            for s in lab.scenarios:
                seen = observe(session.lab, session.witnesses, s.traffic).as_json()
                recorded[s.id] = {"profile": lab.rules_of[s.id].profile, "observation": seen}
    with open(path(PROBLEMS), "w") as f:
        json.dump(recorded, f, sort_keys=True, separators=(",", ":"))
    print(f"recorded {len(recorded)} problem scenarios to {path(PROBLEMS)}")


if __name__ == "__main__":
    import sys

    record_problems() if sys.argv[1:] == [PROBLEMS] else main(sys.argv[1:])
