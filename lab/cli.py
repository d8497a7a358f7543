"""istio-lab: build a lab, fire the article's traffic, and report what the kernel did."""

from __future__ import annotations

import argparse
import signal
import sys

EXIT_FAIL = 1  # a measured path differs from its expectation
EXIT_USAGE = 2  # bad input or an unusable machine


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="istio-lab",
        description="Reproduce Istio's sidecar traffic interception on this kernel and show, "
        "packet by packet, which iptables rule each kind of traffic takes.",
    )
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = sub.add_parser("run", help="build a lab, run scenarios, report the measured paths")
    run.add_argument("ids", nargs="*", metavar="ID", help="scenario ids (default: all)")
    run.add_argument("--json", action="store_true", help="print one JSON document instead of the report")
    lst = sub.add_parser("list", help="list the scenarios")
    explain = sub.add_parser("explain", help="print a scenario's explanation and the rules it names")
    explain.add_argument("id", metavar="ID")
    for command in (run, lst, explain):
        command.add_argument("--scenarios", metavar="DIR", default=None,
                             help="directory of scenario files (default: the lab's scenarios/)")

    up = sub.add_parser("up", help="build a lab and leave it running, to explore by hand")
    up.add_argument("--id", dest="labid", help="lab id (default: random)")
    up.add_argument("--hold", action="store_true",
                    help="stay in the foreground and tear the lab down on Ctrl-C or SIGTERM")
    down = sub.add_parser("down", help="remove a lab left up (or every lab with --all)")
    down.add_argument("labid", nargs="?", metavar="LABID")
    down.add_argument("--all", action="store_true", help="remove every lab on this machine")
    rules = sub.add_parser("rules", help="print a lab's rules numbered, with counters")
    rules.add_argument("labid", nargs="?", metavar="LABID", help="(default: the only lab up)")
    sub.add_parser("preflight", help="check that this machine can run the lab")
    return p


def _exit_on_signals() -> None:
    """SIGINT, SIGTERM and SIGHUP unwind, so every `with Lab()` tears down.

    SIGINT is set explicitly: a shell starts background commands with it
    ignored, and Python then leaves it ignored.
    """

    def raise_interrupt(signum, frame):
        raise KeyboardInterrupt

    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, raise_interrupt)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    _exit_on_signals()
    from . import commands, preflight
    from .errors import LabError

    try:
        return commands.dispatch(args)
    except preflight.PreflightError as e:
        for line in e.problems:
            print(f"istio-lab: {line}", file=sys.stderr)
        return EXIT_USAGE
    except LabError as e:
        print(f"istio-lab: {e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("istio-lab: interrupted; the lab was torn down", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
