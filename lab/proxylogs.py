"""What the lab's processes wrote: the proxies' logs that join a redirected flow's legs, and
the servers' logs that say a trigger worked.

Each process appends JSON lines to its file in the lab's run directory, one write(2) per
line on O_APPEND, so a reader sees whole lines; a line still being appended is left for
the next read.  The files are made here, owned by the process that writes them (a child
cannot create files in the root-owned run directory).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

from .addr import Address

ACCESS_LOG = "envoy-access.jsonl"  # Envoy: one line per proxied connection
DNS_PROXY_LOG = "pilot-agent-dns.jsonl"  # pilot-agent's DNS proxy: one line per query
ISTIOD_LOG = "istiod.jsonl"  # istiod: xDS streams connected, dropped, closed
SCRAPE_LOG = "prometheus-scrapes.jsonl"  # the scraper: one line per target per round
KUBE_DNS_LOG = "kube-dns.jsonl"  # kube-dns: one line per query


@dataclass(frozen=True)
class ProxyLine:
    """One connection (or DNS query) a proxy took: who it came from, where it was going, and
    the upstream connection the proxy made for it (none when it answered itself or failed)."""

    listener: int
    downstream_peer: Address
    original_dst: Address | None  # None: a UDP query has no SO_ORIGINAL_DST
    upstream_local: Address | None
    upstream_peer: Address | None
    error: str | None = None
    loop: bool = False  # the connection was the proxy's own upstream, sent back to it (the proxy closed it)
    role: str | None = None  # Envoy's side that took it ("Outbound", "Inbound"): with one listener for both

    @classmethod
    def from_json(cls, line: dict) -> "ProxyLine":
        def address(key: str) -> Address | None:
            return Address.parse(line[key]) if line.get(key) else None

        return cls(line["listener"], address("downstream_peer"), address("original_dst"),
                   address("upstream_local"), address("upstream_peer"), line.get("error"), bool(line.get("loop")),
                   line.get("role"))

    def as_json(self) -> dict:
        return {"listener": self.listener, "error": self.error, **({"loop": True} if self.loop else {}),
                **({"role": self.role} if self.role else {}),
                **{key: str(value) if value else None for key, value in (
                    ("downstream_peer", self.downstream_peer), ("original_dst", self.original_dst),
                    ("upstream_local", self.upstream_local), ("upstream_peer", self.upstream_peer))}}


def create(run_dir: str, name: str, uid: int, gid: int) -> None:
    """Make (or empty) a log file its writer, running as uid/gid, can append to."""
    fd = os.open(os.path.join(run_dir, name), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.fchown(fd, uid, gid)
    os.close(fd)


def _whole_lines(run_dir: str, name: str) -> list[str]:
    with open(os.path.join(run_dir, name)) as f:
        return [line for line in f.read().splitlines(keepends=True) if line.endswith("\n")]


def read(run_dir: str, name: str) -> list[dict]:
    """Whole lines only."""
    return [json.loads(line) for line in _whole_lines(run_dir, name)]


PROXY_LOGS = (ACCESS_LOG, DNS_PROXY_LOG)


def marks(run_dir: str) -> dict[str, int]:
    """How many lines each proxy's log holds now: where a flow's own lines will start."""
    return {name: len(_whole_lines(run_dir, name)) for name in PROXY_LOGS}  # counted, not parsed


def proxy_lines(run_dir: str, since: dict[str, int] | None = None) -> list[ProxyLine]:
    """Envoy's access log, then pilot-agent's DNS log (from the marks `since`, if given):
    every leg a proxy took."""
    return [ProxyLine.from_json(json.loads(line)) for name in PROXY_LOGS
            for line in _whole_lines(run_dir, name)[(since or {}).get(name, 0):]]  # the flow's own, parsed
