"""`istio-lab trace`: watch a lab's TRACE events by hand, as the runner's witnesses see them.

TRACE events reach userspace only through a reader bound inside each pod's
namespace (lab.trace.TraceReader), so no shell tool shows them.  This binds the
readers, puts a TRACE rule at the head of the chosen pods' raw PREROUTING and
OUTPUT, prints each event as it arrives, and removes the rules on the way out
(Ctrl-C, SIGTERM, --count or --seconds).
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import sys
import time
from typing import Callable, Iterator, TextIO

from . import netns, plan, record
from .backend import Backend, Reader, TracedPorts
from .errors import LabError
from .rules.xtables import RuleError
from .netfilter import TABLES
from .rules.nftbuilder import MANGLE, NAT, RAW
from .trace import TraceError, TraceEvent, TraceLost

MAX_PORTS = 15  # the multiport match's limit
NATIVE_TABLES = (RAW, MANGLE, NAT)  # Istio's native nftables tables


def check(pods: list[str], ports: list[int], tables: list[str], count: int | None, seconds: float | None) -> None:
    """Bad options fail before anything in the lab changes."""
    for pod in pods:
        if pod not in plan.PODS:
            raise LabError(f"no pod {pod!r} in a lab (pods: {', '.join(plan.PODS)})")
    for port in ports:
        if not 1 <= port <= 65535:
            raise LabError(f"port {port} is out of range 1-65535")
    if len(ports) > MAX_PORTS:
        raise LabError(f"at most {MAX_PORTS} ports (the multiport match's limit), not {len(ports)}")
    for table in tables:
        if table not in TABLES and table not in NATIVE_TABLES:
            raise LabError(f"no table {table!r} (tables: {', '.join(TABLES + NATIVE_TABLES)})")
    if count is not None and count < 1:
        raise LabError(f"--count must be at least 1, not {count}")
    if seconds is not None and not seconds > 0:  # not `<= 0`: nan would pass and never end
        raise LabError(f"--seconds must be positive, not {seconds:g}")


class _RuleText:
    """What a `rule` event's rule says, read once per pod and family (the rules stay put):
    an IPv6 packet's rule 2 is ip6tables' rule 2, and a pod whose trace sees no IPv6 packet
    is never asked for its ip6tables rules."""

    def __init__(self, backend: Backend):
        self.backend = backend
        self.cache: dict[tuple[str, int], dict[tuple[str, str, int], str]] = {}
        self.unread: set[str] = set()  # pods whose rules could not be read, said once

    def load(self, ns: str, family: int) -> None:
        """Every table's rules of the pod in one family (iptables' and nft's alike, through the backend)."""
        self.cache[ns, family] = {
            (ref.table, ref.chain, ref.number): line.split(" ", 2)[2] if line.startswith("-A ") else line
            for ref, line in self.backend.rules(ns, family)[0].items()}  # nft's words as they are

    def __call__(self, ns: str, e: TraceEvent) -> str:
        if e.kind != "rule":
            return ""
        family = 6 if ":" in e.src else 4
        if (ns, family) not in self.cache:
            try:
                self.load(ns, family)
            except RuleError as why:  # the text is a gloss: events go on without it, and it is read again next time
                if ns not in self.unread:
                    self.unread.add(ns)
                    print(f"istio-lab: {ns}: the rules could not be read ({why}); events without their rule's text",
                          file=sys.stderr, flush=True)
                return ""
        return self.cache[ns, family].get((e.table, e.chain, e.rulenum), "")


@contextlib.contextmanager
def _signals_to_fd() -> Iterator[int]:
    """SIGINT, SIGTERM and SIGHUP make the yielded descriptor readable instead of raising.

    So a stop lands between events, never inside one: the watch prints what the
    kernel had delivered, then removes its rules; a second Ctrl-C changes nothing.
    """
    r, w = os.pipe()
    os.set_blocking(w, False)
    old_fd = signal.set_wakeup_fd(w)
    old = {sig: signal.signal(sig, lambda *_: None) for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    try:
        yield r
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)
        signal.set_wakeup_fd(old_fd)
        os.close(r)
        os.close(w)


def watch(labid: str, backend: Backend, pods: list[str], ports: list[int], tables: list[str], *, syn: bool = False,
          count: int | None = None, seconds: float | None = None, out: TextIO = sys.stdout,
          say: Callable[[str], None] = lambda line: print(line, file=sys.stderr, flush=True)) -> int:
    """Print the trace events of the lab's `pods` until stopped (options already check()ed);
    returns how many were printed."""
    namespaces = {pod: record.ns_name(labid, pod) for pod in dict.fromkeys(pods)}
    readers: dict[int, Reader] = {}  # by socket descriptor
    printed = 0
    rule_text = _RuleText(backend)

    def read(reader: Reader, settle: float = 0) -> None:
        nonlocal printed
        try:
            events = reader.drain(settle=settle)
        except TraceLost as lost:
            say(f"istio-lab: {lost}")
            return
        for e in events:
            if (syn and e.tcp_flags != "S") or (tables and e.table not in tables):
                continue
            if count is not None and printed >= count:
                return
            text = rule_text(reader.ns, e)
            print(f"{e}   [{text}]" if text else str(e), file=out, flush=True)
            printed += 1

    try:
        with _signals_to_fd() as stopped, contextlib.ExitStack() as held:
            try:
                for pod, ns in namespaces.items():
                    backend.prepare(ns)  # a table that does not exist yet reports no event
                    reader = held.enter_context(contextlib.closing(backend.reader(ns, pod)))
                    readers[reader.fileno()] = reader
                    rule_text.load(ns, 4)  # the rules events name most; read before traffic
                held.enter_context(backend.tracing(list(namespaces.values()), TracedPorts(tuple(ports))))
            except (TraceError, OSError) as e:  # another reader on the pod, or the pod is gone
                raise LabError(str(e)) from None
            what = f"tcp port {','.join(map(str, ports))}" if ports else "all tcp"
            until = f"{count} events" if count else f"{seconds:g} s" if seconds else "Ctrl-C"
            say(f"istio-lab: tracing {what} in {', '.join(namespaces.values())}; stops after {until}")
            poller = select.poll()
            for fd in [*readers, stopped]:
                poller.register(fd, select.POLLIN)
            deadline = time.monotonic() + seconds if seconds else None
            while count is None or printed < count:
                wait = -1 if deadline is None else max(0.0, deadline - time.monotonic()) * 1000
                ready = [fd for fd, _ in poller.poll(wait)]
                if stopped in ready or (deadline is not None and time.monotonic() >= deadline):
                    for reader in readers.values():  # what the kernel delivered up to the stop
                        read(reader, settle=0.025)
                    break
                for fd in ready:
                    read(readers[fd])
    except OSError as e:  # taking the trace rules out again: fine if the lab went down meanwhile
        if all(netns.exists(ns) for ns in namespaces.values()):
            raise LabError(str(e)) from None
    return printed
