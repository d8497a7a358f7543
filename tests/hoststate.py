"""A snapshot of everything of the host namespace the lab must never change."""

import glob
import re
import shutil
import subprocess

VOLATILE_SYSCTLS = {"nf_conntrack_count"}
COUNTERS = re.compile(r" \[\d+:\d+\]$")


def _cmd(*argv: str) -> str:
    if shutil.which(argv[0]) is None:
        return f"{argv[0]}: not installed"
    out = subprocess.run(argv, capture_output=True, text=True).stdout
    lines = [l for l in out.splitlines() if not l.startswith("#")]  # save headers carry a timestamp
    return "\n".join(COUNTERS.sub("", l) for l in lines)  # the host's own traffic moves its counters


def _sysctls() -> dict[str, str]:
    values = {}
    for path in sorted(glob.glob("/proc/sys/net/netfilter/*")) + [
        "/proc/sys/net/ipv4/ip_forward",
        "/proc/sys/net/ipv4/conf/all/route_localnet",
        "/proc/sys/net/bridge/bridge-nf-call-iptables",
    ]:
        if path.rsplit("/", 1)[1] in VOLATILE_SYSCTLS:
            continue
        try:
            with open(path) as f:
                values[path] = f.read()
        except OSError:
            pass
    return values


def snapshot() -> dict[str, object]:
    return {
        "links": _cmd("ip", "-o", "link", "show"),
        "addresses": _cmd("ip", "-o", "addr", "show"),
        "routes": _cmd("ip", "route", "show", "table", "all"),
        "rules": _cmd("ip", "rule", "show"),
        "iptables-legacy-save": _cmd("iptables-legacy-save"),
        "iptables-nft-save": _cmd("iptables-nft-save"),
        "ip6tables-nft-save": _cmd("ip6tables-nft-save"),
        "nft list ruleset": _cmd("nft", "list", "ruleset"),
        "sysctls": _sysctls(),
    }
