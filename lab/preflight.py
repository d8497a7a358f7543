"""Check the machine before the lab touches anything.

Each missing piece is one line naming it and what to install or load.  Kernel
features are probed by loading a rule that uses them into a scratch namespace
that vanishes afterwards: /proc lists only what is loaded, while the kernel
would autoload a module on first use.
"""

from __future__ import annotations

import os
import shutil

from . import netns
from .rules import save, xtables
from .rules.nft import probes
from .trace import TraceReader


class PreflightError(RuntimeError):
    def __init__(self, problems: list[str]):
        super().__init__("\n".join(problems))
        self.problems = problems


ROOT_MESSAGE = "needs root for network namespaces and iptables: run it with sudo"

# (what, table, rule using it, remedy)
_FEATURES = (
    ("the owner match (xt_owner)", "nat", "-A OUTPUT -m owner --uid-owner 1337 -j RETURN",
     "load it: modprobe xt_owner (CONFIG_NETFILTER_XT_MATCH_OWNER)"),
    ("the REDIRECT target (xt_REDIRECT)", "nat", "-A OUTPUT -p tcp -j REDIRECT --to-ports 15001",
     "load it: modprobe xt_REDIRECT (CONFIG_NETFILTER_XT_TARGET_REDIRECT)"),
    ("the TRACE target (xt_TRACE)", "raw", "-A OUTPUT -p tcp -j TRACE",
     "load it: modprobe xt_TRACE (CONFIG_NETFILTER_XT_TARGET_TRACE)"),
)


def check_root() -> None:
    if os.geteuid() != 0:
        raise PreflightError([ROOT_MESSAGE])


def check(backend: str = "legacy") -> None:
    """Raise PreflightError listing every piece the backend ("legacy" or "nft") misses;
    return when all are there."""
    check_root()
    if not os.path.isdir("/proc/self/ns") or not os.path.exists("/proc/self/ns/net"):
        raise PreflightError(["no network namespaces: this kernel lacks CONFIG_NET_NS"])
    if backend == "nft":
        _check_nft()
    elif backend.startswith("mixed:"):  # rules written by both: both must be there
        _check_legacy()
        _check_nft()
    else:
        _check_legacy()


def _check_legacy() -> None:
    problems = []
    if shutil.which("iptables-legacy-save") is None:
        problems.append("iptables-legacy-save not found: install Debian's iptables package (apt-get install iptables)")
    try:
        xtables._iptc()
    except Exception as e:  # python-iptables raises several kinds when libiptc is missing
        problems.append(f"python-iptables cannot load libip4tc/libxtables ({e}): install Debian's iptables package")
        raise PreflightError(problems) from None
    problems += _probe_kernel()
    if problems:
        raise PreflightError(problems)


def _check_nft() -> None:
    """The nf_tables backend's pieces: nf_tables, nftrace read in a namespace, the owner
    match and REDIRECT through nft_compat, and Istio's native nftables expressions."""
    problems = [f.line for f in (probes.nf_tables(), probes.nftrace(), probes.owner_through_compat(),
                                  probes.native_rules()) if not f.ok]
    if problems:
        raise PreflightError(problems)


def _probe_kernel() -> list[str]:
    problems = []
    try:
        with netns.scratch():
            for table in ("nat", "raw"):
                try:
                    xtables.apply(None, save.parse(f"*{table}\nCOMMIT\n"))
                except Exception:
                    return [
                        f"legacy xtables has no {table} table: this kernel offers no legacy iptables "
                        "(CONFIG_IP_NF_IPTABLES_LEGACY, iptable_nat, iptable_raw); run the lab on nf_tables "
                        "instead: --backend nft (or auto)"
                    ]
            for what, table, rule, remedy in _FEATURES:
                try:
                    xtables.apply(None, save.parse(f"*{table}\n{rule}\nCOMMIT\n"))
                except Exception:
                    problems.append(f"the kernel lacks {what}: {remedy}")
            problems += _probe_nflog()
    except OSError as e:
        problems.append(f"cannot make a network namespace: {e.strerror}")
    return problems


def _probe_nflog() -> list[str]:
    try:
        TraceReader(None, "probe").close()
    except Exception as e:
        return [f"the kernel lacks nfnetlink_log ({e}): load it: modprobe nfnetlink_log (CONFIG_NETFILTER_NETLINK_LOG)"]
    return []
