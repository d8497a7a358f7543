"""Pod annotations -> istio-iptables' options -> rules, against Istio's own expected results.

Two kinds of facts from istio/istio are held here as data:
- the injector's: a pod's annotations and the istio-init arguments Istio's injection tests
  expect for them (pkg/kube/inject/testdata/inject/*.yaml{,.injected}, Istio 1.30.0);
- istio-iptables': the rule sets of its capture tests (tools/istio-iptables/pkg/capture/
  testdata/*.golden), recorded in the lab's own form in tests/data/istio-goldens/
  istio-iptables.yaml (see the README there), each with the options its test table
  (run_test.go) sets, written here as the pod annotations that make the injector pass the
  same options.
"""

import subprocess

import pytest

from lab import netns
from lab.rules import annotations as a
from lab.rules import builder, profiles, xtables

from . import istio_record

T = a.TRAFFIC

# --- istio-iptables' capture goldens ---------------------------------------------------------

# The Istio releases whose goldens are byte-for-byte the era's copy (checked at each tag).
ERAS = {
    "1.12": ["1.12", "1.13", "1.14", "1.15", "1.16", "1.17"],
    "1.18": ["1.18", "1.19", "1.20", "1.21"],
    "1.22": ["1.22"],
    "1.23": ["1.23"],
    "1.24": ["1.24"],
    "1.25": ["1.25", "1.26", "1.27", "1.28", "1.29", "1.30"],
}
NO_CAPTURE = f"{T}includeInboundPorts=\n{T}includeOutboundIPRanges=\n"  # the test table's base: -b "" -i ""
# golden -> (the pod's annotations, IPv6 pod, first version the annotations can say it)
GOLDENS = {
    "empty": (NO_CAPTURE, False, "1.12"),
    "ipnets": (f"{T}includeInboundPorts=\n{T}includeOutboundIPRanges=10.0.0.0/8", False, "1.12"),
    "inbound-ports-include": (f"{T}includeInboundPorts=32000,31000\n{T}includeOutboundIPRanges=", False, "1.12"),
    "outbound-ports-include": (NO_CAPTURE + f"{T}includeOutboundPorts=32000,31000", False, "1.12"),
    "kube-virt-interfaces": (f"{T}includeInboundPorts=\n{T}kubevirtInterfaces=eth1,eth2\n"
                             f"{T}includeOutboundIPRanges=*", False, "1.12"),
    "ipnets-with-kube-virt-interfaces": (f"{T}includeInboundPorts=\n{T}kubevirtInterfaces=eth1,eth2\n"
                                         f"{T}includeOutboundIPRanges=10.0.0.0/8", False, "1.12"),
    "basic-exclude-nic": (NO_CAPTURE + f"{T}excludeInterfaces=not-istio-nic", False, "1.15"),
    "inbound-ports-tproxy": (f"{T}includeInboundPorts=32000,31000\n{T}includeOutboundIPRanges=\n"
                             "sidecar.istio.io/interceptionMode=TPROXY", False, "1.25"),
    "ipv6-empty-inbound-ports": (NO_CAPTURE, True, "1.25"),
    "ipv6-inbound-ports": (f"{T}includeInboundPorts=4000,5000\n{T}includeOutboundIPRanges=", True, "1.25"),
    "ipv6-virt-interfaces": (f"{T}includeInboundPorts=4000,5000\n{T}kubevirtInterfaces=eth0,eth1\n"
                             f"{T}includeOutboundIPRanges=", True, "1.25"),
    # the table's InboundPortsExclude "6000,7000," has a trailing comma the injector would refuse;
    # with a port list for -b it makes no rule either way
    "ipv6-ipnets": (f"{T}includeInboundPorts=4000,5000\n{T}excludeInboundPorts=6000,7000\n"
                    f"{T}kubevirtInterfaces=eth0,eth1\n{T}excludeOutboundIPRanges=2001:db8::/32\n"
                    f"{T}includeOutboundIPRanges=2001:db8::/32", True, "1.25"),
    "ipv6-outbound-ports": (NO_CAPTURE + f"{T}includeOutboundPorts=32000,31000", True, "1.25"),
}
_golden = istio_record.iptables
CASES = [(era, name, version) for era, versions in ERAS.items() for name in GOLDENS for version in versions
         if era in istio_record.iptables_names().get(name, [])
         and builder.parse_version(version) >= builder.parse_version(GOLDENS[name][2])]


