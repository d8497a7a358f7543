"""The report as pictures: one HTML page, a Graphviz diagram per scenario.

People read packet paths from pictures, as the article draws them.  Each
scenario gets the measured path drawn by `dot` (pods and processes as boxes,
the nat hooks and chains crossed, every matched rule with its number and text,
numbered arrows labelled with the packet they were seen on) beside the
article's path with the hops where the two part ways marked.  The SVG is
inlined and the style sheet embedded, so the page needs nothing but itself.

graphviz is imported only here, and this module only for `run --report`.
"""

from __future__ import annotations

import contextlib
import datetime
import html
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from . import markdown_report, plan
from . import path as paths
from .compare import same
from .errors import LabError
from .netfilter import TABLES
from .view import MatrixView, RunView, ScenarioView

FONT = "DejaVu Sans"
MONO = "DejaVu Sans Mono"
SIDECAR = "sidecar"
PROXY = "Envoy"
AGENT = "pilot-agent"
NETFILTER = "netfilter"
# Who listens on each port the scenarios dial (the lab's processes, see processes.py).
LISTENERS = {
    plan.Port.SIDECAR_APP: "app", plan.Port.REMOTE_APP: "app", plan.Port.ISTIOD: "istiod",
    plan.Port.ADMIN: PROXY, plan.Port.STATS: PROXY, plan.Port.READY: PROXY, plan.Port.AGENT: AGENT,
    plan.Port.DNS: "kube-dns", plan.Port.DNS_PROXY: AGENT,
}
COLOURS = {  # fill by kind of hop; a differing hop gets MARK's outline
    "endpoint": "#ffffff", "hook": "#dbe9f6", "chain": "#fdf3d0", "proxy": "#dff3e3", "end": "#fde0e0",
}
KUBE_PROXY = "kube-proxy"  # the node's Service rules
MARK = "#c62828"


def prepare(directory: str) -> Path:
    """Check what the report needs before any lab is built: dot, and a directory to write."""
    try:
        import graphviz
    except ImportError:
        raise LabError("--report needs the graphviz Python package (sudo scripts/setup installs it)") from None
    try:
        graphviz.version()
    except graphviz.ExecutableNotFound:
        raise LabError("--report needs Graphviz's dot (Debian package graphviz; "
                       "sudo scripts/setup installs it)") from None
    out = Path(directory)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise LabError(f"--report {directory}: cannot make the directory: {e.strerror}") from None
    if not os.access(out, os.W_OK):
        raise LabError(f"--report {directory}: cannot write there")
    return out


def write(directory: Path, run: RunView) -> list[Path]:
    """DIR/index.html and DIR/summary.md; returns their paths."""
    index, summary = directory / "index.html", directory / "summary.md"
    index.write_text(page(run), encoding="utf-8")
    summary.write_text(markdown_report.render(run), encoding="utf-8")
    return [index, summary]


# --- the diagrams ------------------------------------------------------------------


def _graph(name: str):
    import graphviz

    return graphviz.Digraph(
        name=name,
        graph_attr={"id": name, "rankdir": "TB", "fontname": FONT, "fontsize": "11", "nodesep": "0.25",
                    "ranksep": "0.3", "bgcolor": "transparent", "labeljust": "l", "newrank": "true"},
        node_attr={"fontname": FONT, "fontsize": "11", "shape": "box", "style": "rounded,filled",
                   "fillcolor": COLOURS["endpoint"], "color": "#555555", "margin": "0.12,0.06"},
        edge_attr={"fontname": MONO, "fontsize": "9", "color": "#333333", "arrowsize": "0.7"},
    )


def _esc(text: str) -> str:
    return html.escape(text, quote=False)


def _label(title: str, *lines: str, mono: str = "") -> str:
    """An HTML-like Graphviz label: a bold title, plain lines, a rule in monospace.

    One table row per line: rows get the height of their own font, where
    <BR/>-separated lines of mixed fonts overlap in dot 2.43.
    """
    cells = [f"<B>{_esc(title)}</B>"] + [_esc(line) for line in lines if line]
    if mono:
        cells.append(f'<FONT FACE="{MONO}" POINT-SIZE="9">{_esc(mono)}</FONT>')
    rows = "".join(f"<TR><TD>{cell}</TD></TR>" for cell in cells)
    return f'<<TABLE BORDER="0" CELLBORDER="0" CELLSPACING="0" CELLPADDING="1">{rows}</TABLE>>'


def _rule_text(line: str) -> str:
    """`-A CHAIN spec` -> `spec`: the node already names the chain."""
    words = line.split(" ", 2)
    return words[2] if len(words) == 3 and words[0] == "-A" else line


