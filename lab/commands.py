"""What each `istio-lab` subcommand does: arguments in, text out.  The work is the library's
(lab.api); cli.py only parses and maps errors."""

from __future__ import annotations

import argparse
import contextlib
import ipaddress
import json
import sys
from dataclasses import dataclass

from . import api, attach, attached, plan
from . import backend as backends
from . import html_report, interrupts, matrix, preflight, record, report, runner, scenario, view, watch
from .addr import Address
from .backend import Backend
from .errors import LabError
from .netfilter import LEGACY_PREFIX, PATH_TABLES
from .path import Path
from .predict import Predictor
from .predict import Flow as PredictedFlow
from .rules import annotations, kubeproxy, nftcompare, nftset, profiles, ruleset, xtables
from .rules.ruleset import RuleSet
from .rules.save import Dump
from .scenario import Scenario
from .world import Lab


def dispatch(args: argparse.Namespace) -> int:
    handler = {
        "run": run,
        "list": list_scenarios,
        "explain": explain,
        "up": up,
        "down": down,
        "rules": rules,
        "preflight": check,
        "trace": trace,
        "profiles": list_profiles,
        "probe": probe,
        "predict": predict_flow,
    }[args.command]
    return handler(args)


def _console():
    from rich.console import Console

    return Console(highlight=False, soft_wrap=True)


# How to read a pod's rules by hand, per backend (`up` prints it).
LISTING = {backends.LEGACY: "iptables-legacy -t nat -L -n -v --line-numbers",
           backends.NFT: "iptables-nft -t nat -L -n -v --line-numbers   (or: nft list ruleset)"}
NFT_LISTING = "nft -a list ruleset   (Istio's native tables: inet istio-proxy-nat, -mangle, -raw)"


def _ready_machine(backend: Backend) -> None:
    for labid in api.ready_machine(backend):
        print(f"istio-lab: removed lab {labid} left behind by a process that died", file=sys.stderr)
    for where in attached.reap_orphans():
        print(f"istio-lab: put back {where}, left marked by a probe that died", file=sys.stderr)


def _annotations(args) -> annotations.PodAnnotations | None:
    """--annotations FILE, read (a bad file is one line)."""
    return annotations.read(args.annotations) if getattr(args, "annotations", None) else None


def _rule_set(args, scenarios: bool = True) -> RuleSet:
    """--profile or --rules (or --annotations on the profile), checked before any lab.
    `scenarios`: the article's scenarios will run under them (a dump must hold Istio's chains);
    one flow's question takes any dump."""
    pod = _annotations(args)
    if pod is not None:
        if getattr(args, "rules", None):
            raise LabError("--annotations builds a profile's rules with a pod's annotations: give --profile, not --rules")
        return ruleset.from_annotations(pod, args.profile or profiles.DEFAULT)
    if not getattr(args, "rules", None):
        _rule_set_flags(args)
        return ruleset.profile(args.profile or profiles.DEFAULT)
    return ruleset.from_file(args.rules, scenarios=scenarios, proxy_uid=args.proxy_uid, proxy_gid=args.proxy_gid,
                             outbound_port=args.outbound_port, inbound_port=args.inbound_port)


def check(args) -> int:
    preflight.check_root()
    chosen, why = backends.choose(args.backend)
    preflight.check(chosen.name)
    pieces = {backends.LEGACY: "legacy xtables, owner, REDIRECT, TRACE, nfnetlink_log",
              backends.NFT: "nf_tables, nftrace in a namespace, owner and REDIRECT through nft_compat, "
                            "Istio's native nftables rules"}
    print(f"istio-lab: this machine can run the lab on the {chosen.name} backend ({why}): root, {pieces[chosen.name]}")
    return 0


def _show_built(console, rules: RuleSet) -> None:
    """What a pod's annotations became: the istio-iptables command, and what the injector ignored."""
    console.print(f"Rules: {rules.name} ({rules.annotations})", markup=False)
    console.print(f"  {rules.command}", markup=False)
    for note in rules.notes:
        console.print(f"  note: {note}", markup=False)


