"""The kernel judges predict: flows predict has never seen, fired in real labs, must take the
path predict writes for them, hop for hop, however they end (reached, answered by a proxy,
closed by one, looped, refused, dropped or rejected by a rule, unreachable).

  - Generated flows (tests/predict_flows.py) under every profile, TCP streams and UDP
    datagrams, each fired once through the pytest plugin's traced_request in that
    profile's lab: Istio's native nftables profiles on nf_tables, whatever the run's backend.
  - Generated rule sets: istio-iptables options for any version the builder models, some
    edited by hand as users do (a DROP or REJECT rule on top, written the short way
    `-p tcp --dport N`; an uninjected pod's empty tables), fitted as `--rules` fits a pod's
    dump, and generated flows fired in a lab of their own (api.Session).
  - Generated native rule sets: the same options as istio-iptables --native-nftables writes
    them (dual stack or not, INVALID_DROP), some with a table of the user's own that drops or
    rejects, fitted as `--rules` fits a pod's `nft list ruleset`, each in a lab on nf_tables.
  - A pod's iptables-nft-save: the rules iptables-nft wrote, read back, parse as the rules written.

PREDICT_FLOWS (flows per profile run, over the iptables profiles; default 200, CI 2,000),
PREDICT_RULE_SETS (default 6; CI 12), PREDICT_RULE_SET_FLOWS (flows per generated rule set,
default 12), PREDICT_NATIVE_FLOWS and PREDICT_NATIVE_RULE_SETS (the same over the native
profiles and for native rule sets; default 100 and 3, CI's nft run 1,000 and 10) and
PREDICT_SEED (default: a fresh one, printed) set the run.  A difference fails with the
flow, both paths and the seed that reproduces it.

What is not fired, and why (the tally printed at the end counts each):
  - a TCP stream to pilot-agent's DNS proxy: the stream carries no query, so the agent
    logs nothing to join the leg by;
  - a flow Envoy would dial on to a node with no route for it, while the node's ICMP
    budget is spent (ip_error answers "unreachable" about once a second per source,
    after a burst): TRACE would still show where it died, but Envoy waits out its 1 s
    connect timeout first.  A client's own packet that dies so (a UDP datagram always: a
    UDP socket is not told "host unreachable") is fired with a short wait.
"""

from __future__ import annotations

import os
import random
import socket
import subprocess
import time
import zlib
from collections import Counter
from pathlib import Path

import pytest
from hypothesis import HealthCheck, Phase, given, seed, settings
from hypothesis import strategies as st
from pyroute2 import Conntrack

from lab import api, netns, plan
from lab.errors import LabError
from lab.predict import Flow, Prediction, Predictor
from lab.rules import builder, profiles, ruleset, save
from lab.rules.builder import BuildError
from lab.rules.nft import iptables_nft

from .nftpair import in_pod
from .test_predict_nft import LOAD_ERRORS, LOADS
from .predict_flows import dies_silently, edited, flows, nft_edited, nft_options, nft_text, options, \
    unreachable_at_node

pytestmark = pytest.mark.kernel

REPO = Path(__file__).resolve().parent.parent
SEED = int(os.environ.get("PREDICT_SEED") or random.SystemRandom().randrange(2 ** 32))
FLOWS = int(os.environ.get("PREDICT_FLOWS", "200"))
RULE_SETS = int(os.environ.get("PREDICT_RULE_SETS", "6"))
RULE_SET_FLOWS = int(os.environ.get("PREDICT_RULE_SET_FLOWS", "12"))
NATIVE_FLOWS = int(os.environ.get("PREDICT_NATIVE_FLOWS", "100"))
NATIVE_RULE_SETS = int(os.environ.get("PREDICT_NATIVE_RULE_SETS", "3"))
PROFILES = profiles.names()
NATIVE = profiles.names(native_nftables=True)
# A counterexample is one flow (or one rule set and its flows), reported as drawn: shrinking it
# would fire flows, and build labs, for minutes.
NO_SHRINKING = (Phase.explicit, Phase.generate)
SHORT = 0.3  # seconds a client waits where it is known to hear nothing (a silent drop, an unanswered SYN)


