"""Attach mode's footprint in a namespace the lab does not own, and how it is taken back.

`istio-lab probe --netns PATH` traces one flow in a live pod.  What it places there, and
nothing else:
  - nf_tables' `inet ilab-trace` table (or, where it already exists, rules in it), whose
    `meta nftrace set 1` marks the flow's packets at priority raw - 1.  The mark is the
    same skb bit legacy's TRACE target sets, so the pod's legacy tables report their rules
    too: no rule goes into the pod's own tables, and no legacy table is made (a legacy
    table, once made, cannot be removed);
  - where the pod has legacy tables, nfnetlink_log as the logger of AF_INET and AF_INET6
    (the per-namespace sysctls net.netfilter.nf_log.2 and .10), which legacy's TRACE logs
    through; their values before are kept and written back.

An AttachRecord says all of it, written before anything is placed (the intent) and again
after (the handles), so the next istio-lab command puts the namespace back if the probe
died, SIGKILL included.  A namespace is found again by its inode: its path if that still
names it, else any process that lives in it; if none does, it is gone, and so is what was
placed there.  The host's own namespace (init's) is never attached to.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import secrets
import time
from dataclasses import asdict, dataclass, field, fields

from . import netns, procfs
from .errors import LabError
from .record import STATE_DIR
from .rules.nft import libnft, tracing

ATTACH_DIR = os.path.join(STATE_DIR, "attach-probes")  # not a lab id: the labs' reaper leaves it alone
NF_LOG = {4: "net/netfilter/nf_log/2", 6: "net/netfilter/nf_log/10"}  # AF_INET, AF_INET6


@dataclass(frozen=True)
class Namespace:
    """A network namespace named by a path, and its identity (device and inode of nsfs)."""

    path: str
    dev: int
    ino: int

    @classmethod
    def at(cls, path: str) -> "Namespace":
        try:
            st = os.stat(path)
        except OSError as e:
            raise LabError(f"--netns {path}: {e.strerror}") from None
        found = cls(path, st.st_dev, st.st_ino)
        if (found.dev, found.ino) in _hosts():  # checked before the namespace is ever entered
            raise LabError(f"--netns {path}: that is the host's own network namespace; attach mode probes a pod's, "
                           "never the host's")
        try:
            with netns.entered(path):  # setns with CLONE_NEWNET refuses what is not a network namespace
                pass
        except OSError as e:
            why = "not a network namespace (give /proc/PID/ns/net or /run/netns/NAME)" if e.errno == errno.EINVAL \
                else e.strerror
            raise LabError(f"--netns {path}: {why}") from None
        return found

    def reachable(self) -> str | None:
        """A path that names this namespace now: its own, or a process's living in it; None if gone."""
        try:
            st = os.stat(self.path)
            if (st.st_dev, st.st_ino) == (self.dev, self.ino):
                return self.path
        except OSError:
            pass
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                try:
                    st = os.stat(f"/proc/{entry}/ns/net")
                except OSError:
                    continue
                if (st.st_dev, st.st_ino) == (self.dev, self.ino):
                    return f"/proc/{entry}/ns/net"
        return None


def _hosts() -> set[tuple[int, int]]:
    """The host's network namespace as this process and init see it (where init can be read)."""
    out = set()
    for who in ("thread-self", "self", "1"):
        try:
            st = os.stat(f"/proc/{who}/ns/net")
            out.add((st.st_dev, st.st_ino))
        except OSError:
            pass
    return out


