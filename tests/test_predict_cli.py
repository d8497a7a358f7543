"""`istio-lab predict` (and `explain --from --to`): one flow from the rules alone, no root, no
namespaces.  The path, each hop's rule, and beside each rule passed without matching, why;
`cannot predict: ...` is exit 3, bad input one line and exit 2."""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from lab import cli
from lab.rules import nftset, profiles, save, xtables

REPO = Path(__file__).resolve().parent.parent
NOBODY = 65534


def _predict(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli.main(list(argv))
    return code, out.getvalue(), err.getvalue()


def _write(tmp_path: Path, text: str, name: str = "pod.rules") -> str:
    (tmp_path / name).write_text(text)
    return str(tmp_path / name)


def test_predict_prints_the_path_each_hops_rule_and_why_the_others_did_not_match() -> None:
    code, out, err = _predict("predict", "--from", "sidecar", "--to", "remote:9080")
    assert code == 0, err
    assert ("predict: Local Pod -> OUTPUT -> ISTIO_OUTPUT RULE 9 -> ISTIO_REDIRECT -> Envoy 15001 (Outbound) -> "
            "OUTPUT -> ISTIO_OUTPUT RULE 4 -> POSTROUTING -> Remote Pod") in out
    assert "ISTIO_OUTPUT RULE 9     -A ISTIO_OUTPUT -j ISTIO_REDIRECT" in out
    assert "rule 3: needs -o lo; this packet leaves by eth0" in out
    assert "rule 4: needs --uid-owner 1337; the socket's owner is uid 1000" in out
    assert "leg 2, Envoy 15001 (Outbound)'s own connection" in out


def test_predict_takes_pods_ips_vips_localhost_uids_gids_udp_and_ipv6() -> None:
    code, out, _ = _predict("predict", "--from", "sidecar:1337", "--to", "10.96.0.90:9080")
    assert code == 0 and "ISTIO_OUTPUT RULE 4 -> POSTROUTING -> KUBE-SEP-REMOTE RULE 2 (node) -> Remote Pod" in out
    code, out, _ = _predict("predict", "--from", "sidecar:1000:1337", "--to", "localhost:15000")
    assert code == 0 and "(uid 1000, gid 1337)" in out and "ISTIO_OUTPUT RULE 3" in out
    code, out, _ = _predict("predict", "--from", "sidecar", "--to", "10.96.0.90:9080", "--udp")
    assert code == 0 and "KUBE-SEP-REMOTE RULE 3 (node)" in out
    code, out, _ = _predict("predict", "--profile", "istio-1.25-ipv6", "--ipv6", "--from", "remote", "--to",
                            "sidecar:8080")
    assert code == 0 and "fd00:10:244::10" in out and "ISTIO_INBOUND RULE 5" in out


def test_predict_json_has_the_path_hops_and_misses(tmp_path) -> None:
    code, out, _ = _predict("predict", "--from", "sidecar", "--to", "remote:9080", "--json")
    data = json.loads(out)
    assert code == 0 and data["profile"] == profiles.DEFAULT and data["ending"] == "reached"
    assert data["predicted_path"].endswith("-> Remote Pod")
    assert data["hops"][2] == {"kind": "chain", "name": "ISTIO_OUTPUT", "rule": 9, "table": "nat",
                               "line": "-A ISTIO_OUTPUT -j ISTIO_REDIRECT",
                               "packet": "SYN 10.244.0.10:* > 10.244.0.20:9080"}
    assert {"leg": 0, "rule": "ISTIO_OUTPUT#3", "namespace": "sidecar", "needs": "-o lo",
            "has": "this packet leaves by eth0", "text": "rule 3: needs -o lo; this packet leaves by eth0"} \
        in data["misses"]


def test_every_ending_is_written(tmp_path) -> None:
    text = profiles.text(profiles.DEFAULT)
    dropped = text.replace("-A ISTIO_OUTPUT -s 127.0.0.6/32", "-A ISTIO_OUTPUT -p tcp --dport 9080 -j DROP\n"
                           "-A ISTIO_OUTPUT -s 127.0.0.6/32", 1)
    rejected = text + "*filter\n:OUTPUT ACCEPT [0:0]\n-A OUTPUT -p tcp --dport 9080 -j REJECT\nCOMMIT\n"
    cases = [
        (_write(tmp_path, dropped, "drop.rules"), "sidecar", "remote:9080", "Local Pod -> OUTPUT -> ISTIO_OUTPUT RULE 1 -> DROP"),
        (_write(tmp_path, rejected, "reject.rules"), "sidecar", "remote:9080",
         "-> ISTIO_OUTPUT RULE 4 -> OUTPUT (filter) -> REJECT"),
        (None, "sidecar", "10.96.0.99:80", "-> ISTIO_REDIRECT -> Envoy 15001 (Outbound) -> OUTPUT -> ISTIO_OUTPUT RULE 4 "
                                            "-> POSTROUTING -> node: no route to 10.96.0.99, unreachable"),
        (None, "sidecar:1337", "remote:22", "-> POSTROUTING -> Remote Pod 22: no listener, refused"),
        (None, "sidecar", "localhost:15000", "Local Pod -> OUTPUT -> ISTIO_OUTPUT RULE 3 -> POSTROUTING -> Local Pod"),
        (None, "sidecar", "localhost:15001", "Local Pod -> OUTPUT -> ISTIO_OUTPUT RULE 3 -> Envoy 15001 (Outbound) -> "
                                            "blackhole, closed"),
        (None, "sidecar:0", "sidecar:15006", "-> Envoy 15006 (Inbound) -> blackhole, closed"),
        (str(REPO / "tests/data/dumps/istio-1.0.rules"), "remote", "sidecar:8080",
         "-> Envoy 15001 (Inbound) -> OUTPUT -> ISTIO_OUTPUT RULE 1 -> ISTIO_REDIRECT -> Envoy 15001 (loop)"),
    ]
    for rules, source, to, want in cases:
        code, out, err = _predict("predict", *(("--rules", rules) if rules else ()), "--from", source, "--to", to,
                                  "--json")
        assert code == 0, err
        assert want in json.loads(out)["predicted_path"], (rules, source, to, json.loads(out)["predicted_path"])


def test_native_nftables_rules_are_predicted_not_ignored(tmp_path) -> None:
    """A native profile's rules are nft's (RuleSet.nft, no iptables dump): predict walks them, in
    nft's words, as it walks iptables' (it once walked no rule at all: a path with no capture)."""
    code, out, err = _predict("predict", "--profile", "istio-1.27-nft", "--from", "sidecar:1000", "--to", "remote:8080")
    assert code == 0, err
    assert ("predict: Local Pod -> OUTPUT -> istio-output RULE 9 -> istio-redirect -> Envoy 15001 (Outbound) -> "
            "OUTPUT -> istio-output RULE 4 -> POSTROUTING -> Remote Pod 8080: no listener, refused") in out
    assert "istio-output RULE 4                    skuid 1337 return" in out
    assert "istio-output                 rule 3: needs oifname lo; this packet leaves by eth0" in out
    code, out, err = _predict("predict", "--rules", str(REPO / "tests/data/nft/tproxy.listed"), "--from", "remote",
                              "--to", "sidecar:8080", "--json")
    assert code == 0, err
    path = json.loads(out)["predicted_path"]
    assert path.startswith("Remote Pod -> PREROUTING -> istio-inbound RULE 6 (istio-proxy-mangle) -> istio-tproxy "
                           "RULE 1 (istio-proxy-mangle) -> Envoy 15006 (Inbound)"), path
    code, out, err = _predict("explain", "--profile", "istio-1.27-nft-dns", "--from", "sidecar", "--to",
                              "10.96.0.10:53", "--udp")
    assert code == 0, err
    assert "predict: Local Pod -> OUTPUT -> istio-output-dns RULE 5 (istio-proxy-raw) -> istio-output RULE 8" in out
    assert "istio-output-dns (table inet istio-proxy-raw: its raw table, IPv4 and IPv6)" in out
    assert "   iptables: ISTIO_OUTPUT_DNS (raw table)" in out  # beside the iptables chain it mirrors
    code, _, err = _predict("predict", "--profile", "istio-1.27-nft", "--ipv6", "--from", "sidecar", "--to",
                            "remote:9080")
    assert code == 2 and "istio-1.27-nft has no ip6 rules" in err
    code, out, _ = _predict("predict", "--profile", "istio-1.27-nft-ipv6", "--ipv6", "--from", "remote", "--to",
                            "sidecar:8080")
    assert code == 0 and "istio-inbound RULE 5 -> istio-in-redirect -> Envoy 15006 (Inbound) -> OUTPUT -> istio-output " \
        "RULE 2 -> POSTROUTING -> Local Pod" in out


def test_what_predict_does_not_model_in_nft_is_one_line_and_exit_3(tmp_path) -> None:
    text = (REPO / "tests/data/nft/istio-style.nft").read_text() + (
        "table inet t {\n\tchain output {\n\t\ttype filter hook output priority 0; policy accept;\n"
        "\t\tmeta l4proto tcp fib daddr type local counter drop\n\t}\n}\n")
    code, out, err = _predict("predict", "--rules", _write(tmp_path, text, "pod.nft"), "--from", "sidecar", "--to",
                              "remote:9080")
    assert code == 3 and out == ""
    assert err == "istio-lab: cannot predict: rule 1 of output (t) uses fib daddr type local\n"


def test_an_owner_rule_a_tproxied_packet_meets_is_one_line_and_exit_3_however_long_its_chain(tmp_path) -> None:
    """Past 16 rules a chain is indexed: predict and explain refuse as they do for a short one
    (once the index skipped the rule and the misses raised it: a traceback, exit 1)."""
    drops = "".join(f"\t\ttcp dport {20002 + n} drop\n" for n in range(19))
    text = nftset.text(profiles.nft_rules("istio-1.27-nft-tproxy")) + (
        "table inet f {\n\tchain in {\n\t\ttype filter hook input priority 0; policy accept;\n"
        f"\t\tskuid 1337 drop\n{drops}\t}}\n}}\n")
    for command in ("predict", "explain"):
        code, out, err = _predict(command, "--rules", _write(tmp_path, text, "pod.nft"), "--from", "remote", "--to",
                                  "sidecar:8080")
        assert (code, out) == (3, "")
        assert err == ("istio-lab: cannot predict: rule 1 of in (f) uses skuid 1337 on a packet TPROXY gave a "
                       "socket to\n")


@pytest.mark.parametrize("command", ["predict", "probe", "explain"])
def test_rules_help_says_nft_rules_are_taken_too(command) -> None:
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit):
        cli.main([command, "--help"])
    said = " ".join(out.getvalue().split())
    assert "iptables-save dump" in said and "nft list ruleset output, or an nft -f script" in said