class IcmpBudget:
    """A cautious guess at the node's ICMP budget per source (measured here: a burst of about
    two, then about one a second).  Correctness does not rest on it: it only decides whether
    a flow the node cannot route is fired at once, with a short wait, or not at all."""

    def __init__(self, burst: float = 2, every: float = 1.5):
        self.burst, self.every = burst, every
        self.buckets: dict[str, tuple[float, float]] = {}

    def take(self, source: str) -> bool:
        now = time.monotonic()
        tokens, last = self.buckets.get(source, (self.burst, now))
        tokens = min(self.burst, tokens + (now - last) / self.every)
        if tokens < 1:
            self.buckets[source] = (tokens, now)
            return False
        self.buckets[source] = (tokens - 1, now)
        return True


def _dns_proxy_over_tcp(prediction: Prediction) -> bool:
    return any(leg.proxy is not None and leg.proxy.role == "DNS" and leg.packet.proto == "tcp"
               for leg in prediction.walk.legs)


class Differential:
    """Fires predicted flows in a lab and compares, keeping the tally."""

    def __init__(self, request, context: str):
        self.request, self.context = request, context
        self.icmp, self.tally = IcmpBudget(), Counter()
        self.slow: list[str] = []  # flows that took long, and why: waits on the kernel's timers

    def __call__(self, predictor: Predictor, flow: Flow) -> None:
        prediction = predictor.predict(flow)
        if _dns_proxy_over_tcp(prediction):
            self.tally["not fired: a TCP stream to the DNS proxy"] += 1
            return
        wait = 2.0
        # A UDP socket is never told "host unreachable" (a soft error without IP_RECVERR): it waits.
        if unreachable_at_node(prediction) and (flow.transport == "udp" or not self.icmp.take(flow.source)):
            if len(prediction.walk.legs) > 1:
                self.tally["not fired: Envoy would wait out its connect timeout (no ICMP budget)"] += 1
                return
            wait = SHORT
        if dies_silently(prediction) and len(prediction.walk.legs) == 1:
            wait = SHORT  # nothing will answer: TRACE has seen it die by the time the client gives up
        started = time.monotonic()
        result = self.request(flow.source, flow.address, flow.port, uid=flow.uid, gid=flow.gid,
                              protocol="udp" if flow.transport == "udp" else "tcp", timeout=wait)
        took = time.monotonic() - started
        if took > 0.5:
            self.slow.append(f"{took:.1f}s {flow} {prediction.path}")
        predicted = str(prediction.path)
        report = (f"{self.context}: {flow}\n  predicted:  {predicted}\n"
                  f"  the kernel: {result.measured_path or '(not measured) ' + str(result.failure)}")
        assert result.failure is None and result.measured_path == predicted, report
        ending = prediction.walk.ending.kind
        if ending == "died":
            ending = prediction.walk.legs[-1].end.kind  # refused, DROP, REJECT, unreachable
        self.tally[f"identical ({ending}, {flow.transport})"] += 1