def _chosen(args) -> list[Scenario]:
    everything = scenario.load_all(args.scenarios)  # bad files fail before any lab
    if args.group is None and not args.ids:  # the article's scenarios; the problems are a run of their own
        everything = [s for s in everything if s.group != "problems"]
    return scenario.select(scenario.in_group(everything, args.group), args.ids)


def run(args) -> int:
    names = matrix.asked(args.profile)
    if names is not None:
        return run_matrix(args, names)
    if args.jobs is not None:
        raise LabError("--jobs sets how many labs run side by side under --profile all (or a,b,c)")
    chosen = _chosen(args)
    rules = _rule_set(args)
    choice = runner.Choice(args.profile, rules if args.rules else None, _annotations(args))
    labs, skipped = runner.plan(chosen, choice, named=bool(args.ids))  # scenarios' own rules, checked now
    if not labs:  # a lab that would run nothing: say so instead of passing
        raise LabError(f"none of the scenarios applies to {rules.name}'s rules (name one to run it anyway)")
    backend, _ = backends.choose(args.backend, native=any(lab.rules.native for lab in labs))
    preflight.check_root()
    report_dir = html_report.prepare(args.report) if args.report is not None else None  # made once it will be used
    _ready_machine(backend)
    console = _console()
    status = console.status("building the lab") if not args.json else contextlib.nullcontext()
    with status:
        results, labid = runner.run(labs, chosen, backend, show_rules=rules.name)
    shown = view.run([r.view for r in results], labid, rules.profile, rules.name, rules.notes, backend.name)
    if args.json:
        print(report.to_json(shown))
    else:
        for line in skipped:
            console.print(line, markup=False)
        if rules.annotations or rules.file or rules.name != profiles.DEFAULT:
            _show_rules(console, rules)
        if backend.name != backends.LEGACY:
            console.print(f"Backend: {backend.name} (the rules in nf_tables, traced with nftrace)", markup=False)
        report.render(console, shown)
    if report_dir is not None:
        written = html_report.write(report_dir, shown)
        print(f"istio-lab: report written to {' and '.join(map(str, written))}",
              file=sys.stderr if args.json else sys.stdout)
    return 0 if shown.all_passed else 1


def run_matrix(args, names: list[str]) -> int:
    """`run --profile all` (or a,b,c): every profile's scenarios in one process, labs side by side."""
    if args.jobs is not None and args.jobs < 1:
        raise LabError(f"--jobs {args.jobs}: at least one lab at a time")
    chosen = _chosen(args)
    pod = _annotations(args)
    _rule_set_flags(args)
    preflight.check_root()
    report_dir = html_report.prepare(args.report) if args.report is not None else None  # made once it will be used
    backend, _ = backends.choose(args.backend)  # which profiles can run depends on it
    plan = matrix.plan(chosen, names, backend.name, pod, all_asked=args.profile == matrix.ALL, named=bool(args.ids),
                       asked=args.backend)
    if not plan.labs:
        raise LabError("none of the scenarios applies to any of the profiles' rules"
                       + "".join(f"\n  {line}" for line in plan.left_out))
    for used in matrix.backends_of(plan):
        _ready_machine(used)
    jobs = args.jobs or matrix.default_jobs()
    pool = matrix.start(plan, jobs)  # the labs are being built from here on
    try:
        console = _console()
        status = console.status(f"building {len(plan.labs)} labs, {pool.jobs} side by side") \
            if not args.json else contextlib.nullcontext()
        with status:
            shown = matrix.report(plan, pool, chosen)
        if args.json:
            print(report.matrix_json(shown))
        else:
            report.render_matrix(console, shown)
        if report_dir is not None:
            index, *pages, summary = html_report.write_matrix(report_dir, shown)
            print(f"istio-lab: report written to {index} (the matrix; a page per profile beside it: "
                  f"{len(pages)}) and {summary}", file=sys.stderr if args.json else sys.stdout)
    finally:
        pool.finish()  # the workers remove their labs' namespaces while the report is written
    return 0 if shown.all_passed else 1


