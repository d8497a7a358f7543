"""Say what the kernel did: the terminal report (rich) and the JSON document, both rendered
from the view-model."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

from .path import Hop
from .rules import profiles
from .view import MatrixView, RunView, ScenarioView

if TYPE_CHECKING:  # the predictor is imported by the commands that predict, not by every run
    from .predict import Prediction

COUNTED = (("nat", ""), ("raw", " (queries and answers)"), ("mangle", " (every packet, not only the SYN)"))


def packet_text(packet) -> str:
    """`SYN 10.244.0.10:23840 > 10.244.0.20:9080`; a source port predict leaves to the kernel (0) is `*`."""
    if packet is None:
        return ""
    src = packet.src
    return str(packet).replace(f" {src} ", f" {str(src)[:-2]}:* ", 1) if src.port == 0 else str(packet)


def hop_json(hop: Hop) -> dict:
    out = {"kind": hop.kind, "name": hop.name, "rule": hop.number, "packet": packet_text(hop.packet) or None,
           "line": hop.line, "owner": f"uid {hop.owner[0]} gid {hop.owner[1]}" if hop.owner else None,
           "entry": str(hop.entry) if hop.entry else None, "table": hop.table if hop.kind == "chain" else None,
           "where": hop.where}
    return {k: v for k, v in out.items() if v not in ("", None)}


def as_json(v: ScenarioView) -> dict:
    """One result in the JSON document's schema (run --json, the plugin's Result.as_json())."""
    claim = v.article.claim
    return {
        "id": v.id,
        "title": v.title,
        "type": v.type,
        "variant_of": v.variant_of,
        "verdict": v.verdict,
        "profile": v.profile,
        "measured_path": v.measured_text,
        "expected_path": str(v.expected) if v.expected else None,
        "article_path": claim.path_text if claim else "",
        "article_claim": claim.sentence if claim else "",
        **({"article_note": v.article_note} if v.article_note else {}),
        "matches_article": v.article.matches,
        "agreement": v.agreement,
        "differences": list(v.article.differences),
        "rule_hits": [str(r) for r in v.rule_hits],
        "counters": {str(row.rule): row.moved for row in v.counters if row.moved},
        "trace_rule_events": {str(row.rule): row.traced for row in v.counters if row.traced},
        "counters_agree": v.counters_agree,
        "endpoint": v.reached_text,
        "legs": [{"client": str(leg.client), "server": str(leg.server), "proxy": leg.proxy} for leg in v.legs],
        "hops": [hop_json(h) for h in v.measured.hops] if v.measured else [],
        "failure": v.failure,
        **({"default_path": str(v.default_path), "differs_from_default": list(v.default_differences)}
           if v.default_differences is not None else {}),
        **({"evidence": list(v.evidence)} if v.evidence else {}),
        "group": v.group,
        **({"issues": list(v.issues)} if v.issues else {}),
        **({"pod": v.pod} if v.pod else {}),
        **({"rules": v.rules} if v.rules else {}),
        "ending": v.ending,
        **({"client_error": v.told} if v.told else {}),
    }


def to_json(run: RunView) -> str:
    meta = {"lab": run.lab, "profile": run.profile, "backend": run.backend}
    if run.rules_name != run.profile:
        meta |= {"rules": run.rules_name, "notes": list(run.notes)}
    return json.dumps({**meta, "scenarios": [as_json(v) for v in run.scenarios]}, indent=2)


def _verdict(v: ScenarioView) -> str:
    return "[green]pass[/]" if v.passed else "[bold red]FAIL[/]"


def render(console, run: RunView) -> None:
    from rich.markup import escape
    from rich.table import Table

    for v in run.scenarios:
        console.rule(f"[bold]{escape(v.id)}[/]  {escape(v.title)}", align="left")
        if v.issues:
            console.print(f"  issue  : {escape(', '.join(v.issues))}")
        if v.rules:
            console.print(f"  rules  : {escape(v.rules)}")
        if v.pod:
            console.print(f"  pod    : {escape(v.pod)}")
        console.print(f"  kernel : {escape(v.measured_text or '(not measured)')}")
        console.print(f"  article: {escape(v.article_text)}")
        if v.default_differences is not None and not v.failure:
            console.print(f"  {profiles.DEFAULT}: " + ("[yellow]differs[/]" if v.default_differences else "the same path"))
            for d in v.default_differences:
                console.print(f"    {escape(d)}")
        if v.article.matches:
            console.print("  [green]the kernel agrees with the article[/]")
        for d in v.article.differences:
            console.print(f"  [yellow]differs[/]: {escape(d)}")
        for table, aside in COUNTED:
            rows = v.counters_in(table)
            if rows:  # named as the rules name it: nat, or Istio's istio-proxy-nat
                console.print(f"  {' and '.join(dict.fromkeys(r.rule.table for r in rows))} rules whose counters "
                              f"moved{aside}:")
            for row in rows:
                name = f"{row.rule.chain}#{row.rule.number}"
                console.print(f"    {name:<20} +{row.moved:<3} {escape(row.line)}")
        agree = "agree" if v.counters_agree else "[red]DISAGREE[/]"
        ended = "reached" if v.ending == "reached" else "ended"
        console.print(f"  counters vs TRACE: {agree};  {ended}: {escape(v.reached_text or '-')};  verdict: {_verdict(v)}")
        for why in v.problems:
            console.print(f"  [red]{escape(why)}[/]")
    problems = all(v.group == "problems" for v in run.scenarios)
    table = Table(title="The problems people hit, judged by the kernel" if problems
                  else "The article's traffic types (and variants), judged by the kernel")
    for col in ("scenario", "article", "kernel", "", "verdict"):
        table.add_column(col, overflow="fold")
    for v in run.scenarios:
        table.add_row(v.id, escape(v.article_short), escape(v.measured.short() if v.measured else "") or "-",
                      "[yellow]differs[/]" if v.agreement == "differs" else v.agreement, _verdict(v))
    console.print(table)


# --- one flow: probe and predict -------------------------------------------------------------

def _hop_detail(hop: Hop) -> str:
    """What stands beside a hop: a rule's text, a hook's jump into Istio's chains, a packet."""
    if hop.kind == "chain" and hop.line:
        return hop.line
    if hop.kind == "hook" and hop.line:
        return hop.line + (f"  (uid {hop.owner[0]} gid {hop.owner[1]})" if hop.owner else "")
    detail = packet_text(hop.packet)
    if hop.owner:
        detail += f"  (uid {hop.owner[0]} gid {hop.owner[1]})"
    return detail


