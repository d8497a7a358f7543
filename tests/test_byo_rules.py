"""`istio-lab run --rules FILE`: a pod's own iptables-save dump, checked, fitted and run."""

import json
import os
import subprocess
import sys

import pytest

from lab.errors import LabError
from lab.rules import builder, foreign, profiles, save, xtables
from lab.world import Lab

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EVERY_PROFILE = profiles.names()


def _write(tmp_path, text: str, name: str = "pod.rules") -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def _article(**replacements) -> str:
    text = profiles.text(profiles.DEFAULT)
    for old, new in replacements.items():
        text = text.replace(old, new)
    return text


@pytest.mark.parametrize("name", profiles.names())
def test_a_profiles_dump_is_recognised_as_that_profile(tmp_path, name):
    pod = foreign.load(_write(tmp_path, profiles.text(name)))
    assert profiles.load(pod.profile).lines() == profiles.load(name).lines()
    assert pod.notes == [] or pod.notes == ["no inbound redirect: inbound traffic goes straight to the app"]


def test_the_proxy_uid_gid_and_ports_are_read_and_renumbered(tmp_path):
    options = builder.Options(proxy_uid=(1234,), proxy_port=15101, inbound_capture_port=15106)
    pod = foreign.load(_write(tmp_path, builder.build("1.13", options).text()))
    assert pod.notes == ["proxy uid 1234 is the lab's 1337 here: renumbered",
                         "proxy gid 1234 is the lab's 1337 here: renumbered",
                         "outbound port 15101 is the lab's 15001 here: renumbered",
                         "inbound port 15106 is the lab's 15006 here: renumbered"]
    assert pod.profile == "istio-1.13"  # once renumbered, the article's rules
    assert pod.dump.lines() == profiles.load("istio-1.13").lines()


def test_options_say_what_the_dump_cannot(tmp_path):
    text = builder.build("1.13", builder.Options(proxy_uid=(1337, 4000))).text()
    assert foreign.load(_write(tmp_path, text)).notes[0] == "--uid-owner names 1337, 4000: the proxy is 1337"
    text = builder.build("1.13", builder.Options(proxy_uid=(4000, 4001))).text()
    with pytest.raises(LabError, match=r"pod.rules:\d+: --uid-owner names 4000, 4001: say which is the proxy's "
                                       r"with --proxy-uid"):
        foreign.load(_write(tmp_path, text))
    pod = foreign.load(_write(tmp_path, text), proxy_uid=4001, proxy_gid=4001)
    assert "proxy uid 4001 is the lab's 1337 here: renumbered" in pod.notes


def test_a_rule_set_of_its_own_has_no_profile(tmp_path):
    options = builder.Options(outbound_exclude_ports=(15012,))
    pod = foreign.load(_write(tmp_path, builder.build("1.13", options).text()))
    assert pod.profile is None and pod.notes == []


@pytest.mark.parametrize("text, problem", [
    ("*nat\n-A OUTPUT\nCOMMIT\n", r"pod.rules:2: rule with no match or target"),
    ("*filter\nCOMMIT\n", r"pod.rules: no \*nat table"),
    ("*nat\n:OUTPUT ACCEPT [0:0]\n-A OUTPUT -j RETURN\nCOMMIT\n", r"\*nat has no ISTIO_OUTPUT chain"),
    (_article(**{"-A OUTPUT -p tcp -j ISTIO_OUTPUT": "-A OUTPUT -p tcp -j RETURN"}),
     r"nat OUTPUT never jumps to ISTIO_OUTPUT"),
    (_article(**{"-A ISTIO_REDIRECT -p tcp -j REDIRECT --to-ports 15001": "-A ISTIO_REDIRECT -p tcp -j RETURN"}),
     r"no '-A ISTIO_REDIRECT \.\.\. -j REDIRECT --to-ports PORT'"),
    (_article(**{"--to-ports 15001": "--to-ports 15001-15002"}),
     r"pod.rules:\d+: -A ISTIO_REDIRECT -p tcp -j REDIRECT --to-ports 15001-15002: REDIRECT to '15001-15002'"),
    (_article(**{"-m owner --uid-owner 1337": "", "-m owner ! --uid-owner 1337": "",
                 "-m owner --gid-owner 1337": "", "-m owner ! --gid-owner 1337": ""}),
     r"no --uid-owner or --gid-owner rule"),
    (profiles.text("istio-1.25-ipv6", 6), r"pod.rules:\d+: an IPv6 address: this is ip6tables-save's dump"),
])
def test_unusable_dumps_are_refused_naming_the_problem(tmp_path, text, problem):
    with pytest.raises(LabError, match=problem):
        foreign.load(_write(tmp_path, text))