def _place(v: ScenarioView, i: int, hop: paths.Hop) -> tuple[str, str]:
    """(pod, box inside the pod) a hop belongs in; "" when not known."""
    last = len(v.measured.hops) - 1
    if i == 0:
        return v.source.pod, v.source.process
    if i == last and hop.kind == paths.ENDPOINT:
        return v.reached_pod, LISTENERS.get(v.reached.port, "") if v.reached else ""
    if hop.kind == paths.END:  # where it died: the pod its SYN reached, no process there
        return v.reached_pod or SIDECAR, ""
    if hop.kind == paths.PROXY:
        return SIDECAR, AGENT if hop.name.startswith(AGENT) else PROXY
    if hop.where == plan.NODE:
        return plan.NODE, KUBE_PROXY
    return SIDECAR, NETFILTER  # the path's hooks and chains are the sidecar's


def _node(v: ScenarioView, i: int, hop: paths.Hop) -> str:
    if hop.kind == paths.CHAIN:
        table = f"  ({hop.table} table)" if hop.table != "nat" else ""  # Istio's nft tables name themselves
        return _label(f"{hop.name}  rule {hop.number}{table}", mono=_rule_text(hop.line))
    if hop.kind == paths.HOOK:
        owner = f"sent by a socket of uid {hop.owner[0]} gid {hop.owner[1]}" if hop.owner else ""
        jump = f"rule {hop.entry.number}: {_rule_text(hop.line)}" if hop.entry else ""
        return _label(hop.name, "nat hook", owner, mono=jump)
    if hop.kind == paths.PROXY:
        return _label(f"listener {hop.name.split()[1]}", hop.name,
                      "its own connection came back: stopped" if hop.name.endswith(f"({paths.LOOP})") else "")
    if hop.kind == paths.END:
        return _label(hop.name, "the flow died here")
    if i == 0:
        return _label(hop.name, f"client {v.legs[0].client}" if v.legs else "")
    return _label(hop.name, f"listening on {v.reached or (v.legs[-1].server if v.legs else '')}")


def _box_label(pod: str, box: str, v: ScenarioView) -> str:
    if box == KUBE_PROXY:
        return "kube-proxy's Service rules: nat table"
    if box == NETFILTER:
        played = {h.table: h.plays for h in v.measured.chains if not h.where}
        if "nat" not in played.values():
            played["nat"] = "nat"
        tables = sorted(played, key=lambda t: TABLES.index(played[t]) if played[t] in TABLES else len(TABLES))
        return f"netfilter: {' and '.join(tables)} table{'s' if len(tables) > 1 else ''}"
    if (pod, box) == (v.source.pod, v.source.process):
        return f"{box} (uid {v.sender_uid})"
    if box in (PROXY, AGENT):
        return f"{box} (uid {v.sidecar_uid})"
    return box


def _cluster(parent, name: str, **attrs):
    """A box (Graphviz cluster) inside parent; parent itself when the place is not known."""
    return parent.subgraph(name=name, graph_attr=attrs) if name else contextlib.nullcontext(parent)


def _arrow(hops: tuple[paths.Hop, ...], i: int) -> str:
    """The packet the arrow into hop i was seen on: the hop's own, else the one that reached it."""
    packet = hops[i].packet or hops[i - 1].packet
    return f"{i}  {packet}" if packet else str(i)


def measured_diagram(v: ScenarioView):
    """The measured path: hops in pods and processes, arrows numbered in the order crossed."""
    g = _graph(v.id)
    hops = v.measured.hops
    differing = _differing_measured(v)
    boxes: dict[str, dict[str, list[int]]] = {}
    for i, hop in enumerate(hops):
        pod, box = _place(v, i, hop)
        boxes.setdefault(pod, {}).setdefault(box, []).append(i)

    def add_node(graph, i: int) -> None:
        hop = hops[i]
        extra = {"color": MARK, "penwidth": "2.5", "tooltip": "not on the article's path"} if i in differing else {}
        if hop.kind == paths.PROXY and hop.name.endswith(f"({paths.LOOP})"):
            extra |= {"fillcolor": COLOURS["end"]}  # where the loop was stopped
        graph.node(f"h{i}", _node(v, i, hop), id=f"{v.id}-hop{i}",
                   **{"fillcolor": COLOURS[hop.kind], **extra,
                      "class": f"hop {hop.kind}" + (" differs" if i in differing else "")})

    addresses = plan.PODS6 if v.family == 6 else plan.PODS  # the family the flow ran over
    for pod, by_box in boxes.items():
        title = f"node  {plan.GATEWAY6 if v.family == 6 else plan.GATEWAY}" if pod == plan.NODE \
            else f"pod {pod}  {addresses.get(pod, '')}"
        with _cluster(g, pod and f"cluster_{pod}", label=title,
                      style="rounded", color="#8a8a8a", fontsize="12", fontcolor="#333333") as pg:
            for box, members in by_box.items():
                with _cluster(pg, box and f"cluster_{pod}_{box}", label=_box_label(pod, box, v),
                              style="rounded,filled", fillcolor="#f4f4f4" if box == NETFILTER else "#fbfbfb",
                              color="#b0b0b0") as bg:
                    for i in members:
                        add_node(bg, i)
    for i in range(1, len(hops)):
        g.edge(f"h{i - 1}", f"h{i}", label=_arrow(hops, i), id=f"{v.id}-arrow{i}")
    return g