def _hops(console, hops) -> None:
    from rich.markup import escape

    width = max((len(str(h)) for h in hops), default=0)
    for hop in hops:
        mark = "[red]" if hop.kind == "end" or hop.name.endswith("(loop)") else ""
        name = f"{mark}{escape(str(hop)):<{width}}{'[/]' if mark else ''}"
        console.print(f"    {name}  {escape(_hop_detail(hop))}".rstrip())


def render_flow(console, v: ScenarioView, backend: str = "legacy") -> None:
    """probe: the measured path, each hop with its rule, and the counters beside TRACE."""
    from rich.markup import escape

    console.print(f"  kernel : {escape(v.measured_text or '(not measured)')}")
    if v.measured:
        console.print("  hops (each with the rule it matched, as the kernel lists it):")
        _hops(console, v.measured.hops)
    if v.failure:
        console.print(f"  [red]not measured: {escape(v.failure)}[/]")
        for line in v.evidence[:40]:
            console.print(f"    {escape(line)}")
        return
    rows = [row for row in v.counters if row.moved or row.traced]
    console.print(f"  counters vs TRACE ({backend}): " + ("agree" if v.counters_agree else "[red]DISAGREE[/]"))
    for row in rows:
        console.print(f"    {str(row.rule):<24} counter +{row.moved:<3} TRACE {row.traced:<3} {escape(row.line)}")
    ended = {"reached": "reached", "died": "died", "closed": "closed", "loop": "looped"}.get(v.ending, v.ending)
    console.print(f"  {ended}: {escape(v.reached_text or '-')}" + (f";  the client was told: {escape(v.told)}"
                                                                     if v.told else ""))


def prediction_json(prediction: Prediction) -> dict:
    path = prediction.path
    return {"predicted_path": str(path), "ending": prediction.walk.ending.kind,
            "hops": [hop_json(h) for h in path.hops],
            "misses": [{"leg": m.leg, "rule": str(m.rule), "namespace": m.namespace, "needs": m.needs, "has": m.has,
                        "text": str(m)} for m in prediction.misses()]}


def render_prediction(console, prediction: Prediction, path: bool = True) -> None:
    """predict: the path, each hop with its rule, and beside each rule passed without matching,
    why: what it needs, and what this packet has instead (`path` False: the misses only)."""
    from rich.markup import escape

    if path:
        console.print(f"  predict: {escape(str(prediction.path))}")
        console.print("  hops (each with the rule it matches):")
        _hops(console, prediction.path.hops)
    misses = prediction.misses()
    if not misses:
        return
    console.print("  rules passed without matching, and why:")
    legs = prediction.walk.legs
    for i, leg in enumerate(legs):
        mine = [m for m in misses if m.leg == i]
        if not mine:
            continue
        who = "the client's connection" if i == 0 else f"{legs[i - 1].proxy.name}'s own connection"
        console.print(f"    leg {i + 1}, {who} ({escape(leg.packet.text())}):")
        for m in mine:
            where = m.rule.chain + (f" ({m.qualifier})" if m.qualifier else "")
            where += " (node)" if m.namespace == "node" else ""
            console.print(f"      {escape(where):<28} {escape(str(m))}")