def _rules(dump) -> dict[str, tuple[list[str], list[str]]]:
    return {name: (sorted(t.chains), t.lines()) for name, t in dump.tables.items() if t.rules}


def _built(text: str, version: str, ipv6: bool) -> dict[int, object]:
    init = a.inject(a.parse(text, "pod"), version, builder.Options(ipv6=ipv6))
    return {family: builder.build(version, init.options, family) for family in (4, 6)}


def test_every_golden_held_is_tested():
    held = {(era, name) for name, eras in istio_record.iptables_names().items() for era in eras}
    assert {(era, name) for era, name, _ in CASES} == held
    assert {name for _, name in held} == set(GOLDENS)


@pytest.mark.parametrize("era, name, version", CASES)
def test_annotations_give_istios_own_rules(era, name, version):
    text, ipv6, _ = GOLDENS[name]
    golden = _golden(era, name)
    built = _built(text, version, ipv6)
    assert set(golden) == ({4, 6} if ipv6 else {4})
    for family, dump in golden.items():
        assert _rules(built[family]) == _rules(dump), family
    if not ipv6:
        assert not built[6].tables


# --- the injector: Istio's injection tests (pkg/kube/inject/testdata/inject, 1.30.0) -----------

INJECTED = {
    "traffic-annotations": (
        {T + "includeInboundPorts": "1,2,3", T + "excludeInboundPorts": "4,5,6", T + "excludeOutboundPorts": "7,8,9",
         T + "includeOutboundIPRanges": "127.0.0.1/24,10.96.0.1/24",
         T + "excludeOutboundIPRanges": "10.96.0.2/24,10.96.0.3/24"},
        "-i 127.0.0.1/24,10.96.0.1/24 -x 10.96.0.2/24,10.96.0.3/24 -b 1,2,3 -d 15090,15021,4,5,6,15020 -o 7,8,9"),
    "traffic-annotations-empty-includes": (
        {T + "includeInboundPorts": "", T + "excludeInboundPorts": "4,5,6", T + "includeOutboundIPRanges": "",
         T + "excludeOutboundIPRanges": "10.96.0.2/24,10.96.0.3/24"},
        "-i \"\" -x 10.96.0.2/24,10.96.0.3/24 -b \"\" -d 15090,15021,4,5,6,15020"),
    "traffic-annotations-wildcards": (
        {T + "includeInboundPorts": "*", T + "excludeInboundPorts": "4,5,6", T + "includeOutboundIPRanges": "*",
         T + "excludeOutboundIPRanges": "10.96.0.2/24,10.96.0.3/24"},
        "-i '*' -x 10.96.0.2/24,10.96.0.3/24 -b '*' -d 15090,15021,4,5,6,15020"),
    "kubevirtInterfaces_list": (
        {T + "kubevirtInterfaces": "net1,net2"},
        "-i '*' -x \"\" -b '*' -d 15090,15021,15020 -k net1,net2"),
    "reroute-virtual-interfaces_list": (
        {"istio.io/reroute-virtual-interfaces": "net1ps5,net2qr9"},
        "-i '*' -x \"\" -b '*' -d 15090,15021,15020 -k net1ps5,net2qr9"),
    # Istio's test sets the install's statusPort to 123; the pod's status annotation does the same
    "reroute-virtual-interfaces": (
        {"istio.io/reroute-virtual-interfaces": "net0ps2", T + "kubevirtInterfaces": "net1",
         a.STATUS_PORT: "123"},
        "-i '*' -x \"\" -b '*' -d 15090,15021,123 -k net0ps2"),
    "status_annotations": ({a.STATUS_PORT: "123"}, "-i '*' -x \"\" -b '*' -d 15090,15021,123"),
    "status_annotations_zeroport": ({a.STATUS_PORT: "0"}, "-i '*' -x \"\" -b '*' -d 15090,15021"),
}


@pytest.mark.parametrize("name", sorted(INJECTED))
def test_the_injectors_arguments_are_istios(name):
    values, args = INJECTED[name]
    init = a.inject(a.PodAnnotations(name, values), "1.30")
    assert init.options.command() == f"istio-iptables -p 15001 -z 15006 -u 1337 -m REDIRECT {args}"