@dataclass
class AttachRecord:
    id: str
    owner_pid: int
    owner_start: str | None
    netns: str
    dev: int
    ino: int
    table_made: bool = False  # `inet ilab-trace` was made by this probe (else it was there: only its rules go)
    handles: list = field(default_factory=list)  # [chain, handle] of the rules placed in it
    nf_log: dict = field(default_factory=dict)  # family -> the logger before ("NONE", "nfnetlink_log", ...)
    created: float = field(default_factory=time.time)

    @property
    def file(self) -> str:
        return os.path.join(ATTACH_DIR, f"{self.id}.json")

    @property
    def namespace(self) -> Namespace:
        return Namespace(self.netns, self.dev, self.ino)

    def save(self) -> None:
        os.makedirs(ATTACH_DIR, mode=0o755, exist_ok=True)
        tmp = self.file + ".tmp"
        with open(tmp, "w") as f:
            json.dump(asdict(self), f)
        os.replace(tmp, self.file)

    def owner_alive(self) -> bool:
        return self.owner_start is not None and procfs.stat(self.owner_pid) is not None \
            and procfs.stat(self.owner_pid).start_time == self.owner_start

    @classmethod
    def load(cls, path: str) -> "AttachRecord | None":
        try:
            with open(path) as f:
                data = json.load(f)
            known = {f.name for f in fields(cls)}
            return cls(**{k: v for k, v in data.items() if k in known})
        except (OSError, ValueError, TypeError):
            return None

    @classmethod
    def new(cls, ns: Namespace) -> "AttachRecord":
        pid = os.getpid()
        found = procfs.stat(pid)
        return cls(secrets.token_hex(4), pid, found.start_time if found else None, ns.path, ns.dev, ns.ino)


@contextlib.contextmanager
def one_probe(ns: Namespace):
    """One attach probe per namespace at a time (they would share its table and its logger)."""
    os.makedirs(ATTACH_DIR, mode=0o755, exist_ok=True)
    lock = os.path.join(ATTACH_DIR, f".{ns.dev}-{ns.ino}.lock")
    fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            held = os.fstat(fd).st_ino == os.stat(lock).st_ino  # not a file the last holder removed
        except (BlockingIOError, FileNotFoundError):
            held = False
        if not held:
            raise LabError(f"--netns {ns.path}: another istio-lab probe is attached to it now")
        try:
            yield
        finally:
            os.unlink(lock)  # while held: nothing is left behind, and a late opener sees it gone
    finally:
        os.close(fd)


def nf_loggers(path: str) -> dict[int, str]:
    """The namespace's logger per family (what `sysctl net.netfilter.nf_log.2` says there)."""
    out = {}
    with netns.entered(path):
        for family, key in NF_LOG.items():
            try:
                with open(f"/proc/sys/{key}") as f:
                    out[family] = f.read().strip()
            except OSError:
                pass
    return out


def restore_loggers(path: str, before: dict) -> None:
    """Write each family's logger back as it was ("NONE" unbinds)."""
    with netns.entered(path):
        for family, value in before.items():
            key = NF_LOG[int(family)]
            with open(f"/proc/sys/{key}") as f:
                if f.read().strip() == value:
                    continue
            with open(f"/proc/sys/{key}", "w") as f:
                f.write(value)


def table_exists(path: str) -> bool:
    return any(t == (tracing.FAMILY, tracing.TABLE) for t in libnft.tables(path))


def undo(rec: AttachRecord) -> None:
    """Take back what the record says was placed, wherever the namespace is now (nothing if gone)."""
    path = rec.namespace.reachable() if (rec.dev, rec.ino) not in _hosts() else None  # never the host's
    if path is not None:
        if rec.table_made:
            if table_exists(path):
                tracing.drop_table(path)
        elif rec.handles:
            try:
                tracing.remove(tracing.TraceRules(path, tuple((c, h) for c, h in rec.handles)))
            except libnft.NftError:
                pass  # already gone
        if rec.nf_log:
            restore_loggers(path, rec.nf_log)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(rec.file)


def reap_orphans() -> list[str]:
    """Put back every namespace an attach probe that died left marked; the paths put back."""
    if not os.path.isdir(ATTACH_DIR):
        return []
    reaped = []
    for name in sorted(os.listdir(ATTACH_DIR)):
        if not name.endswith(".json"):
            continue
        rec = AttachRecord.load(os.path.join(ATTACH_DIR, name))
        if rec is None or rec.owner_alive():
            continue
        undo(rec)
        reaped.append(rec.netns)
    return reaped
