"""The report in Markdown: the summary table and each path, for a CI job summary."""

from __future__ import annotations

from .runner import Result


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _verdict(r: Result) -> str:
    return "pass" if r.verdict == "pass" else "**FAIL**"


def _counters(r: Result) -> str:
    moved = ", ".join(f"`{ref}` +{n}" for ref, n in r.counter_deltas.items()) or "none"
    agree = "agree with TRACE" if r.counters_agree else f"**disagree with TRACE** ({r.trace_rule_events})"
    return f"nat counters: {moved} ({agree})"


def _scenario(r: Result) -> list[str]:
    s = r.scenario
    out = [f"### {s.id}: {s.title}", ""]
    if r.failure:
        out += [f"**Not measured**: {r.failure}", ""]
    out += [f"- kernel: `{r.measured_path or '-'}`",
            f"- article: `{s.article_path}`" if s.article_path
            else f"- article (no claim): {s.article_note}" if s.article_note
            else f"- article (a picture only): {s.article_claim}"]
    out += [f"- differs: {d}" for d in r.article_differences]
    out += [f"- {_counters(r)}", f"- verdict: {_verdict(r)}", ""]
    return out


def render(results: list[Result], **meta) -> str:
    facts = " · ".join(f"{k} {meta[k]}" for k in ("lab", "profile") if k in meta)
    passed = sum(r.verdict == "pass" for r in results)
    agree = sum(r.matches_article is True for r in results)
    out = ["## Which iptables rule each kind of traffic takes", "",
           f"{passed} of {len(results)} scenarios pass; the kernel agrees with the article on {agree}."
           + (f" ({facts})" if facts else ""), "",
           "| scenario | verdict | article | path the kernel took |", "|---|---|---|---|"]
    for r in results:
        out.append(f"| `{r.scenario.id}` | {_verdict(r)} | {r.agreement} | "
                   f"{_cell(r.measured_path or r.failure or '')} |")
    out.append("")
    for r in results:
        out += _scenario(r)
    return "\n".join(out)