@pytest.mark.parametrize("key, value, problem", [  # the traffic-annotations-bad-* pods Istio refuses
    (T + "includeOutboundIPRanges", "bad", "'bad' is not a CIDR"),
    (T + "excludeOutboundIPRanges", "*", "'[*]' would exclude every destination"),
    (T + "includeInboundPorts", "bad", "'bad' is not a port"),
    (T + "excludeInboundPorts", "*", "'[*]' is not a port"),
    (T + "excludeOutboundPorts", "bad", "'bad' is not a port"),
])
def test_what_istios_injector_refuses_is_refused(key, value, problem):
    with pytest.raises(a.AnnotationError, match=f"^pod: {key}: {problem}.*injector rejects the pod$"):
        a.inject(a.PodAnnotations("pod", {key: value}), "1.30")


# --- the template, version by version -----------------------------------------------------

@pytest.mark.parametrize("name", profiles.names())
def test_the_template_with_no_annotation_gives_each_profiles_options(name):
    """Every profile is a default install: the template, with the default status port, agrees."""
    p = profiles.get(name)
    assert a.inject(a.PodAnnotations("pod"), p.istio, p.options).options == p.options
    stated = a.inject(a.PodAnnotations("pod", {a.STATUS_PORT: "15020"}), p.istio, p.options)
    assert stated.options == p.options


@pytest.mark.parametrize("version, excluded", [
    ("1.4", (8080, 15020)),  # the status port only
    ("1.5", (15090, 8080, 15020)),  # Envoy's Prometheus port first
    ("1.6", (15090, 15021, 8080, 15020)),  # and the readiness port
    ("1.30", (15090, 15021, 8080, 15020)),
])
def test_excluded_inbound_ports_get_istios_own_ahead_and_the_status_port_after(version, excluded):
    init = a.inject(a.PodAnnotations("pod", {T + "excludeInboundPorts": "8080"}), version)
    assert init.options.inbound_exclude_ports == excluded


def test_the_status_port_is_excluded_once_unless_the_list_differs_by_a_space():
    """The template's excludeInboundPort compares the list's items as written with the trimmed port."""
    def excluded(value: str) -> tuple[int, ...]:
        pod = a.PodAnnotations("pod", {T + "excludeInboundPorts": value, a.STATUS_PORT: " 15020"})
        return a.inject(pod, "1.30").options.inbound_exclude_ports

    assert excluded("15020,8080") == (15090, 15021, 15020, 8080)
    assert excluded("8080, 15020") == (15090, 15021, 8080, 15020, 15020)
    assert excluded(" 8080 ") == (15090, 15021, 8080, 15020)


def test_status_port_0_excludes_only_istios_ports_and_broke_16():
    off = a.PodAnnotations("pod", {a.STATUS_PORT: "0"})
    assert a.inject(off, "1.7").options.inbound_exclude_ports == (15090, 15021)
    assert a.inject(off, "1.4").options.inbound_exclude_ports == ()
    with pytest.raises(a.AnnotationError, match=r"status.sidecar.istio.io/port: Istio 1.6's template writes "
                                                r"-d '15090,15021,' .*istio/istio#24722"):
        a.inject(off, "1.6")
    only_listed = a.PodAnnotations("pod", {a.STATUS_PORT: "0", T + "includeInboundPorts": "8080"})
    assert a.inject(only_listed, "1.6").options.inbound_ports == ("8080",)  # -d is not read then


def test_annotations_a_version_does_not_read_are_ignored_with_a_note():
    pod = a.PodAnnotations("pod", {T + "includeOutboundPorts": "3306", T + "excludeInterfaces": "eth1",
                                   "istio.io/reroute-virtual-interfaces": "net1"})
    old = a.inject(pod, "1.6")
    assert old.options == builder.Options()
    assert old.notes == (
        f"{T}includeOutboundPorts: ignored: Istio 1.6's injection template passes no -q for it (it does from 1.7 on)",
        f"{T}excludeInterfaces: ignored: Istio 1.6's injection template passes no -c for it (it does from 1.15 on)",
        "istio.io/reroute-virtual-interfaces: ignored: Istio 1.6's injection template passes no -k for it "
        "(it does from 1.25 on)")
    new = a.inject(pod, "1.25").options
    assert (new.outbound_ports, new.exclude_interfaces, new.kubevirt_interfaces) == ((3306,), ("eth1",), ("net1",))