def render_attached(console, path, rows, cover: bool, ending: str, listener: str, error: str | None) -> None:
    """probe --netns: the client's own leg in a pod of your own, its rules, the counters."""
    from rich.markup import escape

    if not path.hops:
        console.print("  [red]not measured: no traced packet of the flow was seen in the namespace[/]")
        if error:
            console.print(f"  the client was told: {escape(error)}")
        return
    console.print(f"  kernel : {escape(str(path))}")
    console.print("  hops (each with the rule it matched, as the pod's save tool prints it):")
    _hops(console, path.hops)
    console.print("  counters vs TRACE (other traffic of a live pod moves counters too: at least TRACE's): "
                  + ("cover it" if cover else "[red]FEWER than TRACE saw[/]"))
    for rule, moved, traced, line in rows:
        console.print(f"    {str(rule):<24} counter +{moved:<3} TRACE {traced:<3} {escape(line)}")
    said = {"proxy": "taken by a proxy", "reached": "delivered in the pod", "died": f"died: {path.hops[-1]}",
            "sent": "sent out of the pod"}.get(ending, ending)
    console.print(f"  {said}" + (f": {escape(listener)} listens there" if listener else "")
                  + (f";  the client was told: {escape(error)}" if error else ""))
    if ending == "proxy":
        console.print("  (the proxy's own connection onward is not measured: only the client's leg is traced here)")


# --- the matrix: scenarios x profiles -------------------------------------------------


def matrix_json(m: MatrixView) -> str:
    """`run --profile all --json`: every result with the profile it ran under."""
    out = []
    for run in m.runs:
        for v in run.scenarios:
            result = as_json(v)
            if v.profile != run.rules_name:  # a pod's annotations that change the rules: no expectation
                result["expected_under"] = v.profile
            out.append({**result, "profile": run.rules_name, "backend": run.backend})
    return json.dumps({"backend": m.backend, "profiles": list(m.profiles), "left_out": list(m.left_out),
                       "labs": m.labs, "side_by_side": m.side_by_side, "passed": m.passed,
                       "total": len(out), "scenarios": out}, indent=2)


def short_profile(name: str) -> str:
    """A column heading: istio-1.25-tproxy -> 1.25-tproxy."""
    return name.removeprefix("istio-")


def _cell(v: ScenarioView | None) -> str:
    if v is None:
        return "[dim]-[/]"
    return "[green]pass[/]" if v.passed else "[bold red]FAIL[/]"


def render_matrix(console, m: MatrixView) -> None:
    """Left-out lines, each failure with why, each scenario's paths by profile, then the table."""
    from rich.markup import escape
    from rich.table import Table

    for line in m.left_out:
        console.print(line, markup=False)
    for run in m.runs:
        for v in run.scenarios:
            if not v.passed:
                console.print(f"[bold red]FAIL[/] {escape(run.rules_name)} {escape(v.id)}: "
                              f"kernel {escape(v.measured_text or '(not measured)')}")
                for why in v.problems:
                    console.print(f"  [red]{escape(why)}[/]")
    console.rule("[bold]Paths by profile[/] (the kernel's, short form)", align="left")
    lines = []  # one print: rich's per-call work, a hundred times over, was most of the report's time
    for sid in m.rows:
        paths = m.paths(sid)
        lines.append(sid)
        for path, names in paths:
            who = "every profile" if len(paths) == 1 and len(names) == len(m.profiles) \
                else ", ".join(short_profile(n) for n in names)
            lines.append(f"  {who}: {path}")
    console.print("\n".join(lines), markup=False, highlight=False)
    on = f"{m.backend} backend" + ("s" if " and " in m.backend else "")
    table = Table(title=f"Scenarios x profiles, judged by the kernel ({on}, {m.labs} labs, "
                        f"{m.side_by_side} side by side)")
    table.add_column("scenario", no_wrap=True)
    for name in m.profiles:
        table.add_column(short_profile(name), justify="center", min_width=max(4, len(short_profile(name))), no_wrap=True)
    for sid in m.rows:
        table.add_row(escape(sid), *(_cell(m.cell(sid, name)) for name in m.profiles))
    if console.is_terminal:
        console.print(table)
    else:  # its natural width where no terminal sets one (a log, a pipe): folded cells would hide it
        narrow, console.width = console.width, 1000
        try:
            console.print(table)
        finally:
            console.width = narrow
    console.print(f"{m.passed} of {len(m.results)} verdicts pass under {len(m.profiles)} profiles")