def _rule_set_flags(args) -> None:
    """The flags that describe a dump given with --rules, which a profile (or many) needs none of."""
    given = [flag for flag, value in (("--proxy-uid", args.proxy_uid), ("--proxy-gid", args.proxy_gid),
                                      ("--outbound-port", args.outbound_port), ("--inbound-port", args.inbound_port))
             if value is not None]
    if given:  # a profile's rules are known: the flag would be silently ignored
        raise LabError(f"{given[0]} describes a dump given with --rules; a profile needs none")


def explain(args) -> int:
    if args.source or args.to:
        return explain_flow(args)
    if args.id is None:
        raise LabError("explain: name a scenario (istio-lab list), or a flow with --from and --to")
    given = [flag for flag, value in (("--rules", args.rules), ("--udp", args.udp), ("--ipv6", args.ipv6)) if value]
    if given:  # a scenario brings its own traffic and rules: the flag would be silently ignored
        raise LabError(f"explain: {given[0]} goes with a flow of your own (--from and --to), not a scenario")
    s = scenario.select(scenario.load_all(args.scenarios), [args.id])[0]
    written_for = _explained_profile(s)
    profile = profiles.get(args.profile or written_for).name
    rules = runner.rules_for(s, runner.Choice(profile, None, _annotations(args)))
    console = _console()
    console.print(f"{s.id}: {s.title}", style="bold", markup=False)
    for issue in s.issues:
        console.print(f"issue: {issue}", markup=False)
    if rules.annotations:
        _show_built(console, rules)
    if s.pod.describe():
        console.print(f"pod: {s.pod.describe()}", markup=False)
    under = "" if profile == profiles.DEFAULT else f" ({profile})"
    measured = s.expected.path(profile)
    if rules.profile is None:  # a pod's annotations the scenario was not measured with
        console.print(f"kernel: (not measured with these annotations: istio-lab run {s.id} --annotations "
                      f"{args.annotations} measures it; below, the rules of the chains its {profile} path passes)",
                      markup=False)
    else:
        console.print(f"kernel{under}: {measured}", markup=False)
    claim = s.article
    article = f"(no claim) {s.article_note}" if claim is None else claim.path_text or "(a picture only) " + claim.sentence
    console.print(f"article: {article}", markup=False)
    console.print()
    console.print(s.explanation.rstrip(), markup=False)
    if profile != written_for:
        whose = ", the article's rules" if written_for == profiles.DEFAULT else ""
        console.print(f"(The explanation is written for {written_for}{whose}; "
                      f"docs/profiles.md tells what {profile} changes.)", markup=False)
    console.print()
    if rules.native:
        console.print(explain_nft_rules(measured, rules, profile, marks=rules.profile is not None), markup=False, end="")
        return 0
    console.print(explain_rules(measured, rules.dumps[0], profile, rules.command if rules.annotations else "",
                                marks=rules.profile is not None), markup=False, end="")
    return 0


def _explained_profile(s: Scenario) -> str:
    """The rules a scenario's explanation is written for: its own profile, the default, or for
    a scenario about a feature the default lacks (DNS capture), the first profile that has it."""
    if s.profile is not None:
        return s.profile
    if s.feature is None:
        return profiles.DEFAULT
    return next(name for name in profiles.names() if s.feature in ruleset.profile(name).features)