def test_unreadable_files_are_one_line(tmp_path):
    with pytest.raises(LabError, match="cannot read: No such file"):
        foreign.load(str(tmp_path / "missing.rules"))
    binary = tmp_path / "binary.rules"
    binary.write_bytes(b"\xff\xfe\x00")
    with pytest.raises(LabError, match="not a text file"):
        foreign.load(str(binary))


# --- on the kernel ------------------------------------------------------------------------

def _saved_dumps(tmp_path, names) -> dict[str, str]:
    """Each profile applied to a pod and saved back with iptables-legacy-save, as from a real pod."""
    files = {}
    with Lab() as lab:
        ns = lab.pod("sidecar").ns
        for name in names:
            for dump in profiles.dumps(name):
                xtables.apply(ns, dump)
            saved = subprocess.run(["ip", "netns", "exec", ns, "iptables-legacy-save"],
                                   capture_output=True, text=True, check=True).stdout
            files[name] = _write(tmp_path, saved, f"{name}.rules")
            for dump in profiles.dumps(name):
                for table in dump.tables:
                    xtables.apply(ns, save.parse(f"*{table}\nCOMMIT\n", family=dump.family))
    return files


def _run(*argv) -> tuple[int, dict, str]:
    done = subprocess.run([sys.executable, "-m", "lab.cli", "run", "--json", *argv], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    return done.returncode, json.loads(done.stdout) if done.stdout.strip() else {}, done.stderr


@pytest.mark.kernel
def test_rules_runs_on_the_saved_dump_of_every_profile(tmp_path):
    for name, file in _saved_dumps(tmp_path, EVERY_PROFILE).items():
        code, report, stderr = _run("--rules", file)
        failed = [(s["id"], s["failure"] or s["measured_path"], s["counters"], s["trace_rule_events"])
                  for s in report.get("scenarios", []) if s["verdict"] != "pass"]
        assert code == 0, (name, stderr, failed)
        assert report["rules"] == file
        assert profiles.load(report["profile"]).lines() == profiles.load(name, 4).lines()
        assert all(s["verdict"] == "pass" and s["profile"] == report["profile"] for s in report["scenarios"])


@pytest.mark.kernel
def test_a_rule_set_of_its_own_shows_where_it_leaves_the_default(tmp_path):
    """A pod with istiod's port excluded (excludeOutboundPorts: 15012) and its proxy as uid 1234:
    no profile, so the report measures each path and names the hops that differ from istio-1.13's."""
    options = builder.Options(outbound_exclude_ports=(15012,), proxy_uid=(1234,))
    file = _write(tmp_path, builder.build("1.13", options).text())
    code, report, stderr = _run("--rules", file, "type6-app-to-istiod", "type2-local-to-remote")
    assert code == 0, stderr
    assert report["profile"] is None
    assert report["notes"] == ["proxy uid 1234 is the lab's 1337 here: renumbered",
                               "proxy gid 1234 is the lab's 1337 here: renumbered"]
    istiod, remote = report["scenarios"]
    assert istiod["expected_path"] is None and istiod["verdict"] == "pass"
    assert istiod["measured_path"] == "Local Pod -> OUTPUT -> ISTIO_OUTPUT RULE 1 -> POSTROUTING -> Istiod"
    assert istiod["differs_from_default"][0] == "istio-1.13 passes ISTIO_OUTPUT RULE 9, these rules ISTIO_OUTPUT RULE 1"
    assert remote["differs_from_default"] == [
        "istio-1.13 passes ISTIO_OUTPUT RULE 9, these rules ISTIO_OUTPUT RULE 10",
        "istio-1.13 passes ISTIO_OUTPUT RULE 4, these rules ISTIO_OUTPUT RULE 5"]


@pytest.mark.kernel
def test_a_rule_the_kernel_refuses_is_named_with_its_line(tmp_path):
    text = _article(**{"-A ISTIO_OUTPUT -j ISTIO_REDIRECT": "-A ISTIO_OUTPUT -m nosuchmatch -j ISTIO_REDIRECT"})
    file = _write(tmp_path, text)
    code, report, stderr = _run("--rules", file)
    line = next(n for n, text in enumerate(text.splitlines(), 1) if "nosuchmatch" in text)
    assert code == 2 and report == {}
    # the lab's part of the line: the file, the line, the table and the rule (libxtables' words follow)
    assert stderr.startswith(f"istio-lab: {file}: line {line}: nat: -A ISTIO_OUTPUT -m nosuchmatch -j ISTIO_REDIRECT: ")
    assert stderr.count("\n") == 1
