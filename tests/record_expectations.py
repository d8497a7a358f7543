"""Record the paths the kernel takes under a profile into the scenario files, measured:

    sudo .venv/bin/python -m tests.record_expectations PROFILE... [--only ID,ID...]

Every scenario (every group, named, so DNS queries run under rules that do not capture
DNS) runs under the profile in the labs it needs; where the measured path is not the
file's default path, it goes into `expected.profiles.PROFILE` (an IPv6 twin's, where it is
not the IPv4 one's, into `expected.ipv6.PROFILE`), and an entry the kernel no longer needs
goes.  A flow that could not be measured is printed, not written: its file needs an
`expected.not_measured` that says why, in words.  A scenario whose rules the profile cannot
give (a TPROXY pod before 1.25, rules both backends write under a native profile) is left
out, and printed.  Only a pass of every scenario afterwards
(`istio-lab run --profile PROFILE ID...`) makes the record a record.
"""

from __future__ import annotations

import re
import sys

from lab import backend as backends
from lab import dualstack, runner, scenario
from lab.errors import LabError

INDENT = "    "


def measured(profile: str, only: list[str]) -> tuple[dict, list[str]]:
    """{scenario id: (IPv4 path, IPv6 twin's path or None)} and the flows not measured."""
    every = [s for s in scenario.load_all() if not only or s.id in only]
    skipped = []
    for s in list(every):
        try:
            runner.rules_for(s, runner.Choice(profile))
        except LabError as e:
            skipped.append(f"{s.id}: left out: {e}")
            every.remove(s)
    labs, _ = runner.plan(every, runner.Choice(profile), named=True)
    native = any(lab.rules.native for lab in labs)
    results, _ = runner.run(labs, every, backends.choose(backends.AUTO, native)[0])
    paths, missing = {}, list(skipped)
    for r in results:
        base = r.scenario.id.removesuffix(dualstack.SUFFIX)
        if r.failure or not r.measurement.counters_agree:
            missing.append(f"{r.scenario.id}: {r.failure or 'counters disagree with the trace'}")
            continue
        v4, v6 = paths.get(base, (None, None))
        paths[base] = (v4, r.measured_path) if r.scenario.id.endswith(dualstack.SUFFIX) else (r.measured_path, v6)
    return paths, missing


def _block(lines: list[str], key: str) -> tuple[int, int] | None:
    """[start, end) of `  key:` under `expected:` (its entries are the indented lines after it)."""
    try:
        top = lines.index("expected:")
    except ValueError:
        return None
    for i in range(top + 1, len(lines)):
        if lines[i] and not lines[i].startswith(" "):
            return None
        if re.match(rf"^  {key}:", lines[i]):
            end = i + 1
            while end < len(lines) and lines[end].startswith(INDENT):
                end += 1
            return i, end
    return None


def write(file: str, key: str, profile: str, path: str | None, comment: str) -> None:
    """Set (or, for None, remove) `expected.KEY.PROFILE` in a scenario file, as text."""
    lines = open(file).read().split("\n")
    block = _block(lines, key)
    value = f'"{path}"' if path and ": " in path else path  # a death's `8080: no listener` needs quotes in YAML
    entry = f"{INDENT}{profile}: {value}" if path else None
    if block is not None:
        start, end = block
        at = next((i for i in range(start + 1, end) if lines[i].startswith(f"{INDENT}{profile}:")), None)
        if at is not None:
            lines[at:at + 1] = [entry] if entry else []
        elif entry:
            lines.insert(end, entry)
        start, end = _block(lines, key)
        if end == start + 1:  # nothing left under it
            del lines[start]
    elif entry:
        top = lines.index("expected:")
        end = top + 1
        while end < len(lines) and lines[end].startswith("  "):
            end += 1
        lines[end:end] = [f"  {key}:  # {comment}", entry]
    open(file, "w").write("\n".join(lines))


def main(profiles: list[str], only: list[str]) -> None:
    by_id = {s.id: s for s in scenario.load_all()}
    for profile in profiles:
        paths, missing = measured(profile, only)
        for sid, (v4, v6) in sorted(paths.items()):
            s = by_id[sid]
            default = str(s.expected.default)
            if v4 is not None:
                write(s.file, "profiles", profile, v4 if v4 != default else None,
                      "measured: istio-lab run --profile NAME ID")
            if v6 is not None:
                write(s.file, "ipv6", profile, v6 if v6 != (v4 or default) else None,
                      "measured: the IPv6 twin (ID@ipv6), where its path is not the IPv4 one's")
        print(f"{profile}: {len(paths)} scenarios recorded")
        for line in missing:
            print(f"  not measured: {line}")


if __name__ == "__main__":
    args = sys.argv[1:]
    only = args[args.index("--only") + 1].split(",") if "--only" in args else []
    main([a for a in args if a != "--only" and a.split(",") != only], only)