def explain_rules(measured: Path, dump, profile: str = profiles.DEFAULT, built_by: str = "",
                  marks: bool = True) -> str:
    """The rules of every chain the path passes, numbered as applied; '>' marks those that matched
    (none with `marks` off: rules the path was not measured under).  A chain of the node's
    (kube-proxy's) is shown from the node's rules."""
    matched = {(h.table, h.name, h.number, h.backend) for h in measured.chains} if marks else set()
    out = [f"The rules it passes: {built_by or profiles.summary(profile)}", ""]
    for table, chain, where, backend in dict.fromkeys((h.table, h.name, h.where, h.backend) for h in measured.chains):
        if where:
            rules = kubeproxy.dump().tables[table].chain_rules(chain)
            out.append(f"{chain} ({table} table of the node: kube-proxy's Service rules)")
            for num, rule in enumerate(rules, 1):
                mark = ">" if (table, chain, num, backend) in matched else " "
                out.append(f" {mark} {num:>2}  {rule.spec}")
            out.append("")
            continue
        name = table.removeprefix(LEGACY_PREFIX)  # legacy's copy, in a pod both backends wrote
        rules = dump.tables[name].chain_rules(chain) if name in dump.tables else []
        if not rules:  # a policy, another namespace's rule: nothing of this dump to list
            continue
        out.append(f"{chain} ({name} table" + (f", written by iptables-{backend})" if backend else ")"))
        for num, rule in enumerate(rules, 1):
            mark = ">" if (table, chain, num, backend) in matched or len(rules) == 1 and marks else " "
            out.append(f" {mark} {num:>2}  {rule.spec}")
        out.append("")
    return "\n".join(out) + "\n"


def explain_nft_rules(measured: Path, rules: RuleSet, profile: str, marks: bool = True) -> str:
    """explain_rules for native nftables rules: each chain the path passes, numbered as nft
    numbers it, beside the iptables chain it mirrors; then where the two rule sets differ."""
    matched = {(h.table, h.name, h.number) for h in measured.chains} if marks else set()
    nat = next(t.name for t in rules.nft.tables.values() if nftset.role(t) == "nat")
    counterpart = list(rules.counterpart)  # istio-iptables' rules for the same options
    out = [f"The rules it passes: {rules.command or rules.summary}", ""]
    for table, chain, where in dict.fromkeys((h.table, h.name, h.where) for h in measured.chains):
        if where:  # the node's kube-proxy rules are iptables' under every profile
            out.append(explain_rules(Path(tuple(h for h in measured.chains if h.where)), Dump(), profile,
                                     marks=marks).split("\n", 2)[2].rstrip("\n"))
            out.append("")
            continue
        name = nat if table == "nat" else table
        t = next(t for t in rules.nft.tables.values() if t.name == name)
        listed = t.chains[chain].rules
        families = {"inet": "IPv4 and IPv6", "ip": "IPv4", "ip6": "IPv6"}.get(t.family, t.family)
        out.append(f"{chain} (table {t.family} {t.name}: its {nftset.role(t)} table, {families})")
        for num, rule in enumerate(listed, 1):
            mark = ">" if (table, chain, num) in matched or len(listed) == 1 and marks else " "
            out.append(f" {mark} {num:>2}  {rule.text}")
        pair = next(p for p in nftcompare.counterparts(rules.nft) if (p.table, p.chain) == (name, chain))
        for dump in counterpart:
            xt = dump.tables.get(pair.xt_table)
            xt_rules = xt.chain_rules(pair.xt_chain) if xt else []
            tool = "ip6tables" if dump.family == 6 else "iptables"
            out.append(f"   {tool}: {pair.xt_chain} ({pair.xt_table} table)" + ("" if xt_rules else ": no such rules"))
            out += [f"    {num:>2}  {rule.spec}" for num, rule in enumerate(xt_rules, 1)]
        out.append("")
    if counterpart:
        out.append("Where these nft rules differ from the iptables ones (docs/profiles.md says more):")
        out += [f"  - {line}" for line in nftcompare.differences(rules.nft, tuple(counterpart))]
    return "\n".join(out) + "\n"


def list_profiles(args) -> int:
    console = _console()
    for name in profiles.names(native_nftables=None):
        p = profiles.get(name)
        default = "  (default)" if name == profiles.DEFAULT else ""
        backend = "nft" if p.native_nftables else "any"
        console.print(f"{name:<22} {p.versions:<12} {backend:<4} {p.summary}{default}", markup=False, highlight=False)
    return 0