def test_what_predict_does_not_model_is_one_line_and_exit_3(tmp_path) -> None:
    text = profiles.text(profiles.DEFAULT) + ("*filter\n:OUTPUT ACCEPT [0:0]\n"
                                              "-A OUTPUT -p tcp -m statistic --mode random --probability 0.5 -j DROP\n"
                                              "COMMIT\n")
    code, out, err = _predict("predict", "--rules", _write(tmp_path, text), "--from", "sidecar", "--to", "remote:9080")
    assert code == 3 and out == ""
    assert err == "istio-lab: cannot predict: rule 1 of OUTPUT (filter) uses -m statistic\n"


@pytest.mark.parametrize("argv, problem", [
    (["--from", "nowhere", "--to", "remote:9080"], "--from: no pod 'nowhere'"),
    (["--from", "sidecar:x", "--to", "remote:9080"], "--from: uid 'x' is not a number"),
    (["--from", "sidecar:1:2:3", "--to", "remote:9080"], "write POD, POD:UID or POD:UID:GID"),
    (["--from", "sidecar", "--to", "remote"], "--to 'remote': write HOST:PORT"),
    (["--from", "sidecar", "--to", "remote:99999"], "--to 'remote:99999': write HOST:PORT"),
    (["--from", "sidecar", "--to", "db.example:80"], "--to: 'db.example' is not a pod"),
    (["--from", "sidecar", "--to", "10.0.0.1:80", "--ipv6"], "--ipv6, but --to names an IPv4 address"),
    (["--from", "sidecar", "--to", "remote:80", "--ipv6"], "istio-1.13 has no ip6tables rules"),
    (["--from", "sidecar", "--to", "remote:80", "--profile", "nope"], "no rule profile 'nope'"),
    (["--from", "sidecar", "--to", "remote:80", "--rules", "/nonexistent.rules"], "cannot read"),
    (["--to", "remote:80"], "the following arguments are required: --from"),
])
def test_bad_input_is_one_line_and_exit_2(argv, problem) -> None:
    done = subprocess.run([sys.executable, "-m", "lab.cli", "predict", *argv], cwd=REPO, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 2 and done.stdout == ""
    assert problem in done.stderr and done.stderr.count("\n") == 1, done.stderr


def test_a_dump_with_no_istio_chain_is_a_fair_question_for_predict_not_for_run(tmp_path) -> None:
    bare = _write(tmp_path, "*nat\n:PREROUTING ACCEPT [0:0]\n:INPUT ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n"
                            ":POSTROUTING ACCEPT [0:0]\nCOMMIT\n")
    code, out, err = _predict("predict", "--rules", bare, "--from", "sidecar", "--to", "remote:9080")
    assert code == 0, err
    assert "no Istio chain: the pod's traffic meets no Istio rule" in out
    assert "predict: Local Pod -> OUTPUT -> POSTROUTING -> Remote Pod" in out
    code, out, _ = _predict("predict", "--rules", bare, "--from", "sidecar", "--to", "sidecar:15001")
    assert "Envoy 15001 (Outbound) -> no original destination, closed" in out  # nothing tracks connections
    done = subprocess.run([sys.executable, "-m", "lab.cli", "run", "--rules", bare], cwd=REPO, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 2 and "*nat has no ISTIO_OUTPUT chain" in done.stderr


def test_explain_any_flow_uses_predict() -> None:
    code, out, err = _predict("explain", "--from", "sidecar:1337", "--to", "localhost:15000")
    assert code == 0, err
    assert "predict: Local Pod -> OUTPUT -> ISTIO_OUTPUT RULE 4 -> POSTROUTING -> Local Pod" in out
    assert " >  4  -m owner --uid-owner 1337 -j RETURN" in out  # the chain, numbered, the matched rule marked
    assert "rule 3: needs ! --uid-owner 1337; the socket's owner is uid 1337" in out
    code, out, err = _predict("explain", "type2-local-to-remote", "--from", "sidecar", "--to", "remote:9080")
    assert code == 2 and "a scenario ID or --from and --to, not both" in err


def test_the_short_protocol_form_loads_as_iptables_reads_it() -> None:
    """`-p tcp --dport 9080` (no -m tcp) is valid iptables: the protocol match loads implicitly."""
    rule = xtables.to_iptc(save.RuleLine("ISTIO_OUTPUT", ("-p", "tcp", "--dport", "9080", "-j", "DROP")))
    assert xtables.to_save("ISTIO_OUTPUT", rule) == "-A ISTIO_OUTPUT -p tcp -m tcp --dport 9080 -j DROP"
    rule = xtables.to_iptc(save.RuleLine("OUTPUT", ("-p", "udp", "-m", "owner", "--uid-owner", "1337", "--dport",
                                                    "53", "-j", "RETURN")))
    assert xtables.to_save("OUTPUT", rule) == "-A OUTPUT -p udp -m owner --uid-owner 1337 -m udp --dport 53 -j RETURN"
    with pytest.raises(ValueError, match="option --dport before any -m or -j"):
        xtables.to_iptc(save.RuleLine("OUTPUT", ("--dport", "53", "-j", "RETURN")))


# --- no root -----------------------------------------------------------------------------------

def _as_nobody(argv: list[str]) -> tuple[int, str]:
    """Run cli.main in a child that dropped to nobody (no groups, no capabilities) first."""
    import rich.console, rich.markup, rich.table  # noqa: F401  (the child cannot import from a 0700 home)

    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: drop everything, then answer
        try:
            os.close(read)
            os.setgroups([])
            os.setgid(NOBODY)
            os.setuid(NOBODY)
            assert os.getuid() == os.geteuid() == NOBODY
            out = io.StringIO()
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
                code = cli.main(argv)
            os.write(write, json.dumps([code, out.getvalue()]).encode())
        finally:
            os._exit(0)
    os.close(write)
    with os.fdopen(read) as f:
        data = f.read()
    os.waitpid(pid, 0)
    code, out = json.loads(data)
    return code, out


def test_predict_runs_as_an_unprivileged_user() -> None:
    if os.geteuid() != 0:  # already unprivileged: that is the point
        code, out, _ = _predict("predict", "--from", "sidecar", "--to", "remote:9080")
        assert code == 0 and "Remote Pod" in out
        return
    code, out = _as_nobody(["predict", "--from", "sidecar", "--to", "10.96.0.90:9080", "--json"])
    assert code == 0, out
    assert json.loads(out)["predicted_path"].endswith("Envoy 15001 (Outbound) -> OUTPUT -> ISTIO_OUTPUT RULE 4 -> "
                                                     "POSTROUTING -> Remote Pod")
    code, out = _as_nobody(["predict", "--rules", str(REPO / "tests/data/nft/tproxy.listed"), "--from", "remote",
                            "--to", "sidecar:8080", "--json"])  # a pod's nft list ruleset, read as nobody
    assert code == 0, out
    assert "istio-tproxy RULE 1 (istio-proxy-mangle) -> Envoy 15006 (Inbound)" in json.loads(out)["predicted_path"]
    code, out = _as_nobody(["predict", "--profile", "istio-1.27-nft", "--from", "sidecar", "--to", "10.96.0.90:9080"])
    assert code == 0 and "istio-output RULE 9 -> istio-redirect -> Envoy 15001 (Outbound)" in out, out
    # the whole command, interpreter and imports too, where nobody can reach the interpreter
    runuser = shutil.which("runuser")
    python = os.path.realpath(sys.executable)
    if runuser is None or subprocess.run([runuser, "-u", "nobody", "--", python, "-c", "pass"],
                                         capture_output=True).returncode:
        print(f"(not run as a separate process: nobody cannot execute {python})")
        return
    done = subprocess.run([runuser, "-u", "nobody", "--", python, "-m", "lab.cli", "predict", "--from", "sidecar",
                           "--to", "remote:9080"], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and "-> Remote Pod" in done.stdout, done.stderr
