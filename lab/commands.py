"""What each `istio-lab` subcommand does: arguments in, text out.  The work is the library's
(lab.api); cli.py only parses and maps errors."""

from __future__ import annotations

import argparse
import contextlib
import sys

from . import api
from . import backend as backends
from . import html_report, interrupts, matrix, preflight, record, report, runner, scenario, view, watch
from .backend import Backend
from .errors import LabError
from .netfilter import PATH_TABLES
from .path import Path
from .rules import annotations, kubeproxy, profiles, ruleset, xtables
from .rules.ruleset import RuleSet
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
    }[args.command]
    return handler(args)


def _console():
    from rich.console import Console

    return Console(highlight=False, soft_wrap=True)


# How to read a pod's rules by hand, per backend (`up` prints it).
LISTING = {backends.LEGACY: "iptables-legacy -t nat -L -n -v --line-numbers",
           backends.NFT: "iptables-nft -t nat -L -n -v --line-numbers   (or: nft list ruleset)"}


def _ready_machine(backend: Backend) -> None:
    for labid in api.ready_machine(backend):
        print(f"istio-lab: removed lab {labid} left behind by a process that died", file=sys.stderr)


def _annotations(args) -> annotations.PodAnnotations | None:
    """--annotations FILE, read (a bad file is one line)."""
    return annotations.read(args.annotations) if getattr(args, "annotations", None) else None


def _rule_set(args) -> RuleSet:
    """--profile or --rules (or --annotations on the profile), checked before any lab."""
    pod = _annotations(args)
    if pod is not None:
        if getattr(args, "rules", None):
            raise LabError("--annotations builds a profile's rules with a pod's annotations: give --profile, not --rules")
        return ruleset.from_annotations(pod, args.profile or profiles.DEFAULT)
    if not getattr(args, "rules", None):
        given = [flag for flag, value in (("--proxy-uid", args.proxy_uid), ("--proxy-gid", args.proxy_gid),
                                          ("--outbound-port", args.outbound_port), ("--inbound-port", args.inbound_port))
                 if value is not None]
        if given:  # a profile's rules are known: the flag would be silently ignored
            raise LabError(f"{given[0]} describes a dump given with --rules; a profile needs none")
        return ruleset.profile(args.profile or profiles.DEFAULT)
    return ruleset.from_file(args.rules, proxy_uid=args.proxy_uid, proxy_gid=args.proxy_gid,
                             outbound_port=args.outbound_port, inbound_port=args.inbound_port)


def check(args) -> int:
    preflight.check_root()
    chosen, why = backends.choose(args.backend)
    preflight.check(chosen.name)
    pieces = {backends.LEGACY: "legacy xtables, owner, REDIRECT, TRACE, nfnetlink_log",
              backends.NFT: "nf_tables, nftrace in a namespace, owner and REDIRECT through nft_compat"}
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
    report_dir = html_report.prepare(args.report) if args.report is not None else None
    preflight.check_root()
    backend, _ = backends.choose(args.backend)
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
        if rules.annotations:
            _show_built(console, rules)
        elif rules.file:
            console.print(rules.summary, markup=False)
            for note in rules.notes:
                console.print(f"  {note}", markup=False)
        elif rules.name != profiles.DEFAULT:
            console.print(f"Rules: {rules.summary}", markup=False)
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
    report_dir = html_report.prepare(args.report) if args.report is not None else None
    preflight.check_root()
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
    matched = {(h.table, h.name, h.number) for h in measured.chains} if marks else set()
    out = [f"The rules it passes: {built_by or profiles.summary(profile)}", ""]
    for table, chain, where in dict.fromkeys((h.table, h.name, h.where) for h in measured.chains):
        if where:
            rules = kubeproxy.dump().tables[table].chain_rules(chain)
            out.append(f"{chain} ({table} table of the node: kube-proxy's Service rules)")
            for num, rule in enumerate(rules, 1):
                mark = ">" if (table, chain, num) in matched else " "
                out.append(f" {mark} {num:>2}  {rule.spec}")
            out.append("")
            continue
        rules = dump.tables[table].chain_rules(chain)
        out.append(f"{chain} ({table} table)")
        for num, rule in enumerate(rules, 1):
            mark = ">" if (table, chain, num) in matched or len(rules) == 1 and marks else " "
            out.append(f" {mark} {num:>2}  {rule.spec}")
        out.append("")
    return "\n".join(out) + "\n"


def list_profiles(args) -> int:
    console = _console()
    for name in profiles.names():
        p = profiles.get(name)
        default = "  (default)" if name == profiles.DEFAULT else ""
        console.print(f"{name:<18} {p.versions:<12} {p.summary}{default}", markup=False, highlight=False)
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
    preflight.check_root()
    backend, _ = backends.choose(args.backend)
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
    console.print(f"  ip netns exec {lab.pod('sidecar').ns} {LISTING[backend.name]}")
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
    return backends.BACKENDS[name]


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
            if not listing and (table != "nat" or family == 6):
                continue
            policies = xtables.chain_policies(ns, table) if backend.name == backends.LEGACY and family == 4 else {}
            console.print(f"[bold]# {tool}table {table}[/] (pod {ns}, {backend.name})")
            console.print(render_listing(listing, policies), end="", markup=False)
    return 0


def render_listing(listing, policies) -> str:
    """Chains and numbered rules with counters, laid out like `iptables -L -v --line-numbers`."""
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
            out.append(f"{r.ref.number:<4} {r.packets:>6} {r.bytes:>7}  {r.line.split(' ', 2)[2]}")
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