def list_scenarios(args) -> int:
    console = _console()
    found = scenario.in_group(scenario.load_all(args.scenarios), args.group)
    for group, heading in scenario.GROUPS.items():
        members = sorted((s for s in found if s.group == group),  # a variant right after what it varies
                         key=lambda s: (s.variant_of or s.id, s.variant_of is not None, s.id))
        if not members:
            continue
        console.print(f"{heading}  (istio-lab run --group {group})", style="bold", markup=False, highlight=False)
        for s in members:
            variant = f"  (variant of {s.variant_of})" if s.variant_of else ""
            kind = f"type {s.type}" if s.type is not None else "      "  # the article's types; DNS is none of them
            issue = f"  [{', '.join(s.issues)}]" if s.issues else ""
            console.print(f"  {s.id:<40} {kind}  {s.title}{variant}{issue}", markup=False, highlight=False)
    return 0


def up(args) -> int:
    pod = _annotations(args)
    rules = ruleset.from_annotations(pod, args.profile or profiles.DEFAULT) if pod else \
        ruleset.profile(args.profile or profiles.DEFAULT)
    backend, _ = backends.choose(args.backend, native=rules.native)
    preflight.check_root()
    _ready_machine(backend)
    lab = Lab(args.labid, detached=not args.hold, ipv6=rules.dual_stack, backend=backend.name)
    try:
        lab.create()
        api.bring_up(lab, rules, backend)
        console = _console()
        if rules.annotations:
            _show_built(console, rules)
        _show(console, lab)
        if args.hold:
            console.print(f"Lab [bold]{lab.labid}[/] is up; Ctrl-C tears it down.")
            interrupts.wait()
    except BaseException:
        lab.destroy()
        raise
    console.print(f"\nLab [bold]{lab.labid}[/] is up. Enter a pod, e.g.:")
    console.print(f"  ip netns exec {lab.pod('sidecar').ns} bash")
    console.print(f"  ip netns exec {lab.pod('sidecar').ns} {NFT_LISTING if rules.native else LISTING[backend.name]}")
    console.print(f"  ip netns exec {lab.pod('sidecar').ns} curl -s http://10.244.0.20:9080/")
    console.print(f"Rules and counters: istio-lab rules {lab.labid}   TRACE events: istio-lab trace {lab.labid}")
    console.print(f"A guided tour: docs/manual-lab.md   Remove it: istio-lab down {lab.labid}")
    return 0


def _labs_up() -> list[str]:
    return sorted(record.known_labids())


def _one_lab(labid: str | None) -> str:
    labs = _labs_up()
    if labid is not None:
        if labid not in labs:
            raise LabError(f"no lab {labid!r} on this machine (labs: {', '.join(labs) or 'none'})")
        return labid
    if len(labs) != 1:
        raise LabError(f"{len(labs)} labs are up ({', '.join(labs) or 'none'}): name one")
    return labs[0]


def down(args) -> int:
    preflight.check_root()
    if args.all and args.labid:
        raise LabError("give a lab id or --all, not both")
    targets = _labs_up() if args.all else [_one_lab(args.labid)]
    for labid in targets:
        record.destroy(labid)
        print(f"istio-lab: removed lab {labid}")
    if args.all and not targets:
        print("istio-lab: no lab to remove")
    return 0


def _lab_backend(labid: str, asked: str | None) -> Backend:
    """The backend a lab's rules went through (its record says); --backend may only agree."""
    lab = record.Record.load(labid)
    name = lab.backend if lab else backends.LEGACY
    if asked not in (None, backends.AUTO, name):
        raise LabError(f"lab {labid} runs on the {name} backend, not {asked}")
    return backends.get(name)


def trace(args) -> int:
    pods = args.pods or ["sidecar"]
    watch.check(pods, args.ports, args.tables, args.count, args.seconds)
    preflight.check_root()
    labid = _one_lab(args.labid)
    watch.watch(labid, _lab_backend(labid, args.backend), pods, args.ports, args.tables, syn=args.syn,
                count=args.count, seconds=args.seconds)
    return 0


