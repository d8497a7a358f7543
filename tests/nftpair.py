"""Two pods on one veth for the nf_tables kernel tests: `sidecar` (10.9.0.10) and `remote`
(10.9.0.20), each a named namespace `ilab-t<hex>-<pod>` that the fixture removes.

The sidecar listens on 0.0.0.0:15001 (Envoy's outbound port: a redirected SYN is answered)
and the remote on 10.9.0.20:9080 (the app a returned SYN reaches).
"""

from __future__ import annotations

import secrets
import socket
import subprocess
from dataclasses import dataclass, field

from lab import netns

SIDECAR_IP, REMOTE_IP = "10.9.0.10", "10.9.0.20"
APP_PORT, OUTBOUND_PORT = 9080, 15001


def ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True)


def in_pod(ns: str, *argv: str) -> str:
    """A command's stdout, run inside the pod (never in the host's namespace)."""
    with netns.entered(ns):
        return subprocess.run(argv, check=True, capture_output=True, text=True).stdout


@dataclass
class Pair:
    sidecar: str
    remote: str
    sockets: list[socket.socket] = field(default_factory=list)

    def listen(self, ns: str, address: str, port: int) -> None:
        with netns.entered(ns):
            self.sockets.append(socket.create_server((address, port)))


def build() -> Pair:
    tag = secrets.token_hex(3)
    pair = Pair(f"ilab-t{tag}-sidecar", f"ilab-t{tag}-remote")
    try:
        for ns in (pair.sidecar, pair.remote):
            netns.create(ns)
        ip("link", "add", "eth0", "netns", pair.sidecar, "type", "veth", "peer", "eth0", "netns", pair.remote)
        for ns, addr in ((pair.sidecar, SIDECAR_IP), (pair.remote, REMOTE_IP)):
            ip("-n", ns, "link", "set", "lo", "up")
            ip("-n", ns, "addr", "add", f"{addr}/24", "dev", "eth0")
            ip("-n", ns, "link", "set", "eth0", "up")
        pair.listen(pair.sidecar, "0.0.0.0", OUTBOUND_PORT)
        pair.listen(pair.remote, REMOTE_IP, APP_PORT)
    except BaseException:
        destroy(pair)
        raise
    return pair


def destroy(pair: Pair) -> None:
    for sock in pair.sockets:
        sock.close()
    for ns in (pair.sidecar, pair.remote):
        netns.remove(ns)