def _differing_measured(v: ScenarioView) -> set[int]:
    """Indices of measured hops the article leaves out or names otherwise."""
    out, j = set(), 0
    for claim, kernel in v.article.alignment:
        if kernel is None:
            continue
        if claim is None or not same(claim, kernel):
            out.add(j)
        j += 1
    return out


def article_diagram(v: ScenarioView):
    """The article's path, its hops marked where the kernel does otherwise."""
    sid = f"{v.id}-article"
    g = _graph(sid)
    names = []
    for n, (claim, kernel) in enumerate(v.article.alignment):
        name = f"a{n}"
        if claim is None:  # the kernel passes a hop the article leaves out
            g.node(name, _label(f"+ {kernel}", "the kernel passes this;", "the article leaves it out"),
                   style="rounded,dashed", color=MARK, fontcolor=MARK, id=f"{sid}-added{n}",
                   **{"class": "hop added"})
        elif kernel is None:
            g.node(name, _label(str(claim), "the kernel never passes this"), fillcolor="#fde0e0", color=MARK,
                   penwidth="2.5", id=f"{sid}-hop{n}", **{"class": "hop differs"})
        elif not same(claim, kernel):
            g.node(name, _label(str(claim), f"the kernel: {kernel}"), fillcolor="#fde0e0", color=MARK,
                   penwidth="2.5", id=f"{sid}-hop{n}", **{"class": "hop differs"})
        else:
            g.node(name, _label(str(claim)), fillcolor=COLOURS[claim.kind], id=f"{sid}-hop{n}",
                   **{"class": "hop"})
        names.append(name)
    for a, b in zip(names, names[1:]):
        g.edge(a, b)
    return g


def svg(graph) -> str:
    """dot's SVG without its XML prolog, to inline in HTML."""
    text = graph.pipe(format="svg", encoding="utf-8")
    return text[text.index("<svg"):].strip()


# --- the page ----------------------------------------------------------------------

STYLE = """
body { font-family: "DejaVu Sans", Helvetica, Arial, sans-serif; margin: 0 auto; padding: 1.5em 2em;
       max-width: 1500px; color: #222; background: #fff; line-height: 1.4; }
h1 { font-size: 1.6em; margin: 0 0 .2em; }
h2 { font-size: 1.3em; margin: 0; }
h3 { font-size: 1em; margin: 1.2em 0 .4em; }
.meta { color: #666; margin: 0 0 1.5em; }
code, .path { font-family: "DejaVu Sans Mono", monospace; font-size: .85em; }
table { border-collapse: collapse; margin: .4em 0; }
th, td { border: 1px solid #ddd; padding: .3em .6em; text-align: left; vertical-align: top; }
th { background: #f3f3f3; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
.pass { color: #1b5e20; font-weight: bold; }
.fail { color: #b71c1c; font-weight: bold; }
.differ { color: #b26a00; }
section.scenario { border-top: 2px solid #ccc; margin-top: 2em; padding-top: 1em; }
.title { color: #555; font-weight: normal; }
.pictures { display: grid; grid-template-columns: minmax(0, 3fr) minmax(0, 1fr); gap: 2em;
            align-items: start; margin-top: 1em; }
@media (max-width: 900px) { .pictures { grid-template-columns: minmax(0, 1fr); } }
figure { margin: 0; }
figcaption { font-weight: bold; margin-bottom: .4em; }
figure svg { max-width: 100%; height: auto; }
.claim { max-width: 26em; font-style: italic; }
.failure { color: #b71c1c; }
.legend span { display: inline-block; padding: 0 .5em; margin-right: .6em; border: 1px solid #999;
               border-radius: 4px; font-size: .85em; }
.explanation { max-width: 60em; }
"""


