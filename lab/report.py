"""Say what the kernel did: the terminal report (rich) and the JSON document."""

from __future__ import annotations

import json

from .rules import profiles
from .runner import Result


def as_dict(r: Result) -> dict:
    s = r.scenario
    return {
        "id": s.id,
        "title": s.title,
        "type": s.type,
        "variant_of": s.variant_of,
        "verdict": r.verdict,
        "profile": r.profile,
        "measured_path": r.measured_path,
        "expected_path": r.expected_path,
        "article_path": s.article_path,
        "article_claim": s.article_claim,
        "matches_article": r.matches_article,
        "differences": r.article_differences,
        "rule_hits": r.rule_hits,
        "counters": r.counter_deltas,
        "trace_rule_events": r.trace_rule_events,
        "counters_agree": r.counters_agree,
        "endpoint": r.endpoint,
        "legs": [{"client": leg.client, "server": leg.server, "proxy": leg.proxy} for leg in r.legs],
        "hops": [h.as_dict() for h in r.measured.hops],
        "failure": r.failure,
        **({"default_path": s.expected_path, "differs_from_default": default_differences(r)}
           if r.profile is None else {}),
    }


def default_differences(r: Result) -> list[str]:
    """For a pod's own rules (no expectation known): where its path leaves the default profile's."""
    from . import path

    if r.profile is not None or r.failure or r.measured_path == str(path.parse(r.scenario.expected_path)):
        return []
    out = []
    for want, got in path.align(path.parse(r.scenario.expected_path).hops, r.measured.hops):
        if want is None:
            out.append(f"these rules add {got}")
        elif got is None:
            out.append(f"{profiles.DEFAULT} passes {want}, these rules do not")
        elif str(want) != str(got):
            out.append(f"{profiles.DEFAULT} passes {want}, these rules {got}")
    return out


def to_json(results: list[Result], **meta) -> str:
    return json.dumps({**meta, "scenarios": [as_dict(r) for r in results]}, indent=2)


def _verdict(r: Result) -> str:
    return "[green]pass[/]" if r.verdict == "pass" else "[bold red]FAIL[/]"


def _why_failed(r: Result) -> list[str]:
    if r.failure:
        return [r.failure]
    out = []
    if not r.path_as_expected:
        out.append(f"expected ({r.profile}) {r.expected_path}")
    if not r.counters_agree:
        out.append(f"rule counters {r.counter_deltas} differ from TRACE rule events {r.trace_rule_events}")
    return out


def render(console, results: list[Result]) -> None:
    from rich.markup import escape
    from rich.table import Table

    for r in results:
        s = r.scenario
        console.rule(f"[bold]{escape(s.id)}[/]  {escape(s.title)}", align="left")
        console.print(f"  kernel : {escape(r.measured_path or '(not measured)')}")
        console.print(f"  article: {escape(s.article_path or '(a picture only) ' + s.article_claim)}")
        if r.profile is None and not r.failure:
            differences = default_differences(r)
            console.print(f"  {profiles.DEFAULT}: " + ("[yellow]differs[/]" if differences else "the same path"))
            for d in differences:
                console.print(f"    {escape(d)}")
        if r.matches_article:
            console.print("  [green]the kernel agrees with the article[/]")
        for d in r.article_differences:
            console.print(f"  [yellow]differs[/]: {escape(d)}")
        if r.counter_deltas:
            console.print("  nat rules whose counters moved:")
            order = list(dict.fromkeys(r.rule_hits)) + sorted(set(r.counter_deltas) - set(r.rule_hits))
            for ref in (ref for ref in order if ref in r.counter_deltas):
                console.print(f"    {ref:<20} +{r.counter_deltas[ref]:<3} {escape(r.rule_lines.get(ref, ''))}")
        agree = "agree" if r.counters_agree else "[red]DISAGREE[/]"
        console.print(f"  counters vs TRACE: {agree};  reached: {escape(r.endpoint or '-')};  verdict: {_verdict(r)}")
        for why in _why_failed(r):
            console.print(f"  [red]{escape(why)}[/]")
    table = Table(title="The article's traffic types (and variants), judged by the kernel")
    for col in ("scenario", "article", "kernel", "", "verdict"):
        table.add_column(col, overflow="fold")
    for r in results:
        table.add_row(
            r.scenario.id,
            _short(r.scenario.article_path) or "(picture) " + ", ".join(r.scenario.article_proxies or ()),
            _short(r.measured_path) or "-",
            "agree" if r.matches_article else "[yellow]differ[/]",
            _verdict(r),
        )
    console.print(table)


def _short(text: str) -> str:
    """The rules and proxies a path passes, e.g. `ISTIO_OUTPUT 9 › 15001 › ISTIO_OUTPUT 4`.

    The REDIRECT chains are left out: the proxy port after them says the same.  A hop of
    another table than nat keeps its table: `ISTIO_INBOUND 8 (mangle)`.
    """
    from rich.markup import escape

    from . import path

    parts = []
    for hop in path.parse(text).hops if text else ():
        if hop.kind == "proxy":
            parts.append(hop.name.split()[1])
        elif hop.kind == "chain" and not hop.name.endswith("REDIRECT"):
            name = f"{hop.name} {hop.rule}" if hop.rule else hop.name
            parts.append(name if hop.table == "nat" else f"{name} ({hop.table})")
    return escape(" › ".join(parts))