def _examples(profile: str) -> int:
    """This profile's share of the flows its kind is given."""
    total, kind = (NATIVE_FLOWS, NATIVE) if profile in NATIVE else (FLOWS, PROFILES)
    return max(1, -(-total // len(kind)))


@pytest.mark.parametrize("sidecar_pod", PROFILES + NATIVE, indirect=True)
def test_the_kernel_takes_the_path_predict_writes(sidecar_pod, traced_request) -> None:
    profile = sidecar_pod.profile
    predictor = Predictor.of(ruleset.profile(profile))
    differ = Differential(traced_request, f"seed {SEED}, {profile}")

    @seed(SEED ^ zlib.crc32(profile.encode()))  # each profile its own flows, all from the one seed
    @settings(max_examples=_examples(profile), deadline=None, database=None,
              suppress_health_check=list(HealthCheck), phases=NO_SHRINKING)
    @given(flow=flows(dual_stack=profiles.dual_stack(profile)))
    def check(flow: Flow) -> None:
        differ(predictor, flow)

    started = time.monotonic()
    check()
    print(f"\npredict vs the kernel, {profile}, seed {SEED}: {dict(differ.tally)} "
          f"in {time.monotonic() - started:.1f}s" + "".join(f"\n  slow: {line}" for line in differ.slow))


def _fire_in_a_lab(rules: ruleset.RuleSet, predictor: Predictor, context: str, draw, dual_stack: bool) -> Counter:
    """Generated flows in a lab of the rules' own; the tally (a lab that could not come up is
    one predict saw coming: Prometheus's scrape loops or dies)."""
    try:
        session = api.Session(rules).open()
    except LabError as e:
        assert str(e).startswith(("prometheus not ready", "prometheus: first scrape")) and _scrapes_fail(predictor), \
            f"{context}: the lab did not come up: {e}"
        return Counter({"the lab could not come up: predict sees Prometheus's scrape loop, die or be closed": 1})
    try:
        differ = Differential(session.request, context)
        for _ in range(RULE_SET_FLOWS):
            differ(predictor, draw(flows(dual_stack=dual_stack)))
    finally:
        session.close()
    return differ.tally + Counter({"rule sets": 1})


def _scrapes_fail(predictor: Predictor) -> bool:
    """The lab comes up only once Prometheus's first scrape of Envoy's 15090 and the agent's 15020
    has an HTTP answer: under rules that loop, drop or close those scrapes it cannot."""
    scrapes = [predictor.predict(Flow("prometheus", plan.PODS["sidecar"], port, 65534, 65534))
               for port in (plan.Port.STATS, plan.Port.AGENT)]
    return any(p.walk.ending.kind in ("loop", "died", "closed") for p in scrapes)


def test_generated_rule_sets_take_the_paths_predict_writes(tmp_path: Path) -> None:
    tally, started = Counter(), time.monotonic()

    @seed(SEED)
    @settings(max_examples=RULE_SETS, deadline=None, database=None, suppress_health_check=list(HealthCheck),
              phases=NO_SHRINKING)
    @given(chosen=options(single_owner=True), edit=edited(), data=st.data())
    def check(chosen: tuple[str, builder.Options], edit, data) -> None:
        version, opts = chosen
        text, what = edit(builder.build(version, opts, 4).text())
        file = tmp_path / "pod.rules"
        file.write_text(text)
        context = f"seed {SEED}, Istio {version} {opts.command()}{what}"
        try:
            rules = ruleset.from_file(str(file), scenarios=False)
        except LabError as e:  # any valid dump is a fair question about a flow
            pytest.fail(f"{context}: --rules refused it: {e}")
        tally.update(_fire_in_a_lab(rules, Predictor.of(rules), context, data.draw, dual_stack=False))

    check()
    print(f"\npredict vs the kernel, generated rule sets, seed {SEED}: {dict(tally)} "
          f"in {time.monotonic() - started:.1f}s")


def test_generated_native_rule_sets_take_the_paths_predict_writes(tmp_path: Path) -> None:
    """Istio's native nftables rules from generated options, as a pod's `nft list ruleset` is
    given (--rules), on nf_tables whatever the run's backend."""
    tally, started = Counter(), time.monotonic()

    @seed(SEED ^ zlib.crc32(b"native"))
    @settings(max_examples=NATIVE_RULE_SETS, deadline=None, database=None, suppress_health_check=list(HealthCheck),
              phases=NO_SHRINKING)
    @given(chosen=nft_options(), edit=nft_edited(), data=st.data())
    def check(chosen, edit, data) -> None:
        version, opts = chosen
        try:
            text, what = edit(nft_text(version, opts))
        except BuildError:  # options Istio's own transaction would fail on
            tally["not built: Istio's transaction would fail"] += 1
            return
        file = tmp_path / "pod.nft"
        file.write_text(text)
        context = f"seed {SEED}, Istio {version} {opts.command()}{what}"
        try:
            rules = ruleset.from_file(str(file), scenarios=False)
        except LabError as e:
            pytest.fail(f"{context}: --rules refused it: {e}")
        tally.update(_fire_in_a_lab(rules, Predictor.of(rules), context, data.draw, dual_stack=rules.dual_stack))

    check()
    print(f"\npredict vs the kernel, generated native rule sets, seed {SEED}: {dict(tally)} "
          f"in {time.monotonic() - started:.1f}s")


def test_an_iptables_nft_save_reads_back_as_the_rules_written() -> None:
    """What iptables-nft wrote into a pod, read back with iptables-nft-save (its header, its
    warning about legacy tables, counters), parses as the rules written: predict, given a pod's
    iptables-nft-save, is given the rules the kernel runs."""
    for profile in PROFILES:
        written = ruleset.profile(profile)
        with api.Session(written, "nft") as session:
            ns = session.lab.pod("sidecar").ns
            saved = [save.parse(in_pod(ns, iptables_nft.TOOLS[d.family][1]), family=d.family) for d in written.dumps]
        assert [d.lines() for d in saved] == [d.lines() for d in written.dumps], profile


def test_a_few_fixed_endings_over_both_families() -> None:
    """The endings, one of each, as a quick check that is not left to the generator."""
    text = profiles.dumps("istio-1.25-ipv6")
    with api.Session(ruleset.profile("istio-1.25-ipv6")) as session:
        differ = Differential(session.request, "fixed")
        predictor = Predictor(text)
        for address in ("10.96.0.90", "fd00:10:96::90", "10.244.0.20"):
            for port, uid in ((9080, 1000), (9080, 1337), (15008, 1000), (15001, 0), (22, 1337)):
                differ(predictor, Flow("sidecar", address, port, uid, uid))
        differ(predictor, Flow("sidecar", "10.96.0.90", 9080, 1000, 1000, transport="udp"))
        differ(predictor, Flow("sidecar", plan.PODS["istiod"], 15012, 1000, 1000, transport="udp"))
    assert sum(n for k, n in differ.tally.items() if k.startswith("identical")) >= 16, differ.tally


# --- the kernel facts predict's reading rests on ------------------------------------------------

def _in_scratch(script: str, then=lambda: None):
    """`nft -f` the script in a fresh namespace that vanishes afterwards (never the host's), then
    `then()` there: (nft's exit status and errors, what `then` gave)."""
    host = netns.inode("/proc/thread-self/ns/net")
    with netns.scratch():
        assert netns.inode("/proc/thread-self/ns/net") != host
        subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
        done = subprocess.run(["nft", "-f", "-"], input=script, capture_output=True, text=True)
        return (done.returncode, done.stderr), then()


def test_nft_refuses_to_load_what_predict_refuses_as_it_reads_and_loads_the_rest() -> None:
    for text, problem in LOAD_ERRORS:
        (code, _), _ = _in_scratch(text)
        assert code != 0, (text, problem)
    for text in LOADS:
        (code, err), _ = _in_scratch(text)
        assert code == 0, (text, err)


def _connections() -> int:
    """Send one UDP datagram over lo, and count the namespace's conntrack entries."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.sendto(b"x", ("127.0.0.1", 9))
    with Conntrack() as ct:
        return len(list(ct.dump()))


def test_an_nft_nat_chain_alone_does_not_track_connections() -> None:
    """A nat base chain registers the nat core, not conntrack (nf_ct_netns_get): with only such a
    chain nothing is tracked, and predict walks no nat (hooks.Hooks.tracks_connections); a `ct`
    expression turns tracking on."""
    chain = "table ip t {\n chain o {\n  type %s hook output priority %d; policy accept;\n  %s\n }\n}\n"
    loaded, tracked = _in_scratch(chain % ("nat", -100, "return"), _connections)
    assert loaded == (0, "") and tracked == 0
    loaded, tracked = _in_scratch(chain % ("filter", 0, "ct state new counter"), _connections)
    assert loaded == (0, "") and tracked == 1
