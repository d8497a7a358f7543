"""The HTML report: valid, self-contained, a diagram per scenario holding every
measured hop, the article's differing hops marked, and a real browser opens it.

Recorded kernel runs of every profile (tests/data/observations/) feed the offline tests; the
kernel tests run `istio-lab run --json --report DIR` and check the page against
the paths that same run measured.
"""

import json
import re
import subprocess
import sys
from pathlib import Path

import html5lib
import pytest
from PIL import Image
from rich.console import Console

from lab import dualstack, html_report, markdown_report, report, result, scenario, view
from lab.observe import Observation
from lab.rules import profiles

from . import browser
from .record_observations import load

REPO = Path(__file__).resolve().parents[1]
SCENARIOS = [s for s in scenario.load_all() if s.group != "problems"]  # the problems run in labs of their own (test_problems.py)
BY_ID = {s.id: s for s in SCENARIOS}
SVG = "{http://www.w3.org/2000/svg}"  # html5lib keeps inline SVG in its namespace


def parse_page(text: str):
    """Strict: an unclosed or misnested tag, a stray end tag, a bad doctype all raise."""
    return html5lib.HTMLParser(strict=True, namespaceHTMLElements=False).parse(text)


def text_of(element) -> str:
    return " ".join(" ".join(element.itertext()).split())


def svg_groups(tree, kind: str) -> dict[str, str]:
    """id -> drawn text of every Graphviz node or edge (<g class="node ...">) on the page."""
    return {g.get("id"): " ".join(text_of(t) for t in g.iter(f"{SVG}text"))
            for g in tree.iter(f"{SVG}g") if kind in (g.get("class") or "").split()}


def hop_text(hop: dict) -> list[str]:
    """What a hop's box must say: its name; for a chain its rule number and rule."""
    if hop["kind"] == "chain":
        return [hop["name"], f"rule {hop['rule']}", hop["line"].split(" ", 2)[2]]
    return [hop["name"]]


def assert_diagram_draws(tree, sid: str, hops: list[dict]) -> None:
    nodes, edges = svg_groups(tree, "node"), svg_groups(tree, "edge")
    for i, hop in enumerate(hops):
        box = nodes.get(f"{sid}-hop{i}")
        assert box is not None, f"{sid}: hop {i} ({hop['name']}) has no box"
        for words in hop_text(hop):
            assert words in box, f"{sid}: hop {i}: {words!r} not in {box!r}"
        if i:
            arrow = edges.get(f"{sid}-arrow{i}")
            assert arrow is not None, f"{sid}: no arrow into hop {i}"
            seen_on = hop.get("packet", "") if hop.get("packet", "").startswith(("SYN", "UDP")) else hops[i - 1]["packet"]
            assert arrow.startswith(f"{i} ") and seen_on in arrow, (sid, i, arrow)
    assert f"{sid}-hop{len(hops)}" not in nodes, f"{sid}: more boxes than hops"


# --- offline: recorded runs ------------------------------------------------------------------


def recorded_results(profile: str) -> list[result.Result]:
    """Every scenario recorded under the profile, concluded again offline."""
    data = load(profile)

    def scenario_of(sid: str):
        base = BY_ID[sid.removesuffix(dualstack.SUFFIX)]
        return dualstack.over_ipv6(base) if sid.endswith(dualstack.SUFFIX) else base

    return [result.conclude(scenario_of(sid), profile, Observation.from_json(data[sid])) for sid in sorted(data)]


def run_view(results: list[result.Result], profile: str = "istio-1.13") -> view.RunView:
    return view.run([r.view for r in results], "recorded", profile)


@pytest.fixture(scope="module")
def recorded(tmp_path_factory):
    results = recorded_results("istio-1.13")
    out = html_report.prepare(str(tmp_path_factory.mktemp("report")))
    html_report.write(out, run_view(results))
    return results, out


@pytest.fixture(scope="module")
def recorded_tree(recorded):
    return parse_page((recorded[1] / "index.html").read_text())


def test_the_strict_parser_catches_an_unclosed_tag():
    with pytest.raises(html5lib.html5parser.ParseError):
        parse_page("<!DOCTYPE html><html><head><title>t</title></head><body><div><span>x</div></body></html>")


def test_the_page_is_valid_html(recorded_tree):
    assert recorded_tree.find("body") is not None


