"""istio-lab: build a lab, fire the article's traffic, and report what the kernel did."""

from __future__ import annotations

import argparse
import sys

from . import backend, commands, interrupts, preflight
from .errors import LabError
from .predict import CannotPredict

EXIT_FAIL = 1  # a measured path differs from its expectation
EXIT_USAGE = 2  # bad input or an unusable machine
EXIT_CANNOT_PREDICT = 3  # predict, explain: the rules use something predict does not model


class _Parser(argparse.ArgumentParser):
    """Bad arguments get one line, as every bad input does (argparse would print its usage first).
    Subcommands' parsers are made with the parent's class, so they answer the same way."""

    def error(self, message: str):
        self.exit(EXIT_USAGE, f"{self.prog}: {message} (see {self.prog} --help)\n")


def _parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="istio-lab",
        description="Reproduce Istio's sidecar traffic interception on this kernel and show, "
        "packet by packet, which iptables rule each kind of traffic takes.",
    )
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = sub.add_parser("run", help="build a lab, run scenarios, report the measured paths")
    run.add_argument("ids", nargs="*", metavar="ID", help="scenario ids (default: all)")
    run.add_argument("--json", action="store_true", help="print one JSON document instead of the report")
    run.add_argument("--report", metavar="DIR", default=None,
                     help="also write DIR/index.html (a diagram per scenario) and DIR/summary.md")
    rule_set = run.add_mutually_exclusive_group()
    rule_set.add_argument("--profile", metavar="NAME", help="the sidecar's rules: a profile (istio-lab profiles; "
                          "default istio-1.13, the article's); `all`, or names joined by commas, runs every "
                          "scenario under each, labs side by side, and reports scenario x profile")
    rule_set.add_argument("--rules", metavar="FILE", help="the sidecar's rules: an iptables-save dump of a real pod, "
                          "or its nft rules (nft list ruleset output, or an nft -f script; run on the nft backend)")
    run.add_argument("--jobs", type=int, metavar="N", default=None,
                     help="with --profile all or a,b,c: at most N labs side by side (default: 2, or 1 on one CPU; "
                     "each lab's processes hold ~55 MB while it runs)")
    run.add_argument("--group", metavar="NAME", help="only the scenarios of a group (istio-lab list shows them), "
                     "e.g. problems")
    for flag, what in (("--proxy-uid", "uid"), ("--proxy-gid", "gid"), ("--outbound-port", "outbound port"),
                       ("--inbound-port", "inbound port")):
        run.add_argument(flag, type=int, metavar="N", help=f"with --rules: the proxy's {what} in the dump "
                         "(default: read from the dump)")
    lst = sub.add_parser("list", help="list the scenarios, by group")
    lst.add_argument("--group", metavar="NAME", help="only one group's")
    explain = sub.add_parser("explain", help="print a scenario's explanation and the rules it names")
    explain.add_argument("id", metavar="ID", nargs="?", help="a scenario (or --from and --to: a flow of your own)")
    explain.add_argument("--profile", metavar="NAME", help="the path under a profile's rules (default: the rules the explanation is written for, istio-1.13 or for DNS istio-1.25-dns)")
    for command in (run, lst, explain):
        command.add_argument("--scenarios", metavar="DIR", default=None,
                             help="directory of scenario files (default: the lab's scenarios/)")

    up = sub.add_parser("up", help="build a lab and leave it running, to explore by hand")
    up.add_argument("--id", dest="labid", help="lab id (default: random)")
    up.add_argument("--profile", metavar="NAME", help="the sidecar's rules: a profile (default istio-1.13)")
    annotated = "a pod's interception annotations (a pod or workload manifest, or KEY=VALUE lines) " \
                "on top of the profile's options, as Istio's injector hands them to istio-init"
    for command in (run, explain, up):
        command.add_argument("--annotations", metavar="FILE", help=annotated)
    up.add_argument("--hold", action="store_true",
                    help="stay in the foreground and tear the lab down on Ctrl-C or SIGTERM")
    down = sub.add_parser("down", help="remove a lab left up (or every lab with --all)")
    down.add_argument("labid", nargs="?", metavar="LABID")
    down.add_argument("--all", action="store_true", help="remove every lab on this machine")
    rules = sub.add_parser("rules", help="print a lab's rules numbered, with counters")
    rules.add_argument("labid", nargs="?", metavar="LABID", help="(default: the only lab up)")
    trace = sub.add_parser("trace", help="print a lab's TRACE events as they happen, until Ctrl-C")
    trace.add_argument("labid", nargs="?", metavar="LABID", help="(default: the only lab up)")
    trace.add_argument("--pod", action="append", dest="pods", metavar="POD",
                       help="a pod to watch; repeat for more (default: sidecar)")
    trace.add_argument("--port", action="append", dest="ports", type=int, default=[], metavar="PORT",
                       help="only TCP packets from or to this port; repeat for more (default: all TCP)")
    trace.add_argument("--table", action="append", dest="tables", default=[], metavar="TABLE",
                       help="only events of this table, e.g. nat; repeat for more (default: all)")
    trace.add_argument("--syn", action="store_true",
                       help="only connection-opening SYNs: the packets the nat table judges")
    stop = trace.add_mutually_exclusive_group()
    stop.add_argument("--count", type=int, metavar="N", help="stop after N events")
    stop.add_argument("--seconds", type=float, metavar="S", help="stop after S seconds")
    machine = sub.add_parser("preflight", help="check that this machine can run the lab (on the chosen backend)")
    for command in (run, up, rules, trace, machine):
        command.add_argument("--backend", choices=backend.CHOICES, default=None if command in (rules, trace) else
                             backend.AUTO, help="the netfilter backend: legacy xtables, nf_tables (iptables-nft "
                             "and nftrace), or auto: legacy where the kernel has it, else nft (default: "
                             + ("the lab's own)" if command in (rules, trace) else "auto)"))
    sub.add_parser("profiles", help="list the rule profiles: Istio versions and what sets them apart")

    probe = sub.add_parser("probe", help="one flow of your own, measured by the kernel in a lab built for it "
                           "(or, with --netns, in a pod of your own)")
    predict = sub.add_parser("predict", help="one flow of your own, predicted from the rules alone "
                             "(no root, no namespaces)")
    for command in (probe, predict):
        _flow_arguments(command)
    probe.add_argument("--backend", choices=backend.CHOICES, default=None,
                       help="the netfilter backend of the lab (default: auto)")
    probe.add_argument("--netns", metavar="PATH", help="attach mode: send the flow from this network namespace "
                       "(/proc/PID/ns/net, /run/netns/NAME) as the --from uid, tracing it there for the probe only "
                       "(its rules are left as they were); --from names the uid, --to any address")
    explain.add_argument("--from", dest="source", metavar="POD[:UID[:GID]]",
                         help="explain a flow of your own instead of a scenario (with --to): predict's path, the "
                         "rules it passes and why the others did not match")
    explain.add_argument("--to", metavar="HOST:PORT", help="with --from: where the flow goes")
    explain.add_argument("--udp", action="store_true", help="with --from: a UDP datagram")
    explain.add_argument("--ipv6", action="store_true", help="with --from: over IPv6")
    explain.add_argument("--rules", metavar="FILE", help="with --from: a pod's own rules, an iptables-save dump or "
                         "its nft rules (nft list ruleset output, or an nft -f script)")
    return p