def rules(args) -> int:
    preflight.check_root()
    labid = _one_lab(args.labid)
    backend = _lab_backend(labid, args.backend)
    ns = record.ns_name(labid, "sidecar")
    lab = record.Record.load(labid)
    console = _console()
    for family in (4, 6) if lab and lab.ipv6 else (4,):
        tool = {4: "", 6: "ip6tables "}[family]
        for table in PATH_TABLES:
            listing = backend.listing(ns, table, family)
            if not listing and (table != "nat" or family == 6 or backend.name == backends.NFT):
                continue
            policies = xtables.chain_policies(ns, table) if backend.name == backends.LEGACY and family == 4 else {}
            console.print(f"[bold]# {tool}table {table}[/] (pod {ns}, {backend.name})")
            console.print(render_listing(listing, policies), end="", markup=False)
        if backend.name == backends.NFT and family == 4:  # native tables (inet: both families at once)
            for (fam, name), listing in backend.native_listing(ns).items():
                console.print(f"[bold]# nft table {fam} {name}[/] (pod {ns}, nft: its own rules, nft's words)")
                console.print(render_listing(listing, {}, nft=True), end="", markup=False)
    return 0


def render_listing(listing, policies, nft: bool = False) -> str:
    """Chains and numbered rules with counters, laid out like `iptables -L -v --line-numbers`
    (`nft`: rules in nft's words, not iptables-save's `-A CHAIN ...`)."""
    chains: dict[str, list] = {name: [] for name in policies}
    for rule in listing:
        chains.setdefault(rule.ref.chain, []).append(rule)
    out = []
    for chain, rows in chains.items():
        if chain in policies:
            policy, packets, nbytes = policies[chain]
            out.append(f"Chain {chain} (policy {policy} {packets} packets, {nbytes} bytes)")
        else:
            out.append(f"Chain {chain}")
        out.append(f"{'num':<4} {'pkts':>6} {'bytes':>7}  rule")
        for r in rows:
            out.append(f"{r.ref.number:<4} {r.packets:>6} {r.bytes:>7}  {r.line if nft else r.line.split(' ', 2)[2]}")
        out.append("")
    return "\n".join(out) + "\n"


def _show(console, lab: Lab) -> None:
    from rich.table import Table  # rich loads only for output

    table = Table(title=f"lab {lab.labid}")
    for col in ("pod", "namespace", "address"):
        table.add_column(col)
    for row in lab.describe():
        table.add_row(*row)
    console.print(table)


# --- one flow: probe (the kernel) and predict (the rules alone) --------------------------------

EXIT_NOT_MEASURED = 1  # probe: the flow could not be measured


@dataclass(frozen=True)
class Question:
    """One flow asked about on the command line: --from POD[:UID[:GID]] --to HOST:PORT."""

    source: str
    uid: int
    gid: int
    to: Address
    transport: str  # "tcp" | "udp"
    query: str = ""  # a DNS name to ask, for a query to port 53 or pilot-agent's 15053

    def __str__(self) -> str:
        what = f"DNS {self.query} over {self.transport.upper()}" if self.query else self.transport.upper()
        return f"{self.source} (uid {self.uid}, gid {self.gid}) -> {self.to} over {what}"


def _id(text: str, what: str) -> int:
    if not text.isdigit() or int(text) > 0xFFFFFFFE:
        raise LabError(f"--from: {what} {text!r} is not a number (uid and gid are numbers, 0 to 4294967294)")
    return int(text)


def question(args) -> Question:
    """--from, --to, --udp, --ipv6 and --query read into a Question, or one line (LabError)."""
    source, *ids = args.source.split(":")
    if source not in plan.PODS:
        raise LabError(f"--from: no pod {source!r} (pods: {', '.join(plan.PODS)})")
    if len(ids) > 2:
        raise LabError(f"--from {args.source!r}: write POD, POD:UID or POD:UID:GID")
    uid = _id(ids[0], "uid") if ids else plan.APP_UID
    gid = _id(ids[1], "gid") if len(ids) > 1 else uid
    host, sep, port = args.to.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise LabError(f"--to {args.to!r}: write HOST:PORT (a pod name, an IP or a Service VIP; [IPv6]:PORT)")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    family = 6 if args.ipv6 else 4
    if host in plan.PODS:
        address = (plan.PODS6 if family == 6 else plan.PODS)[host]
    elif host == "localhost":
        address = plan.LOCALHOST[family]
    else:
        try:
            parsed = ipaddress.ip_address(host)
        except ValueError:
            raise LabError(f"--to: {host!r} is not a pod ({', '.join(plan.PODS)}), an IP address or localhost") from None
        if args.ipv6 and parsed.version != 6:
            raise LabError(f"--ipv6, but --to names an IPv4 address ({host})")
        address = str(parsed)
    query = getattr(args, "query", None) or ""
    transport = "udp" if args.udp else "tcp"
    return Question(source, uid, gid, Address(address, int(port)), transport, query)


