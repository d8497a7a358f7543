"""Record what the witnesses saw of every scenario, for the joiner's offline tests.

    sudo .venv/bin/python -m tests.record_observations   # rewrites tests/data/observations.json
"""

import dataclasses
import json
import os

from lab import commands, runner, scenario
from lab.world import Lab

OUT = os.path.join(os.path.dirname(__file__), "data", "observations.json")


def to_json(seen: runner.Observation) -> dict:
    data = dataclasses.asdict(seen)
    data["events"] = {pod: [dataclasses.asdict(e) for e in events] for pod, events in seen.events.items()}
    return data


def from_json(data: dict) -> runner.Observation:
    from lab.trace import TraceEvent

    data = dict(data, events={pod: [TraceEvent(**e) for e in evs] for pod, evs in data["events"].items()})
    return runner.Observation(**data)


def main() -> None:
    recorded = {}
    with Lab() as lab:
        commands.bring_up(lab)
        witnesses = runner.Witnesses(lab)
        try:
            for s in scenario.load_all():
                recorded[s.id] = to_json(runner.observe(lab, witnesses, s))
        finally:
            witnesses.close()
    with open(OUT, "w") as f:
        json.dump(recorded, f, sort_keys=True, separators=(",", ":"))
    print(f"recorded {len(recorded)} scenarios to {OUT}")


if __name__ == "__main__":
    main()