def _verdict(v: ScenarioView) -> str:
    return '<span class="pass">pass</span>' if v.passed else '<span class="fail">FAIL</span>'


def _agreement(v: ScenarioView) -> str:
    return '<span class="differ">differs</span>' if v.agreement == "differs" else v.agreement


def _summary(run: RunView) -> str:
    rows = []
    for v in run.scenarios:
        rows.append(
            f'<tr><td><a href="#{_esc(v.id)}">{_esc(v.id)}</a></td><td>{_esc(v.title)}</td>'
            f'<td>{_verdict(v)}</td><td>{_agreement(v)}</td>'
            f'<td class="path">{_esc(v.measured_text or v.failure or "")}</td></tr>')
    return ("<table><thead><tr><th>scenario</th><th>traffic</th><th>verdict</th><th>article</th>"
            "<th>path the kernel took</th></tr></thead><tbody>" + "".join(rows) + "</tbody></table>")


def _counters(v: ScenarioView) -> str:
    if not v.counters:
        return "<p>No rule counter moved.</p>"
    rows = "".join(
        f"<tr><td><code>{_esc(str(row.rule))}</code></td><td class='num'>+{row.moved}</td>"
        f"<td class='num'>{row.traced}</td><td><code>{_esc(row.line)}</code></td></tr>"
        for row in v.counters)
    agree = ("The counters agree with TRACE, rule for rule." if v.counters_agree
             else '<span class="fail">The counters and TRACE disagree.</span>')
    return ("<table><thead><tr><th>counter</th><th>packets</th><th>TRACE events</th><th>rule</th></tr></thead>"
            f"<tbody>{rows}</tbody></table><p>{agree}</p>")


def _article_figure(v: ScenarioView) -> str:
    claim = v.article.claim
    if claim is None:
        body = f'<p class="claim">The article makes no claim here: {_esc(v.article_note)}</p>'
    elif v.article.alignment:
        body = svg(article_diagram(v))
    else:
        named = ", ".join(claim.proxies or ()) or "no proxy"
        body = (f'<p class="claim">The article draws this path only as a picture. '
                f"Its words: &ldquo;{_esc(claim.sentence)}&rdquo;</p><p>Proxies it names: {_esc(named)}</p>")
    return f'<figure class="article"><figcaption>The article&rsquo;s path</figcaption>{body}</figure>'


def _differences(v: ScenarioView) -> str:
    if v.failure or v.article.matches is None:
        return ""
    if v.article.matches:
        return "<p>The kernel agrees with the article.</p>"
    items = "".join(f"<li>{_esc(d)}</li>" for d in v.article.differences)
    return f"<h3>Where the article and the kernel part ways</h3><ul>{items}</ul>"


def _issue_link(issue: str) -> str:
    """`istio/istio#4286` as a link to the issue on GitHub."""
    repo, number = issue.split("#")
    return f'<a href="https://github.com/{_esc(repo)}/issues/{number}">{_esc(issue)}</a>'


def _section(v: ScenarioView) -> str:
    claim = v.article.claim
    parts = [f'<section class="scenario" id="{_esc(v.id)}">',
             f'<h2>{_esc(v.id)} <span class="title">{_esc(v.title)}</span> {_verdict(v)}</h2>']
    if v.failure:
        parts.append(f'<p class="failure">Not measured: {_esc(v.failure)}</p>')
    about = [f"issue: {_issue_link(i)}" for i in v.issues] + [f"rules: {_esc(v.rules)}" for _ in [v.rules] if v.rules]
    about += [f"pod: {_esc(v.pod)}" for _ in [v.pod] if v.pod]
    if about:
        parts.append(f'<p class="about">{"<br>".join(about)}</p>')
    article = "(no claim)" if claim is None else claim.path_text or "(a picture only)"
    parts.append(f'<p>kernel: <span class="path">{_esc(v.measured_text or "-")}</span><br>'
                 f'article: <span class="path">{_esc(article)}</span></p>')
    parts.append('<div class="pictures">')
    if v.measured:
        parts.append('<figure class="measured"><figcaption>Measured by the kernel</figcaption>'
                     f"{svg(measured_diagram(v))}</figure>")
    parts.append(_article_figure(v))
    parts.append("</div>")
    parts.append(_differences(v))
    parts.append("<h3>Rule counters during the scenario</h3>" + _counters(v))
    parts.append(f'<h3>Why</h3><p class="explanation">{_esc(" ".join(v.explanation.split()))}</p>')
    parts.append("</section>")
    return "\n".join(parts)