def test_reroute_virtual_interfaces_wins_over_kubevirt_interfaces():
    pod = a.PodAnnotations("pod", {T + "kubevirtInterfaces": "net1", "istio.io/reroute-virtual-interfaces": "net2"})
    assert a.inject(pod, "1.24").options.kubevirt_interfaces == ("net1",)
    init = a.inject(pod, "1.25")
    assert init.options.kubevirt_interfaces == ("net2",)
    assert init.notes == (f"{T}kubevirtInterfaces: ignored: istio.io/reroute-virtual-interfaces is set too, and wins",)


def test_an_absent_annotation_leaves_the_profiles_option():
    tproxy = profiles.get("istio-1.25-tproxy")
    assert a.inject(a.PodAnnotations("pod"), "1.25", tproxy.options).options.mode == "TPROXY"
    redirect = a.PodAnnotations("pod", {a.MODE: "REDIRECT"})
    assert a.inject(redirect, "1.25", tproxy.options).options.mode == "REDIRECT"


# --- istio/istio#28106: present but empty is not absent -------------------------------------

def test_an_empty_include_annotation_turns_capture_off_not_back_to_the_default():
    empty = a.parse(f'{T}includeOutboundIPRanges=""\n{T}includeInboundPorts=\n', "pod")
    init = a.inject(empty, "1.13")
    assert init.options.command() == ('istio-iptables -p 15001 -z 15006 -u 1337 -m REDIRECT -i "" -x "" -b "" '
                                      '-d 15090,15021,15020')
    nat = builder.build("1.13", init.options).tables["nat"]
    assert [r.spec for r in nat.chain_rules("ISTIO_OUTPUT")][-1] == "-d 127.0.0.1/32 -j RETURN"  # no ISTIO_REDIRECT
    assert not nat.chain_rules("PREROUTING")  # no ISTIO_INBOUND jump: inbound is not captured
    absent = a.inject(a.parse("", "pod"), "1.13")
    assert absent.options == builder.Options()


def test_empty_exclusions_still_exclude_istios_own_ports():
    init = a.inject(a.PodAnnotations("pod", {T + "excludeInboundPorts": "", T + "excludeOutboundPorts": "",
                                             T + "includeOutboundPorts": ""}), "1.13")
    assert init.options == builder.Options()


# --- reading ------------------------------------------------------------------------------

POD = f"""\
apiVersion: v1
kind: Pod
metadata:
  name: web
  annotations:
    sidecar.istio.io/inject: "true"
    prometheus.io/scrape: "true"
    {T}excludeOutboundPorts: "5432"
    {T}includeInboundPorts: ""
spec:
  containers: [{{name: web, image: web}}]
"""


def test_a_pod_manifest_gives_its_interception_annotations_only():
    pod = a.parse(POD, "web.yaml")
    assert pod.values == {T + "excludeOutboundPorts": "5432", T + "includeInboundPorts": ""}
    assert pod.notes == ()


def test_a_workloads_pod_template_is_what_counts():
    deployment = f"""\
apiVersion: apps/v1
kind: Deployment
metadata:
  name: web
  annotations:
    {T}excludeOutboundPorts: "5432"
spec:
  template:
    metadata:
      annotations:
        {T}excludeOutboundIPRanges: "10.96.0.0/16"
    spec:
      containers: [{{name: web, image: web}}]
"""
    pod = a.parse(deployment, "web.yaml")
    assert pod.values == {T + "excludeOutboundIPRanges": "10.96.0.0/16"}
    assert pod.notes == (f"{T}excludeOutboundPorts: ignored: it is on the Deployment's own metadata; "
                         "Istio reads the pod template's annotations",)
    cronjob = f"""\
kind: CronJob
spec:
  jobTemplate:
    spec:
      template:
        metadata:
          annotations: {{{T}excludeOutboundPorts: "443"}}
"""
    assert a.parse(cronjob, "job.yaml").values == {T + "excludeOutboundPorts": "443"}


def test_a_bare_mapping_and_key_value_lines_read_alike():
    mapping = a.parse(f'{T}excludeOutboundPorts: "5432"\nsidecar.istio.io/interceptionMode: TPROXY\n', "m.yaml")
    lines = a.parse(f"# from kubectl annotate\n{T}excludeOutboundPorts='5432'\n\n"
                    "sidecar.istio.io/interceptionMode=TPROXY\nsidecar.istio.io/proxyCPU=100m\n", "a.txt")
    assert mapping.values == lines.values == {T + "excludeOutboundPorts": "5432", a.MODE: "TPROXY"}
    assert a.parse("", "empty").values == {} == a.parse("# nothing\n", "c").values