def _flow_rules(args, q: Question) -> RuleSet:
    rules = _rule_set(args, scenarios=False)
    if q.to.family == 6 and not rules.dual_stack:
        raise LabError(f"an IPv6 flow, but {rules.name} has no {'ip6' if rules.native else 'ip6tables'} rules "
                       f"(a dual-stack profile: istio-1.25-ipv6, istio-1.27-nft-ipv6)")
    return rules


def _show_rules(console, rules: RuleSet) -> None:
    if rules.annotations:
        _show_built(console, rules)
    elif rules.file:
        console.print(rules.summary, markup=False)
        for note in rules.notes:
            console.print(f"  note: {note}", markup=False)
    else:
        console.print(f"Rules: {rules.summary}", markup=False)


def explain_flow(args) -> int:
    """explain --from ... --to ...: any flow, through predict: its path, every chain it passes
    with the rules numbered as applied ('>' the one it matched), and why the others did not."""
    if args.id is not None:
        raise LabError("explain: a scenario ID or --from and --to, not both")
    if not (args.source and args.to):
        raise LabError("explain: --from and --to go together")
    args.query, args.proxy_uid, args.proxy_gid, args.outbound_port, args.inbound_port = None, None, None, None, None
    q = question(args)
    rules = _flow_rules(args, q)
    flow = PredictedFlow(q.source, q.to.ip, q.to.port, q.uid, q.gid, transport=q.transport)
    prediction = Predictor.of(rules).predict(flow)
    console = _console()
    console.print(f"{q}", style="bold", markup=False)
    _show_rules(console, rules)
    console.print(f"predict: {prediction.path}   (no lab: istio-lab probe measures it)", markup=False)
    console.print()
    if rules.native:
        console.print(explain_nft_rules(prediction.path, rules, rules.profile or profiles.DEFAULT), markup=False,
                      end="")
    else:
        console.print(explain_rules(prediction.path, rules.dumps[1 if q.to.family == 6 and len(rules.dumps) > 1 else 0],
                                    rules.profile or profiles.DEFAULT, rules.command if rules.annotations else
                                    (rules.summary if rules.file else "")), markup=False, end="")
    report.render_prediction(console, prediction, path=False)
    return 0


def probe(args) -> int:
    """One flow, fired in a lab built for it and measured by the kernel."""
    if args.netns is not None:
        return attach_probe(args)
    q = question(args)
    rules = _flow_rules(args, q)
    preflight.check_root()
    backend, _ = backends.choose(args.backend or backends.AUTO, native=rules.native)
    _ready_machine(backend)
    protocol = "dns" if q.query else "udp" if q.transport == "udp" else "tcp"
    try:
        with api.Session(rules, backend) as session:
            result = session.request(q.source, q.to.ip, q.to.port, uid=q.uid, gid=q.gid, protocol=protocol,
                                     query=q.query, transport=q.transport)
    except api.RulesRefused:
        raise  # bad input: the kernel refused a rule of the dump
    except LabError as e:  # the lab could not come up under these rules, or a process died
        print(f"istio-lab: not measured: {e}", file=sys.stderr)
        return EXIT_NOT_MEASURED
    if args.json:
        print(json.dumps({"lab": session.lab.labid, "profile": rules.profile, "backend": backend.name,
                          **({"rules": rules.name} if rules.name != rules.profile else {}),
                          "flow": str(q), **result.as_json()}, indent=2))
    else:
        console = _console()
        _show_rules(console, rules)
        console.print(f"Flow: {q}", markup=False)
        report.render_flow(console, result.view, backend.name)
    return 0 if result.failure is None else EXIT_NOT_MEASURED


