"""`istio-lab run --rules FILE` with nft rules: `nft list ruleset` output or an `nft -f` script
(Istio's goldens are such scripts), checked, fitted and run on the nft backend, whichever
backend the environment asks for."""

import json
import os
import subprocess
import sys
from dataclasses import replace

import pytest

from lab import netns
from lab.errors import LabError
from lab.rules import nftbuilder, nftset, profiles, ruleset
from lab.rules.nft import libnft, native

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NATIVE = profiles.names(native_nftables=True)


def _write(tmp_path, text: str, name: str = "pod.nft") -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


@pytest.mark.parametrize("name", NATIVE)
def test_a_native_profiles_script_is_recognised_as_that_profile(tmp_path, name):
    rules = ruleset.from_file(_write(tmp_path, profiles.nft_text(name)))
    assert rules.native and rules.dumps == () and rules.profile == name and rules.notes == ()
    uncounted = ruleset.from_file(_write(tmp_path, nftset.script(profiles.nft_rules(name), counters=False)))
    assert uncounted.profile == name  # Istio 1.27 writes no counter; the lab adds its own either way


def test_the_proxy_uid_gid_and_ports_are_read_and_renumbered(tmp_path):
    options = nftbuilder.NftOptions(proxy_uid=(1234,), proxy_port=15101, inbound_capture_port=15106)
    rules = ruleset.from_file(_write(tmp_path, nftset.script(nftbuilder.build("1.27", options))))
    assert rules.notes == ("proxy uid 1234 is the lab's 1337 here: renumbered",
                           "proxy gid 1234 is the lab's 1337 here: renumbered",
                           "outbound port 15101 is the lab's 15001 here: renumbered",
                           "inbound port 15106 is the lab's 15006 here: renumbered")
    assert rules.profile == "istio-1.27-nft"  # once renumbered, the default native rules


def test_options_say_what_the_rules_cannot(tmp_path):
    two = nftset.script(nftbuilder.build("1.27", nftbuilder.NftOptions(proxy_uid=(4000, 4001))))
    with pytest.raises(LabError, match=r"pod.nft:\d+: skuid names 4000, 4001: say which is the proxy's with "
                                       r"--proxy-uid"):
        ruleset.from_file(_write(tmp_path, two))
    rules = ruleset.from_file(_write(tmp_path, two), proxy_uid=4001, proxy_gid=4001)
    assert "proxy uid 4001 is the lab's 1337 here: renumbered" in rules.notes


XT_LISTING = """table ip nat {
\tchain OUTPUT {
\t\ttype nat hook output priority -100; policy accept;
\t\tmeta l4proto tcp counter packets 0 bytes 0 xt target REDIRECT
\t}
}
"""


@pytest.mark.parametrize("text, problem", [
    (XT_LISTING, r"pod.nft:4: 'meta l4proto tcp counter xt target REDIRECT': a rule iptables-nft wrote through the "
                 r"xt compatibility layer, which nft lists but cannot write back \(give this table as iptables-save "
                 r"output: --rules takes that too\)"),
    ("table inet t {\n\tchain c {\n\t\ttype filter hook output priority 0; policy accept;\n\t}\n}\n",
     r"pod.nft: no table with a nat base chain: Istio's sidecar redirects in nat"),
    ("add table inet t\nadd chain inet t o { type nat hook output priority -100; }\n",
     r"pod.nft: no nat base chain at the output hook holds a rule"),
    ("table inet t {\n\tset s {\n\t\ttype ipv4_addr\n\t}\n}\n", r"pod.nft:2: expected a chain or \}, found 'set'"),
    ("hello world\n", r"pod.nft:1: 'hello world': neither iptables-save output \(\*nat, -A ...\) nor nft rules"),
    ("# only a comment\n", r"pod.nft: no rules in it"),
])
def test_unusable_nft_rules_are_refused_in_one_line_naming_the_problem(tmp_path, text, problem):
    with pytest.raises(LabError, match=problem) as refused:
        ruleset.from_file(_write(tmp_path, text))
    assert "\n" not in str(refused.value)


def test_no_owner_match_is_refused(tmp_path):
    rules = nftbuilder.build("1.27")
    no_owner = rules.map_rules(lambda r: r if "skuid" not in r.words and "skgid" not in r.words
                               else replace(r, text="counter return"))
    with pytest.raises(LabError, match="no skuid or skgid rule"):
        ruleset.from_file(_write(tmp_path, nftset.script(no_owner)))


@pytest.mark.kernel
def test_run_takes_a_pods_nft_list_ruleset_and_the_backend_follows_the_file(tmp_path):
    """The listing a real pod would give (`nft list ruleset`, handles and counters in it), read
    back from a namespace the test made: the lab recognises the profile and runs it on nft,
    though the environment asks for legacy."""
    ns = "ilab-tbyonft-sidecar"
    netns.create(ns)
    try:
        native.apply(ns, profiles.nft_text("istio-1.27-nft-tproxy"))
        listing = libnft.text(ns)
    finally:
        netns.remove(ns)
    assert "# handle" in listing and "counter packets 0 bytes 0" in listing
    file = _write(tmp_path, listing, "pod-listing.nft")
    assert ruleset.from_file(file).profile == "istio-1.27-nft-tproxy"
    env = {**os.environ, "ISTIO_LAB_BACKEND": "legacy"}
    done = subprocess.run([sys.executable, "-m", "lab.cli", "run", "--rules", file, "--json", "type1-remote-to-local",
                           "type2-local-to-remote"], capture_output=True, text=True, cwd=REPO, env=env)
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)
    assert out["backend"] == "nft" and out["profile"] == "istio-1.27-nft-tproxy"
    assert [s["verdict"] for s in out["scenarios"]] == ["pass", "pass"]
    assert "istio-inbound RULE 8 (istio-proxy-mangle)" in out["scenarios"][0]["measured_path"]
    legacy = subprocess.run([sys.executable, "-m", "lab.cli", "run", "--rules", file, "--backend", "legacy"],
                            capture_output=True, text=True, cwd=REPO)
    assert legacy.returncode == 2
    assert legacy.stderr == ("istio-lab: native nftables rules go into nf_tables: use --backend nft (or auto), "
                             "not legacy\n")