LEGEND = ('<p class="legend">'
          f'<span style="background:{COLOURS["hook"]}">netfilter hook</span>'
          f'<span style="background:{COLOURS["chain"]}">matched rule</span>'
          f'<span style="background:{COLOURS["proxy"]}">proxy listener</span>'
          f'<span style="border:2px solid {MARK}">not as the article says</span>'
          "Arrows are numbered in the order the traffic crossed them, each with the SYN it was seen on.</p>")


def page(run: RunView) -> str:
    when = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    facts = [f"lab {run.lab}" if run.lab else "", f"rules {run.rules_name}" if run.rules_name else "",
             f"kernel {os.uname().release}", when]
    return "\n".join([
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        "<title>istio-lab: which iptables rule each kind of traffic takes</title>",
        f"<style>{STYLE}</style></head><body>",
        "<h1>Which iptables rule each kind of traffic takes</h1>",
        f'<p class="meta">{_esc(" · ".join(f for f in facts if f))}. {run.passed} of {len(run.scenarios)} '
        f"scenarios pass; the kernel agrees with the article on {run.agreeing}.</p>",
        _summary(run),
        LEGEND,
        *_sections(run.scenarios),
        "</body></html>",
        "",
    ])


def _sections(scenarios) -> list[str]:
    """Each scenario's section; their diagrams drawn by `dot` several at a time (each a
    process of its own)."""
    if len(scenarios) < 2:
        return [_section(v) for v in scenarios]
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        return list(pool.map(_section, scenarios))


# --- the matrix: one page of verdicts, a page per profile with the diagrams ---------------


def profile_page(profile: str) -> str:
    """The file a profile's page is written to, beside the matrix's index.html."""
    return f"{profile}.html"


def write_matrix(directory: Path, m: MatrixView) -> list[Path]:
    """DIR/index.html (the matrix, each verdict linking its diagram), DIR/PROFILE.html per
    profile (as `run --profile PROFILE --report` draws it) and DIR/summary.md."""
    pages = []
    for run in m.runs:
        pages.append(directory / profile_page(run.rules_name))
        pages[-1].write_text(page(run), encoding="utf-8")
    index, summary = directory / "index.html", directory / "summary.md"
    index.write_text(matrix_page(m), encoding="utf-8")
    summary.write_text(markdown_report.render_matrix(m), encoding="utf-8")
    return [index, *pages, summary]


def _matrix_cell(v: ScenarioView | None, profile: str) -> str:
    if v is None:
        return '<td class="none">&ndash;</td>'
    return (f'<td><a href="{_esc(profile_page(profile))}#{_esc(v.id)}" title="{_esc(v.measured_text or v.failure or "")}">'
            f"{_verdict(v)}</a></td>")


def matrix_page(m: MatrixView) -> str:
    when = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    facts = [f"{m.backend} backend", f"{m.labs} labs", f"kernel {os.uname().release}", when]
    head = "".join(f'<th><a href="{_esc(profile_page(name))}">{_esc(name)}</a></th>' for name in m.profiles)
    rows = "".join(f'<tr><td><code>{_esc(sid)}</code></td>'
                   + "".join(_matrix_cell(m.cell(sid, name), name) for name in m.profiles) + "</tr>"
                   for sid in m.rows)
    paths = []
    for sid in m.rows:
        items = "".join(f'<li>{_esc(", ".join(names))}: <span class="path">{_esc(path)}</span></li>'
                        for path, names in m.paths(sid))
        paths.append(f"<li><code>{_esc(sid)}</code><ul>{items}</ul></li>")
    left_out = "".join(f"<li>{_esc(line)}</li>" for line in m.left_out)
    return "\n".join([
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        "<title>istio-lab: which iptables rule each kind of traffic takes, under every profile</title>",
        f"<style>{STYLE} td.none {{ color: #999; text-align: center; }}</style></head><body>",
        "<h1>Which iptables rule each kind of traffic takes, under every profile</h1>",
        f'<p class="meta">{_esc(" · ".join(facts))}. {m.passed} of {len(m.results)} verdicts pass under '
        f"{len(m.profiles)} profiles. Each verdict links its scenario&rsquo;s diagrams on the profile&rsquo;s page.</p>",
        f'<table class="matrix"><thead><tr><th>scenario</th>{head}</tr></thead><tbody>{rows}</tbody></table>',
        "<h2>Paths by profile</h2>",
        f'<ul class="paths">{"".join(paths)}</ul>',
        *([f"<h2>Left out</h2><ul>{left_out}</ul>"] if left_out else []),
        "</body></html>",
        "",
    ])
