"""Bad input of every kind: one clear line, exit status 2, no traceback, nothing left behind.

CLI arguments, lab ids, scenario files and rule profiles are tried through the real
command in a sandbox (tests/sandbox.py), so "nothing left behind" is exact: no namespace,
no record, no process.  Scenario files are also fuzzed with hypothesis: whatever YAML (or
bytes) a file holds, `load_all` either loads it or raises ScenarioError with
`file: field: problem` on one line, never another exception.
"""

from __future__ import annotations

import copy
import os
import tempfile
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lab import scenario

from .sandbox import Sandbox

REPO = Path(__file__).resolve().parent.parent
GOOD = yaml.safe_load((REPO / "scenarios" / "type2-local-to-remote.yaml").read_text())
METACHARACTERS = ["a;reboot", "$(id)", "`id`", "a|b", "a&&b", "../../etc", "a b", "x\ny", "'", '"', "*", "~root"]
TOO_LONG = "x" * 13  # ilab-<id>-prometheus: 12 is the most a lab id may have


# -- the command line ----------------------------------------------------------------------

CLI_CASES = [
    # arguments
    ([], "the following arguments are required: COMMAND"),
    (["bogus"], "invalid choice: 'bogus'"),
    (["run", "--nope"], "unrecognized arguments: --nope"),
    (["up", "--id"], "argument --id: expected one argument"),
    (["trace", "--count", "x"], "invalid int value: 'x'"),
    (["trace", "--seconds", "nan"], "--seconds must be positive, not nan"),
    (["trace", "--port", "99999"], "port 99999 is out of range 1-65535"),
    (["down", "abc", "--all"], "give a lab id or --all, not both"),
    (["run", "--profile", "istio-1.13", "--rules", "x"], "not allowed with argument --profile"),
    # flags a command would silently ignore
    (["explain", "type2-local-to-remote", "--rules", "x"], "explain: --rules goes with a flow of your own"),
    (["explain", "type2-local-to-remote", "--udp"], "explain: --udp goes with a flow of your own"),
    (["probe", "--netns", "/run/netns/ilab-none", "--from", "1000", "--to", "10.1.0.9:80", "--backend", "nft"],
     "--netns measures the pod's own rules as they are: --backend does not apply"),
    (["probe", "--netns", "/run/netns/ilab-none", "--from", "1000", "--to", "10.1.0.9:80", "--proxy-uid", "5"],
     "--netns measures the pod's own rules as they are: --proxy-uid does not apply"),
    # lab ids: shell metacharacters, too long for the names made from them, empty
    *[(["up", "--id", bad], f"bad lab id {bad!r}") for bad in ["a;reboot", "$(id)", "../x", "x\ny", TOO_LONG, "A", ""]],
    *[(["down", bad], f"no lab {bad!r} on this machine") for bad in ["a;reboot", "`id`", "../../etc", "a b"]],
    (["rules", "$(id)"], "no lab '$(id)' on this machine"),
    (["trace", "a;b"], "no lab 'a;b' on this machine"),
    (["rules"], "0 labs are up (none): name one"),
    (["trace", "--pod", "a;b"], "no pod 'a;b' in a lab"),
    # scenario ids
    (["run", "type2-local-to-remote;reboot"], "unknown scenario id 'type2-local-to-remote;reboot'"),
    (["explain", "$(id)"], "unknown scenario id '$(id)'"),
    # rule profiles
    (["run", "--profile", "nope"], "no rule profile 'nope'"),
    (["run", "--profile", "../../etc/passwd"], "no rule profile '../../etc/passwd'"),
    (["up", "--profile", "$(id)"], "no rule profile '$(id)'"),
    (["run", "--proxy-uid", "4000"], "--proxy-uid describes a dump given with --rules; a profile needs none"),
    (["run", "--profile", "istio-1.25", "--inbound-port", "15006"], "--inbound-port describes a dump given with --rules"),
    (["run", "--rules", "/nonexistent"], "/nonexistent: cannot read: No such file or directory"),
    (["run", "--rules", "/etc"], "/etc: cannot read: Is a directory"),
    (["run", "--scenarios", "/nonexistent"], "/nonexistent: no such scenario directory"),
    (["run", "--scenarios", "/etc/passwd"], "/etc/passwd: no such scenario directory"),
]