def _flow_arguments(command: argparse.ArgumentParser) -> None:
    """The arguments of one flow's question, the same for probe and predict."""
    rules = command.add_mutually_exclusive_group()
    rules.add_argument("--profile", metavar="NAME", help="the sidecar's rules: a profile (default istio-1.13)")
    rules.add_argument("--rules", metavar="FILE", help="the sidecar's rules: an iptables-save dump of a real pod "
                       "(any: an uninjected pod's too), or its nft rules (nft list ruleset output, or an nft -f script)")
    command.add_argument("--annotations", metavar="FILE", help="a pod's interception annotations on the "
                         "profile's options, as Istio's injector hands them to istio-init")
    command.add_argument("--from", dest="source", required=True, metavar="POD[:UID[:GID]]",
                         help="the pod the flow starts in, and the uid and gid of its socket (default 1000, "
                         "the gid the uid), e.g. sidecar:1337")
    command.add_argument("--to", required=True, metavar="HOST:PORT",
                         help="where it goes: a pod name, an IP address (a Service VIP too) or localhost, and a port")
    command.add_argument("--udp", action="store_true", help="one UDP datagram instead of a TCP connection")
    command.add_argument("--ipv6", action="store_true", help="over IPv6: a pod name is its IPv6 address "
                         "(the rules must be dual-stack, e.g. istio-1.25-ipv6)")
    command.add_argument("--query", metavar="NAME", help="a DNS query for NAME (to port 53, or pilot-agent's 15053)")
    command.add_argument("--json", action="store_true", help="one JSON document")
    for flag, what in (("--proxy-uid", "uid"), ("--proxy-gid", "gid"), ("--outbound-port", "outbound port"),
                       ("--inbound-port", "inbound port")):
        command.add_argument(flag, type=int, metavar="N", help=f"with --rules: the proxy's {what} in the dump "
                             "(default: read from the dump)")


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    interrupts.install()  # SIGINT, SIGTERM, SIGHUP: KeyboardInterrupt, so every `with Lab()` tears down
    try:
        code = commands.dispatch(args)
        interrupts.check()  # one a destructor dropped: the command finished, but it was asked to stop
        return code
    except preflight.PreflightError as e:
        for line in e.problems:
            print(f"istio-lab: {line}", file=sys.stderr)
        return EXIT_USAGE
    except LabError as e:
        print(f"istio-lab: {e}", file=sys.stderr)
        return EXIT_USAGE
    except CannotPredict as e:  # wherever it was found: walking the flow, or saying why rules missed
        print(f"istio-lab: {e}", file=sys.stderr)
        return EXIT_CANNOT_PREDICT
    except KeyboardInterrupt:
        print("istio-lab: interrupted; the lab was torn down", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
