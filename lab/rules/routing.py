"""The policy routing TPROXY mode needs beside its rules, as istio-iptables adds it with `ip`:

    ip rule add fwmark 1337 lookup 133
    ip route add local default dev lo table 133

TPROXY hands a packet to a local socket but leaves its destination alone; only a
route of type local makes the kernel deliver a packet for another address (the app's
port on the pod IP is local anyway; a reply to a client whose address Envoy borrowed is
not).  The mark comes from the dump's own TPROXY rule, so a pod's rules (`--rules`)
get the routing their rules ask for.
"""

from __future__ import annotations

import socket

from ..netns import LO_INDEX
from .features import tproxy_mark
from .save import Dump

ROUTE_TABLE = 133  # istio-iptables' INBOUND_TPROXY_ROUTE_TABLE
RULE_PRIORITY = 32765  # where `ip rule add` puts the first rule of its own, before main's 32766


def apply(ipr, dump: Dump) -> None:
    """Add the fwmark rule and the local default route for the dump's family, if it uses TPROXY.

    `ipr` is a pyroute2 IPRoute socket opened inside the pod.
    """
    mark = tproxy_mark(dump)
    if mark is None:
        return
    family = socket.AF_INET if dump.family == 4 else socket.AF_INET6
    anywhere = "0.0.0.0/0" if dump.family == 4 else "::/0"
    ipr.rule("add", family=family, fwmark=mark, table=ROUTE_TABLE, priority=RULE_PRIORITY)
    scope = {"scope": "host"} if dump.family == 4 else {}  # what `ip` gives a local route
    ipr.route("add", family=family, dst=anywhere, type="local", oif=LO_INDEX, table=ROUTE_TABLE, **scope)