def test_read_names_the_file(tmp_path):
    file = tmp_path / "pod.yaml"
    file.write_text(POD)
    assert a.read(str(file)).source == str(file)
    with pytest.raises(a.AnnotationError, match=r"nope.yaml: cannot read: No such file"):
        a.read(str(tmp_path / "nope.yaml"))
    file.write_bytes(b"\xff\xfe")
    with pytest.raises(a.AnnotationError, match="not UTF-8 text"):
        a.read(str(file))


@pytest.mark.parametrize("text, problem", [
    (f"{T}excludeOutboundPort=5432", f"{T}excludeOutboundPort: not an annotation Istio reads, so it would change "
                                     f"nothing \\(did you mean {T}excludeOutboundPorts\\?\\)"),
    ("sidecar.istio.io/interceptionmode=TPROXY", "did you mean sidecar.istio.io/interceptionMode"),
    (f"{T}excludeOutboundPorts: 5432", f"{T}excludeOutboundPorts: 5432 is not a string: Kubernetes keeps "
                                       f"annotation values as strings \\(write \"5432\"\\)"),
    (f"{T}includeInboundPorts:", f'{T}includeInboundPorts: no value \\(write "" for an empty one\\)'),
    (f"{T}includeInboundPorts: *", "line 1: bad YAML: "),
    (f"{T}excludeOutboundPorts=1\n{T}excludeOutboundPorts=2", f":2: {T}excludeOutboundPorts is given twice "
                                                              f"\\(first on line 1\\)"),
    ("- a\n- b", "expected a pod manifest, a mapping of annotations or KEY=VALUE lines"),
    ("kind: List\nitems: []", "a List: give one pod or workload"),
    ("kind: Pod\nmetadata: [x]", "metadata is not a mapping"),
])
def test_what_cannot_be_read_is_one_line(text, problem):
    with pytest.raises(a.AnnotationError, match=problem) as caught:
        a.parse(text, "f")
    assert "\n" not in str(caught.value)


@pytest.mark.parametrize("key, value, version, problem", [
    (a.MODE, "NONE", "1.30", "NONE: Istio adds no istio-init container, so the pod has no rules for the lab to test"),
    (a.MODE, "tproxy", "1.30", "'tproxy' is not REDIRECT, TPROXY or NONE: Istio's injector rejects the pod"),
    (a.MODE, "", "1.30", "'' is not REDIRECT, TPROXY or NONE"),
    (T + "excludeOutboundIPRanges", "10.0.0.0/8, 10.1.0.0/16", "1.30",
     "' 10.1.0.0/16' has a space: Istio splits the list on commas only, and its injector rejects the pod"),
    (T + "includeOutboundIPRanges", "10.0.0.1", "1.30", "'10.0.0.1' is not a CIDR such as 10.0.0.0/8"),
    (T + "includeOutboundIPRanges", "*,10.0.0.0/8", "1.30", "'[*]' is not a CIDR"),
    (T + "excludeInboundPorts", "8080,", "1.30", "'' is not a port"),
    (T + "excludeOutboundPorts", "65536", "1.30", "'65536' is not a port \\(0-65535\\)"),
    (T + "includeInboundPorts", " * ", "1.30", "'[*]' is not a port"),
    (T + "includeOutboundPorts", "*", "1.30", "'[*]' is not a port: Istio's injector lets it through and "
                                              "istio-iptables hands it to iptables as --dport [*]"),
    (a.STATUS_PORT, "", "1.30", "empty: Istio's injector rejects the pod"),
    (T + "kubevirtInterfaces", "a-very-long-interface", "1.30",
     "'a-very-long-interface' is not an interface name: Istio 1.30's injector rejects the pod"),
    (T + "kubevirtInterfaces", "net1, net2", "1.29", "' net2' is not an interface name: istio-iptables would give "
                                                     "it to iptables as is"),
])
def test_what_istio_refuses_or_fails_on_is_one_line_naming_the_key(key, value, version, problem):
    with pytest.raises(a.AnnotationError, match=f"^pod: {key}: {problem}"):
        a.inject(a.PodAnnotations("pod", {key: value}), version)