@pytest.fixture
def box():
    with Sandbox() as box:
        yield box


def _one_line(result, text: str) -> None:
    assert result.returncode == 2, (result.returncode, result.stdout, result.stderr)
    assert result.stderr.count("\n") == 1 and result.stderr.endswith("\n"), result.stderr
    assert result.stderr.startswith("istio-lab"), result.stderr
    assert text in result.stderr, result.stderr
    assert "Traceback" not in result.stderr and result.stdout == ""


@pytest.mark.kernel
@pytest.mark.parametrize("argv, text", CLI_CASES, ids=[" ".join(map(repr, a)) or "(none)" for a, _ in CLI_CASES])
def test_bad_argument_is_one_line_and_status_2(box, argv, text):
    result = box.run(*argv)
    _one_line(result, text)
    assert box.leftovers() == {}


def _scenario_dir(tmp_path: Path, name: str, content: bytes | None) -> Path:
    d = tmp_path / "scenarios"
    d.mkdir()
    if content is not None:
        (d / name).write_bytes(content)
    return d


# PyYAML's own words after "bad YAML: " are its to change (6.0.4 answered a deep list with its
# nesting limit): the tests hold the lab's part of each message, the file and the line.
BAD_FILES = [
    ("x.yaml", b"\xff\xfe\x00 not UTF-8", "x.yaml: line 1: not UTF-8 text"),
    ("x.yaml", b'id: "a\x00b"\n', "x.yaml: line 1: bad YAML: "),
    ("x.yaml", b"id: [\n", "x.yaml: line 2: bad YAML: "),
    ("x.yaml", b"[" * 5000 + b"]" * 5000, "x.yaml: "),  # refused as too deep, or read and refused as a list
    ("x.yaml", b"[[1]]\n", "x.yaml: top level: expected a mapping, got list"),
    ("x.yaml", b"!!python/object/apply:os.system ['reboot']\n", "x.yaml: line 1: bad YAML: "),
    ("x.yaml", b"a: 1\n---\nb: 2\n", "x.yaml: line 2: bad YAML: "),
    ("x.yaml", yaml.safe_dump({**GOOD, "id": "a;reboot"}).encode(), "x.yaml: id: 'a;reboot' is not a scenario id"),
    ("x.yaml", yaml.safe_dump({**GOOD, "id": "x" * 65}).encode(), "x.yaml: id: "),
    ("x.yaml", yaml.safe_dump({**GOOD, 1: "x", "zz": 2}).encode(), "x.yaml: 1: unknown field"),
    (None, None, "scenarios: no scenario files (*.yaml)"),
]


@pytest.mark.kernel
@pytest.mark.parametrize("name, content, text", BAD_FILES, ids=[f"{i}-{t.split(': ', 1)[-1][:40]}" for i, (*_, t) in enumerate(BAD_FILES)])
def test_bad_scenario_file_is_one_line_and_status_2(box, tmp_path, name, content, text):
    d = _scenario_dir(tmp_path, name, content)
    result = box.run("run", "--scenarios", str(d))
    _one_line(result, text)
    assert box.leftovers() == {}


# -- scenario files, fuzzed ---------------------------------------------------------------

FIELDS = ["id", "title", "type", "variant_of", "article", "path", "claim", "proxies", "traffic", "trigger",
          "from", "to", "pod", "process", "uid", "gid", "label", "service", "address", "port", "protocol",
          "expected", "profiles", "explanation", "istio-1.4", "istio-1.13"]
WORDS = ["sidecar", "remote", "istiod", "prometheus", "app", "remote", "10.244.0.20", "10.96.0.90", "127.0.0.1",
         "8.8.8.8", "::1", "http", "tcp", "udp", "client", "pilot-agent-redial", "type2-local-to-remote",
         "Local Pod -> OUTPUT -> Remote Pod", "A -> ?? -> B", "->", "Envoy 15001 (Outbound)",
         "ISTIO_OUTPUT RULE 9", "ISTIO_OUTPUT RULE x", "", " ", *METACHARACTERS, "x" * 300, "[/]", "[bold]"]
