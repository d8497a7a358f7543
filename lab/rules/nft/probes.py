"""What preflight asks of this machine for the nf_tables backend, one line per answer.

Each probe works in a scratch namespace that vanishes afterwards (the kernel autoloads a
module on first use, so /proc would not tell), and says what it found as one Finding.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
from dataclasses import dataclass

from ... import netns
from ...nftrace import NftraceReader
from .. import nftbuilder, nftset, xtables
from ..save import parse
from . import iptables_nft, libnft

PROBE_PORT = 9  # discard: nothing listens, the datagram is traced on its way out


@dataclass(frozen=True)
class Finding:
    ok: bool
    line: str

    def __str__(self) -> str:
        return self.line


def nf_tables() -> Finding:
    """libnftables loads, and the kernel takes an inet table with a nat chain."""
    try:
        with libnft.scratch():
            libnft.run(None, "table inet ilab-probe {\n chain output { type nat hook output priority -100; }\n}\n",
                       "ilab-probe")
    except ImportError as e:
        return Finding(False, f"pip-nftables cannot be imported ({e}): run scripts/setup")
    except OSError as e:
        return Finding(False, f"libnftables.so.1 cannot be loaded ({e.strerror or e}): apt-get install libnftables1")
    except libnft.NftError as e:
        return Finding(False, f"the kernel refuses an nf_tables nat chain ({e}): CONFIG_NF_TABLES, CONFIG_NFT_NAT")
    return Finding(True, "nf_tables: an inet table with a nat chain loads")


def nftrace() -> Finding:
    """A packet traced in a namespace reports its steps to a reader made in that namespace."""
    try:
        with libnft.scratch():
            subprocess.run(["ip", "link", "set", "lo", "up"], check=True, capture_output=True)
            libnft.run(None, "table inet ilab-probe {\n chain output { type filter hook output priority 0; "
                             f"udp dport {PROBE_PORT} meta nftrace set 1; }}\n}}\n", "ilab-probe")
            with NftraceReader(None, "probe", skip=frozenset()) as reader, \
                    socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
                sock.sendto(b"probe", ("127.0.0.1", PROBE_PORT))
                events = reader.drain()
    except Exception as e:
        return Finding(False, f"nftrace cannot be read in a namespace ({e})")
    if not events:
        return Finding(False, "nftrace sent no event for a traced packet: CONFIG_NF_TABLES (trace), nfnetlink")
    return Finding(True, f"nftrace: a traced packet reported {len(events)} events in its namespace")


def owner_through_compat() -> Finding:
    """iptables-nft loads `-m owner` and REDIRECT, which nf_tables runs through nft_compat."""
    if shutil.which(iptables_nft.TOOLS[4][0]) is None:
        return Finding(False, "iptables-nft-restore not found: apt-get install iptables")
    rules = parse("*nat\n-A OUTPUT -m owner --uid-owner 1337 -j RETURN\n"
                  "-A OUTPUT -p tcp -j REDIRECT --to-ports 15001\nCOMMIT\n", "probe")
    try:
        with libnft.scratch():
            iptables_nft.apply(None, rules)
    except Exception as e:
        return Finding(False, f"iptables-nft cannot load the owner match or REDIRECT ({e}): "
                              "CONFIG_NFT_COMPAT, CONFIG_NETFILTER_XT_MATCH_OWNER, CONFIG_NETFILTER_XT_TARGET_REDIRECT")
    return Finding(True, "iptables-nft: -m owner and REDIRECT load through nft_compat")


def native_rules() -> Finding:
    """Istio's native nftables rules load: one rule set with every expression they use
    (redirect, tproxy, ct zone and ct mark, meta skuid/skgid and mark), as one nft -f."""
    options = nftbuilder.NftOptions(mode="TPROXY", dns_servers=("10.96.0.10",), ipv6=True)
    try:
        with libnft.scratch():
            libnft.run(None, nftset.script(nftbuilder.build(nftbuilder.COUNTERS, options)), "istio-native")
    except libnft.NftError as e:
        return Finding(False, f"the kernel refuses Istio's native nftables rules ({e}): CONFIG_NFT_REDIR, "
                              "CONFIG_NFT_TPROXY, CONFIG_NFT_CT, CONFIG_NFT_NAT")
    except (ImportError, OSError) as e:
        return Finding(False, f"libnftables cannot be used ({e}): run scripts/setup")
    return Finding(True, "native nftables: Istio's redirect, tproxy, ct zone and skuid rules load")


def legacy_xtables() -> Finding:
    """The kernel still offers legacy xtables' nat table (CONFIG_NETFILTER_XTABLES_LEGACY, 6.17+)."""
    try:
        with netns.scratch():
            xtables.apply(None, parse("*nat\nCOMMIT\n", "probe"))
    except Exception:
        return Finding(False, "no legacy nat table (ip_tables, iptable_nat; CONFIG_NETFILTER_XTABLES_LEGACY)")
    return Finding(True, "legacy xtables: the nat table loads")


def auto_backend() -> tuple[str, str]:
    """What `--backend auto` picks, and why: legacy where the kernel has it (the lab's own
    TRACE and counters have run there longest), else nf_tables."""
    legacy = legacy_xtables()
    if legacy.ok:
        return "legacy", f"auto: legacy ({legacy.line})"
    return "nft", f"auto: nft ({legacy.line})"