def test_lists_as_istio_splits_them():
    init = a.inject(a.PodAnnotations("pod", {
        T + "includeInboundPorts": " 080, 9090 ", T + "excludeOutboundPorts": "5432 ,3306",
        T + "includeOutboundPorts": "80,,443,", T + "kubevirtInterfaces": "net1,,net2,",
        T + "excludeOutboundIPRanges": "10.0.0.1/8,fd00::/64"}), "1.29")
    o = init.options
    assert o.inbound_ports == ("80", "9090")  # as the kernel reads --dport 080 back
    assert (o.outbound_exclude_ports, o.outbound_ports) == ((5432, 3306), (80, 443))
    assert o.kubevirt_interfaces == ("net1", "net2")
    assert o.outbound_exclude_cidrs == ("10.0.0.1/8", "fd00::/64")  # passed on as written; iptables masks it
    assert "-d 10.0.0.0/8 -j RETURN" in [r.spec for r in builder.build("1.29", o).tables["nat"].rules]


def test_builder_kubevirt_rules_go_to_the_head_last_listed_first():
    o = builder.Options(kubevirt_interfaces=("vm0", "vm1"), exclude_interfaces=("eth9",))
    prerouting = [r.spec for r in builder.build("1.12", o).tables["nat"].chain_rules("PREROUTING")]
    assert prerouting == ["-i vm1 -j ISTIO_REDIRECT", "-i vm0 -j ISTIO_REDIRECT", "-i vm1 -j RETURN",
                          "-i vm0 -j RETURN", "-i eth9 -j RETURN", "-p tcp -j ISTIO_INBOUND"]
    with pytest.raises(builder.BuildError, match="kubevirt_interfaces: 'a b' is not an interface name"):
        builder.build("1.30", builder.Options(kubevirt_interfaces=("a b",)))


# --- on the kernel ------------------------------------------------------------------------

def _saved(family: int, table: str) -> list[str]:
    tool = "iptables-legacy-save" if family == 4 else "ip6tables-legacy-save"
    out = subprocess.run([tool, "-t", table], capture_output=True, text=True, check=True, timeout=60)
    return [line for line in out.stdout.splitlines() if line.startswith("-A ")]


@pytest.mark.kernel
def test_an_annotation_built_rule_set_reads_back_identical():
    pod = a.parse(f"""\
{T}includeInboundPorts=8080,9090
{T}excludeOutboundPorts=5432
{T}includeOutboundPorts=3306
{T}includeOutboundIPRanges=10.96.0.0/12,fd00:10:96::/112
{T}excludeOutboundIPRanges=10.96.0.10/32
{T}kubevirtInterfaces=vm0,vm1
{T}excludeInterfaces=eth9
""", "pod")
    p = profiles.get("istio-1.25-ipv6")
    init = a.inject(pod, p.istio, p.options)
    dumps = [builder.build(p.istio, init.options, family) for family in (4, 6)]
    with netns.scratch():
        for dump in dumps:
            xtables.apply(None, dump)
        saved = {(d.family, name): _saved(d.family, name) for d in dumps for name in d.tables}
    assert saved == {(d.family, name): t.lines() for d in dumps for name, t in d.tables.items()}
    assert any("-d 10.96.0.0/12 -i vm1 -j ISTIO_REDIRECT" in line for line in saved[(4, "nat")])


@pytest.mark.kernel
@pytest.mark.parametrize("era", ["1.12", "1.18", "1.22", "1.23", "1.24", "1.25"])
def test_the_record_is_what_the_kernel_reads_back(era):
    """Each recorded rule set, restored by iptables-legacy into a fresh namespace, saves back
    line for line: the record is in the form the kernel reads back."""
    for name in sorted(n for n, eras in istio_record.iptables_names().items() if era in eras):
        golden = _golden(era, name)
        with netns.scratch():
            for family, dump in golden.items():
                tool = "iptables-legacy-restore" if family == 4 else "ip6tables-legacy-restore"
                subprocess.run([tool], input=dump.text(), text=True, check=True, capture_output=True, timeout=60)
            saved = {(f, table): _saved(f, table) for f, d in golden.items() for table in d.tables}
        assert saved == {(f, table): t.lines() for f, d in golden.items() for table, t in d.tables.items()}, name
