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
        **({"article_note": s.article_note} if s.article_note else {}),
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
        console.print(f"  article: {escape(article_text(s))}")
        if r.profile is None and not r.failure:
            differences = default_differences(r)
            console.print(f"  {profiles.DEFAULT}: " + ("[yellow]differs[/]" if differences else "the same path"))
            for d in differences:
                console.print(f"    {escape(d)}")
        if r.matches_article:
            console.print("  [green]the kernel agrees with the article[/]")
        for d in r.article_differences:
            console.print(f"  [yellow]differs[/]: {escape(d)}")
        nat = {ref: n for ref, n in r.counter_deltas.items() if ":" not in ref}
        if nat:
            console.print("  nat rules whose counters moved:")
            order = list(dict.fromkeys(r.rule_hits)) + sorted(set(nat) - set(r.rule_hits))
            for ref in (ref for ref in order if ref in nat):
                console.print(f"    {ref:<20} +{nat[ref]:<3} {escape(r.rule_lines.get(ref, ''))}")
        others = sorted(set(r.counter_deltas) - set(nat))
        for table, what in (("raw", "raw rules whose counters moved (queries and answers):"),
                            ("mangle", "mangle rules whose counters moved (every packet, not only the SYN):")):
            refs = [ref for ref in others if ref.startswith(f"{table}:")]
            if refs:
                console.print(f"  {what}")
            for ref in refs:
                console.print(f"    {ref.split(':', 1)[1]:<20} +{r.counter_deltas[ref]:<3} "
                              f"{escape(r.rule_lines.get(ref, ''))}")
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
            _article_short(r.scenario),
            _short(r.measured_path) or "-",
            "[yellow]differs[/]" if r.agreement == "differs" else r.agreement,
            _verdict(r),
        )
    console.print(table)


def article_text(s) -> str:
    if s.article_note:
        return f"(no claim) {s.article_note}"
    return s.article_path or "(a picture only) " + s.article_claim


def _article_short(s) -> str:
    if s.article_note:
        return "(no claim)"
    return _short(s.article_path) or "(picture) " + ", ".join(s.article_proxies or ())


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
