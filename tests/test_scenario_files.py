"""Bad scenario files and ids: one line naming the file, the field and the problem; exit 2."""

import os
import subprocess
import sys
import textwrap

import pytest

from lab import scenario

from .sandbox import Sandbox

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GOOD = textwrap.dedent("""\
    id: t
    title: T
    type: 2
    article: {path: "Local Pod -> OUTPUT -> Remote Pod", claim: "c"}
    traffic:
      from: {pod: sidecar, process: app, uid: 1000, gid: 1000, label: Local Pod}
      to: {pod: remote, port: 9080, label: Remote Pod}
    expected: {path: "Local Pod -> OUTPUT -> Remote Pod"}
    explanation: x
""")


def _write(tmp_path, text, name="s.yaml"):
    (tmp_path / name).write_text(text)
    return tmp_path


@pytest.mark.parametrize("change, field, problem", [
    (("id: t\n", ""), "id", "missing"),
    (("pod: remote", "pod: nowhere"), "traffic.to.pod", "unknown pod 'nowhere'"),
    (("port: 9080", "port: 70000"), "traffic.to.port", "out of range"),
    (("port: 9080", "port: http"), "traffic.to.port", "expected int"),
    (("uid: 1000", "uid: -1"), "traffic.from.uid", "0-65535"),
    (("type: 2", "type: 7"), "type", "types 1-6"),
    (("explanation: x", "explanation: x\ncolour: red"), "colour", "unknown field"),
    (("{pod: remote, port", "{address: 8.8.8.8, port"), "traffic.to.address", "outside the lab"),
    (("{pod: remote, port", "{address: nope, port"), "traffic.to.address", "not an IP address"),
    (("{pod: remote, port", "{service: db, port"), "traffic.to.service", "unknown service"),
    (('expected: {path: "Local Pod -> OUTPUT -> Remote Pod"}', 'expected: {path: "A -> ?? -> B"}'),
     "expected.path", "cannot read hop"),
    (("label: Remote Pod}", "label: Remote Pod, protocol: sctp}"), "traffic.to.protocol", "not one of"),
    (("traffic:\n", "traffic:\n  trigger: magic\n"), "traffic.trigger", "not one of"),
    (("traffic:\n", "traffic:\n  trigger: pilot-agent-redial\n"), "traffic.trigger", "re-dials istiod only"),
])
def test_bad_field_is_named(tmp_path, change, field, problem):
    _write(tmp_path, GOOD.replace(*change))
    with pytest.raises(scenario.ScenarioError) as e:
        scenario.load_all(tmp_path)
    message = str(e.value)
    assert message.startswith(f"{tmp_path / 's.yaml'}: {field}: "), message
    assert problem in message and "\n" not in message


def test_bad_yaml_names_the_line(tmp_path):
    _write(tmp_path, GOOD + "traffic: [\n")
    with pytest.raises(scenario.ScenarioError, match=r"s.yaml: line \d+: bad YAML"):
        scenario.load_all(tmp_path)


def test_duplicate_ids_and_dangling_variants(tmp_path):
    _write(tmp_path, GOOD, "a.yaml")
    _write(tmp_path, GOOD, "b.yaml")
    with pytest.raises(scenario.ScenarioError, match="also the id of"):
        scenario.load_all(tmp_path)
    (tmp_path / "b.yaml").write_text(GOOD.replace("id: t", "id: u\nvariant_of: nope"))
    with pytest.raises(scenario.ScenarioError, match="variant_of: no scenario 'nope'"):
        scenario.load_all(tmp_path)


def test_the_repository_scenarios_load():
    ids = [s.id for s in scenario.load_all()]
    for required in ("type1-remote-to-local", "type2-local-to-remote", "type3-prometheus-to-local",
                     "type4-local-to-local", "type5-envoy-localhost", "type6-sidecar-to-istiod"):
        assert required in ids


def _cli(*argv):
    return subprocess.run([sys.executable, "-m", "lab.cli", *argv], cwd=REPO, capture_output=True, text=True)


@pytest.mark.parametrize("argv, text", [
    (["run", "no-such-id"], "unknown scenario id 'no-such-id'"),
    (["explain", "no-such-id"], "unknown scenario id 'no-such-id'"),
])
def test_unknown_id_is_one_line_and_status_2(argv, text):
    result = _cli(*argv)
    assert result.returncode == 2
    assert text in result.stderr and result.stderr.count("\n") == 1
    assert "Traceback" not in result.stderr


@pytest.mark.kernel
def test_cli_names_a_bad_file_and_builds_no_lab(tmp_path):
    _write(tmp_path, GOOD.replace("port: 9080", "port: 0"))
    with Sandbox() as box:  # its own /run/netns: labs of tests running alongside come and go
        result = box.run("run", "--scenarios", str(tmp_path))
        assert result.returncode == 2
        assert result.stderr.strip() == f"istio-lab: {tmp_path / 's.yaml'}: traffic.to.port: port 0 is out of range 1-65535"
        assert box.leftovers() == {}


def test_list_and_explain(tmp_path):
    listed = _cli("list")
    assert listed.returncode == 0 and "type6-sidecar-to-istiod" in listed.stdout
    explained = _cli("explain", "type5-envoy-localhost")
    assert explained.returncode == 0
    assert " >  4  -m owner --uid-owner 1337 -j RETURN" in explained.stdout
    assert "    8  -d 127.0.0.1/32 -j RETURN" in explained.stdout


def test_explain_under_a_profile_numbers_each_table_it_passes():
    explained = _cli("explain", "type4-local-to-local", "--profile", "istio-1.25-tproxy")
    assert explained.returncode == 0, explained.stderr
    out = explained.stdout
    assert "kernel (istio-1.25-tproxy): Local Pod -> OUTPUT -> ISTIO_OUTPUT RULE 9" in out
    mangle = out.split("ISTIO_INBOUND (mangle table)\n", 1)[1].split("\n\n", 1)[0].splitlines()
    assert mangle[2] == " >  3  -i lo -p tcp -m mark ! --mark 0x53a -j RETURN"
    assert mangle[7] == " >  8  -p tcp -j ISTIO_TPROXY"
    assert " >  3  ! -d 127.0.0.1/32 -o lo -p tcp -m owner --gid-owner 1337 -j MARK" in out  # mangle OUTPUT: 1338
    unknown = _cli("explain", "type4-local-to-local", "--profile", "nope")
    assert unknown.returncode == 2 and "no rule profile 'nope'" in unknown.stderr


@pytest.mark.kernel
@pytest.mark.parametrize("text, argv, problem", [
    # 127.0.0.2 is loopback over IPv4, but IPv6 has one loopback address: no twin to run
    (GOOD.replace("to: {pod: remote, port: 9080, label: Remote Pod}",
                  "to: {address: 127.0.0.2, port: 8080, label: Local Pod}"),
     ["--profile", "istio-1.25-ipv6"], "traffic.to: 127.0.0.2 has no IPv6 twin"),
    # a DNS scenario only, under rules that capture no DNS: nothing would run
    (open(os.path.join(REPO, "scenarios", "dns-udp.yaml")).read(), [], "none of the scenarios applies to istio-1.13"),
])
def test_a_run_that_cannot_happen_is_one_line_before_any_lab(tmp_path, text, argv, problem):
    _write(tmp_path, text)
    with Sandbox() as box:
        result = box.run("run", "--scenarios", str(tmp_path), *argv)
        assert result.returncode == 2, (result.stdout, result.stderr)
        assert problem in result.stderr and result.stderr.count("\n") == 1
        assert "Traceback" not in result.stderr
        assert box.leftovers() == {}
