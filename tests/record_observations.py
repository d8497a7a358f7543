"""Record what the witnesses saw of every scenario under every profile, so measuring, judging
and the reports are tested without root (tests/test_judging.py, tests/test_reports.py).

    sudo .venv/bin/python -m tests.record_observations   # rewrites tests/data/observations/
"""

import json
import os

from lab import api, dualstack, scenario
from lab.observe import observe
from lab.rules import profiles, ruleset

OUT = os.path.join(os.path.dirname(__file__), "data", "observations")


def path(profile: str) -> str:
    return os.path.join(OUT, f"{profile}.json")


def load(profile: str) -> dict:
    """{scenario id: Observation as JSON} recorded under the profile."""
    with open(path(profile)) as f:
        return json.load(f)


def main() -> None:
    os.makedirs(OUT, exist_ok=True)
    every = [s for s in scenario.load_all() if s.group != "problems"]  # each problem needs a lab of its own
    for name in profiles.names():
        rules = ruleset.profile(name)
        chosen = scenario.for_features(every, rules.features)
        if rules.dual_stack:
            chosen = dualstack.both_families(chosen)
        with api.Session(rules) as session:
            recorded = {s.id: observe(session.lab, session.witnesses, s.traffic).as_json() for s in chosen}
        with open(path(name), "w") as f:
            json.dump(recorded, f, sort_keys=True, separators=(",", ":"))
        print(f"recorded {len(recorded)} scenarios under {name} to {path(name)}")


if __name__ == "__main__":
    main()
