"""The report in Markdown: the summary table and each path, for a CI job summary."""

from __future__ import annotations

from .view import MatrixView, RunView, ScenarioView


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _verdict(v: ScenarioView) -> str:
    return "pass" if v.passed else "**FAIL**"


def _counters(v: ScenarioView) -> str:
    moved = ", ".join(f"`{row.rule}` +{row.moved}" for row in v.counters if row.moved) or "none"
    if v.counters_agree:
        agree = "agree with TRACE"
    else:
        agree = "**disagree with TRACE** (" + ", ".join(f"`{row.rule}` {row.traced}" for row in v.counters) + ")"
    return f"rule counters: {moved} ({agree})"


def _scenario(v: ScenarioView) -> list[str]:
    claim = v.article.claim
    out = [f"### {v.id}: {v.title}", ""]
    if v.failure:
        out += [f"**Not measured**: {v.failure}", ""]
    out += [f"- issue: {issue}" for issue in v.issues]
    out += [f"- rules: {v.rules}"] if v.rules else []
    out += [f"- pod: {v.pod}"] if v.pod else []
    out += [f"- kernel: `{v.measured_text or '-'}`",
            f"- article (no claim): {v.article_note}" if claim is None
            else f"- article: `{claim.path_text}`" if claim.path_text
            else f"- article (a picture only): {claim.sentence}"]
    out += [f"- differs: {d}" for d in v.article.differences]
    out += [f"- {_counters(v)}", f"- verdict: {_verdict(v)}", ""]
    return out


def render(run: RunView) -> str:
    facts = " · ".join(f for f in (f"lab {run.lab}" if run.lab else "", f"profile {run.rules_name}") if f)
    out = ["## Which iptables rule each kind of traffic takes", "",
           f"{run.passed} of {len(run.scenarios)} scenarios pass; the kernel agrees with the article on "
           f"{run.agreeing}. ({facts})", "",
           "| scenario | verdict | article | path the kernel took |", "|---|---|---|---|"]
    for v in run.scenarios:
        out.append(f"| `{v.id}` | {_verdict(v)} | {v.agreement} | {_cell(v.measured_text or v.failure or '')} |")
    out.append("")
    for v in run.scenarios:
        out += _scenario(v)
    return "\n".join(out)


def _matrix_cell(v: ScenarioView | None) -> str:
    return "–" if v is None else _verdict(v)


def render_matrix(m: MatrixView) -> str:
    """The matrix for a CI job summary: verdicts by scenario and profile, the paths that differ
    between profiles, what was left out, and each failure with why."""
    out = ["## Which iptables rule each kind of traffic takes, under every profile", "",
           f"{m.passed} of {len(m.results)} verdicts pass under {len(m.profiles)} profiles "
           f"({m.backend} backend, {m.labs} labs).", "",
           "| scenario | " + " | ".join(name.removeprefix("istio-") for name in m.profiles) + " |",
           "|---|" + "---|" * len(m.profiles)]
    for sid in m.rows:
        out.append(f"| `{sid}` | " + " | ".join(_matrix_cell(m.cell(sid, name)) for name in m.profiles) + " |")
    out += ["", "### Paths by profile", ""]
    for sid in m.rows:
        paths = m.paths(sid)
        if len(paths) == 1:
            out.append(f"- `{sid}`: `{_cell(paths[0][0])}`")
            continue
        out.append(f"- `{sid}`:")
        out += [f"  - {', '.join(names)}: `{_cell(path)}`" for path, names in paths]
    if m.left_out:
        out += ["", "### Left out", ""] + [f"- {_cell(line)}" for line in m.left_out]
    failed = [(run.rules_name, v) for run in m.runs for v in run.scenarios if not v.passed]
    if failed:
        out += ["", "### Failures", ""]
        for name, v in failed:
            out.append(f"- **{name}** `{v.id}`: kernel `{v.measured_text or '-'}`")
            out += [f"  - {_cell(why)}" for why in v.problems]
    out.append("")
    return "\n".join(out)