def test_the_page_needs_nothing_from_outside(recorded, recorded_tree):
    text = (recorded[1] / "index.html").read_text()
    assert recorded_tree.find(".//script") is None and recorded_tree.find(".//link") is None
    for element in recorded_tree.iter():
        for attr, value in element.attrib.items():
            if attr in ("src", "href") or attr.endswith("}href"):
                assert value.startswith("#"), f"<{element.tag} {attr}={value!r}>"
    style = " ".join(s.text or "" for s in recorded_tree.iter("style"))
    assert "url(" not in style and "@import" not in style and "@font-face" not in style
    assert not re.search(r"https?://(?!www\.w3\.org/)", text), "a URL other than an XML namespace"


def test_every_scenario_has_a_section_and_a_diagram_with_every_hop(recorded, recorded_tree):
    results, _ = recorded
    sections = {s.get("id"): s for s in recorded_tree.iter("section")}
    for r in results:
        assert r.scenario.id in sections
        assert_diagram_draws(recorded_tree, r.scenario.id, [report.hop_json(h) for h in r.measurement.path.hops])


def test_hooks_show_the_rule_that_jumped_into_istios_chains(recorded_tree):
    nodes = svg_groups(recorded_tree, "node")
    assert "rule 1: -p tcp -j ISTIO_OUTPUT" in nodes["type2-local-to-remote-hop1"]
    assert "rule 1: -p tcp -j ISTIO_INBOUND" in nodes["type1-remote-to-local-hop1"]


def marked(tree, sid: str, mark: str) -> list[str]:
    """Texts of the boxes of diagram `sid` that carry the class `mark`."""
    return [text for gid, text in svg_groups(tree, mark).items() if re.fullmatch(rf"{sid}-(hop|added)\d+", gid)]


def test_the_articles_path_is_drawn_with_the_differing_hops_marked(recorded_tree):
    # uid 1337 returns at rule 4: the article's rule 9 and its detour through Envoy never happen
    never = marked(recorded_tree, "type6-sidecar-to-istiod-article", "differs")
    assert [t.split(" the kernel")[0] for t in never] == ["ISTIO_OUTPUT RULE 9", "Envoy 15001 (Outbound)", "OUTPUT"]
    # the article leaves ISTIO_REDIRECT out of the app's way to istiod
    added = marked(recorded_tree, "type6-app-to-istiod-article", "added")
    assert len(added) == 1 and "ISTIO_REDIRECT" in added[0]
    # rule 4 where the article says rule 8: marked on both sides
    assert marked(recorded_tree, "type5-envoy-localhost-article", "differs") == [
        "ISTIO_OUTPUT RULE 8 the kernel: ISTIO_OUTPUT RULE 4"]
    kernel_side = marked(recorded_tree, "type5-envoy-localhost", "differs")
    assert len(kernel_side) == 1 and "ISTIO_OUTPUT rule 4" in kernel_side[0]
    for agrees in ("type2-local-to-remote", "type4-local-to-local"):
        assert not marked(recorded_tree, agrees, "differs") and not marked(recorded_tree, agrees, "added")


def test_a_picture_only_article_is_quoted_not_drawn(recorded_tree):
    section = next(s for s in recorded_tree.iter("section") if s.get("id") == "type1-remote-to-local")
    article = next(f for f in section.iter("figure") if f.get("class") == "article")
    assert article.find(f".//{SVG}svg") is None
    assert BY_ID["type1-remote-to-local"].article.sentence in text_of(article)


def test_each_section_has_the_counters_and_the_explanation(recorded, recorded_tree):
    results, _ = recorded
    sections = {s.get("id"): text_of(s) for s in recorded_tree.iter("section")}
    for r in results:
        text = sections[r.scenario.id]
        for ref, delta in r.measurement.counters.items():
            assert f"{ref} +{delta}" in text
        assert " ".join(r.scenario.explanation.split()) in text


def test_a_scenario_that_was_not_measured_still_gets_its_section(tmp_path):
    failed = run_view([result.conclude(BY_ID["type2-local-to-remote"], "istio-1.13", None, "envoy exited with status 1")])
    tree = parse_page(html_report.page(failed))
    section = next(tree.iter("section"))
    assert "Not measured: envoy exited with status 1" in text_of(section)
    assert section.find(f".//{SVG}svg") is None
    assert "**Not measured**: envoy exited with status 1" in markdown_report.render(failed)


def test_summary_md_has_the_table_and_every_path(recorded):
    results, out = recorded
    md = (out / "summary.md").read_text()
    rows = [line for line in md.splitlines() if line.startswith("| `")]
    assert len(rows) == len(results)
    for r, row in zip(results, rows):
        assert row.startswith(f"| `{r.scenario.id}` | pass | {'agrees' if r.article.matches else 'differs'} |")
        assert f"- kernel: `{r.measured_path}`" in md
        assert all(d in md for d in r.article.differences)