def predict_flow(args) -> int:
    """One flow, predicted from the rules alone: no root, no namespaces, no kernel."""
    q = question(args)
    rules = _flow_rules(args, q)
    flow = PredictedFlow(q.source, q.to.ip, q.to.port, q.uid, q.gid, transport=q.transport, query=q.query or None)
    prediction = Predictor.of(rules).predict(flow)
    if args.json:
        print(json.dumps({"profile": rules.profile, **({"rules": rules.name} if rules.name != rules.profile else {}),
                          "flow": str(q), **report.prediction_json(prediction)}, indent=2))
        return 0
    console = _console()
    _show_rules(console, rules)
    console.print(f"Flow: {q}", markup=False)
    report.render_prediction(console, prediction)
    return 0


def _attach_question(args) -> tuple[int, int, Address]:
    """--from [NAME:]UID[:GID] and --to IP:PORT, as attach mode reads them (a pod of your own
    has no lab names: NAME is only a label, the address is an address)."""
    parts = args.source.split(":")
    if parts and not parts[0].isdigit():
        parts = parts[1:]
    if not parts or len(parts) > 2:
        raise LabError(f"--from {args.source!r}: with --netns write UID, UID:GID or NAME:UID[:GID]")
    uid = _id(parts[0], "uid")
    gid = _id(parts[1], "gid") if len(parts) > 1 else uid
    host, sep, port = args.to.rpartition(":")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        raise LabError(f"--to {args.to!r}: with --netns write IP:PORT ([IPv6]:PORT): the pod's own addresses, "
                       "not the lab's names") from None
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise LabError(f"--to {args.to!r}: write IP:PORT")
    if args.ipv6 and ip.version != 6:
        raise LabError(f"--ipv6, but --to names an IPv4 address ({ip})")
    return uid, gid, Address(str(ip), int(port))


def attach_probe(args) -> int:
    """probe --netns PATH: one flow traced in a namespace the lab does not own, left as it was."""
    given = [flag for flag, value in (("--profile", args.profile), ("--rules", args.rules),
                                      ("--annotations", args.annotations), ("--query", args.query),
                                      ("--backend", args.backend), ("--proxy-uid", args.proxy_uid),
                                      ("--proxy-gid", args.proxy_gid), ("--outbound-port", args.outbound_port),
                                      ("--inbound-port", args.inbound_port)) if value not in (None, False, "")]
    if given:
        raise LabError(f"--netns measures the pod's own rules as they are: {given[0]} does not apply")
    uid, gid, to = _attach_question(args)
    preflight.check_root()
    for where in attached.reap_orphans():
        print(f"istio-lab: put back {where}, left marked by a probe that died", file=sys.stderr)
    transport = "udp" if args.udp else "tcp"
    found = attach.probe(args.netns, uid, gid, to, transport)
    flow = f"{args.netns} (uid {uid}, gid {gid}) -> {to} over {transport.upper()}"
    if args.json:
        print(json.dumps({"netns": found.netns, "flow": flow, "tables": list(found.backends),
                          "measured_path": str(found.path), "ending": found.ending,
                          "hops": [report.hop_json(h) for h in found.path.hops],
                          "counters": {str(r): moved for r, moved, _, _ in found.rows if moved},
                          "trace_rule_events": {str(r): seen for r, _, seen, _ in found.rows if seen},
                          "counters_cover_trace": found.counters_cover_trace, "listener": found.listener or None,
                          **({"client_error": found.error} if found.error else {})}, indent=2))
    else:
        console = _console()
        console.print(f"Attached to {found.netns} (its {' and '.join(found.backends) or 'no'} tables; traced for "
                      f"this probe only, then put back as they were)", markup=False)
        console.print(f"Flow: {flow}", markup=False)
        report.render_attached(console, found.path, found.rows, found.counters_cover_trace, found.ending,
                               found.listener, found.error)
    return 0 if found.path.hops else EXIT_NOT_MEASURED