SCALARS = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.integers(-2, 70000),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=20), st.sampled_from(WORDS),
)
KEYS = st.one_of(st.sampled_from(FIELDS), st.text(max_size=8), st.integers(-3, 3), st.booleans(), st.none())
VALUES = st.recursive(SCALARS, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                       st.dictionaries(KEYS, inner, max_size=4)), max_leaves=10)


def _paths(doc, prefix=()):
    """Every key path into a nested mapping."""
    for key, value in doc.items():
        yield prefix + (key,)
        if isinstance(value, dict):
            yield from _paths(value, prefix + (key,))


@st.composite
def mutated_scenarios(draw) -> bytes:
    """The good scenario with 1-4 fields replaced, removed or added, as YAML."""
    doc = copy.deepcopy(GOOD)
    for _ in range(draw(st.integers(1, 4))):
        path = draw(st.sampled_from(list(_paths(doc))))
        parent = doc
        for key in path[:-1]:
            parent = parent[key]
        action = draw(st.sampled_from(["replace", "remove", "add"]))
        if action == "replace":
            parent[path[-1]] = draw(VALUES)
        elif action == "remove":
            del parent[path[-1]]
        else:
            parent[draw(KEYS)] = draw(VALUES)
        if not doc:
            break
    return yaml.safe_dump(doc, sort_keys=False, allow_unicode=draw(st.booleans())).encode()


@st.composite
def spliced_text(draw) -> bytes:
    """The good scenario's YAML text with a few characters inserted or cut: broken syntax."""
    text = yaml.safe_dump(GOOD, sort_keys=False)
    for _ in range(draw(st.integers(1, 3))):
        at = draw(st.integers(0, len(text)))
        if draw(st.booleans()):
            text = text[:at] + draw(st.text(alphabet=":-[]{}&*!|>'\"%@`#,?\n\t \\x", max_size=4)) + text[at:]
        else:
            text = text[:at] + text[at + draw(st.integers(1, 20)):]
    return text.encode()


FILES = st.one_of(mutated_scenarios(), spliced_text(), st.builds(lambda v: yaml.safe_dump(v).encode(), VALUES),
                  st.binary(max_size=200), st.text(max_size=200).map(str.encode))


def _loads_or_names_the_problem(directory: str, file: str) -> None:
    try:
        loaded = scenario.load_all(directory)
    except scenario.ScenarioError as e:
        message = str(e)
        assert "\n" not in message, message
        assert message.startswith(f"{file}: "), message
        field, sep, problem = message[len(file) + 2:].partition(": ")
        assert sep and field.strip() and problem.strip(), message
        return
    for s in loaded:  # what loads is what the report and the runner can use
        assert isinstance(s.id, str) and isinstance(s.title, str) and 1 <= s.traffic.to.port <= 65535
        assert s.article is None or s.article.proxies is None or all(isinstance(p, str) for p in s.article.proxies)


@settings(max_examples=400, deadline=None, database=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow])
@given(FILES)
def test_any_scenario_file_loads_or_names_file_field_and_problem(content):
    with tempfile.TemporaryDirectory() as d:
        file = os.path.join(d, "fuzzed.yaml")
        with open(file, "wb") as f:
            f.write(content)
        _loads_or_names_the_problem(d, file)


@settings(max_examples=100, deadline=None, database=None, derandomize=True)
@given(st.lists(mutated_scenarios(), min_size=2, max_size=3))
def test_several_files_load_or_name_one_of_them(contents):
    """Ids across files: duplicates and dangling variant_of are named with the file."""
    with tempfile.TemporaryDirectory() as d:
        for i, content in enumerate(contents):
            with open(os.path.join(d, f"s{i}.yaml"), "wb") as f:
                f.write(content)
        try:
            scenario.load_all(d)
        except scenario.ScenarioError as e:
            message = str(e)
            assert "\n" not in message and message.startswith(f"{d}/s") and ".yaml: " in message, message