@pytest.mark.parametrize("profile", profiles.names())
def test_every_profiles_recorded_run_renders_in_every_report(profile):
    """mangle, raw, UDP, lo re-entry and IPv6 hops, drawn, tabled and written without a kernel."""
    results = recorded_results(profile)
    shown = run_view(results, profile)
    tree = parse_page(html_report.page(shown))
    for r in results:
        assert_diagram_draws(tree, r.scenario.id, [report.hop_json(h) for h in r.measurement.path.hops])
    document = json.loads(report.to_json(shown))
    assert [s["measured_path"] for s in document["scenarios"]] == [r.measured_path for r in results]
    assert all(s["verdict"] == "pass" and s["counters_agree"] for s in document["scenarios"])
    md = markdown_report.render(shown)
    assert all(f"- kernel: `{r.measured_path}`" in md for r in results)
    console = Console(record=True, width=200, soft_wrap=True, force_terminal=False)
    report.render(console, shown)
    text = console.export_text()
    assert all(f"kernel : {r.measured_path}" in text for r in results)
    assert text.count("verdict: pass") == len(results)


def test_report_into_a_place_that_is_no_directory_is_one_line_and_status_2(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    done = subprocess.run([sys.executable, "-m", "lab.cli", "run", "--report", str(blocker / "out")],
                          cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 2
    assert done.stderr == f"istio-lab: --report {blocker / 'out'}: cannot make the directory: Not a directory\n"


def test_report_without_graphviz_dot_is_one_line_and_status_2(tmp_path):
    done = subprocess.run([sys.executable, "-m", "lab.cli", "run", "--report", str(tmp_path)],
                          cwd=REPO, capture_output=True, text=True, env={"PATH": str(tmp_path)})
    assert done.returncode == 2
    assert done.stderr == ("istio-lab: --report needs Graphviz's dot (Debian package graphviz; "
                           "sudo scripts/setup installs it)\n")


def test_the_browser_check_sees_console_errors_and_failed_loads(tmp_path):
    bad = tmp_path / "bad.html"
    bad.write_text('<!DOCTYPE html><html><head><title>t</title></head><body><img src="missing.png" alt="">'
                   '<script>console.error("boom"); undefinedFunction();</script></body></html>')
    seen = browser.visit(bad.as_uri())
    assert any("boom" in e for e in seen.console_errors)
    assert any("undefinedFunction" in e for e in seen.console_errors)
    assert any("missing.png" in e for e in seen.console_errors)


# --- on the kernel: the README's command, then a browser ------------------------------------------


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    out = tmp_path_factory.mktemp("live-report")
    done = subprocess.run([sys.executable, "-m", "lab.cli", "run", "--json", "--report", str(out)],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode in (0, 1), done.stderr  # 1: a verdict failed (test_scenarios says which)
    assert done.stderr.endswith(f"istio-lab: report written to {out / 'index.html'} and {out / 'summary.md'}\n")
    return json.loads(done.stdout), out


@pytest.mark.kernel
def test_run_report_draws_the_paths_that_run_measured(live):
    measured, out = live
    tree = parse_page((out / "index.html").read_text())
    assert len(measured["scenarios"]) == len([s for s in SCENARIOS if s.feature is None])  # run's default pick
    for s in measured["scenarios"]:
        assert_diagram_draws(tree, s["id"], s["hops"])
    md = (out / "summary.md").read_text()
    assert all(f"`{s['measured_path']}`" in md for s in measured["scenarios"])


@pytest.mark.kernel
def test_the_report_opens_in_chromium_with_no_error_and_is_drawn(live):
    _, out = live
    page = (out / "index.html").as_uri()
    seen = browser.visit(page)
    assert seen.console_errors == []
    assert seen.requests == [page], "the page asked for something besides itself"
    shot = out / "screenshot.png"
    shot.write_bytes(seen.png)
    image = Image.open(shot).convert("RGB")
    assert image.width == 1400 and image.height > 3000
    colours = dict((rgb, n) for n, rgb in image.getcolors(maxcolors=1 << 24))
    assert len(colours) > 50, "a blank or flat page"
    white = colours.get((255, 255, 255), 0)
    assert white < 0.97 * image.width * image.height, "almost nothing drawn"
    for kind in ("hook", "chain", "proxy"):  # the diagrams' fills made it onto the screen
        fill = html_report.COLOURS[kind]
        rgb = tuple(int(fill[i:i + 2], 16) for i in (1, 3, 5))
        assert colours.get(rgb, 0) > 1000, f"no {kind} box drawn"
