"""Lab records: what a lab made, so that a lab whose owner died is found and reaped.

A record is written before the first namespace exists and removed after the
last one is gone, so every `ilab-<labid>-*` namespace is covered by a record
unless its owner is in the middle of tearing it down.  Writing a record and reaping
take turns (a lock file in the state dir): a reaper must never see the directory of
a lab being born before its record is in it, and take the lab for an orphan.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import shutil
import signal
import time
from dataclasses import asdict, dataclass, field, fields

from . import netns, procfs
from .errors import LabError

STATE_DIR = os.environ.get("ISTIO_LAB_STATE_DIR", "/run/istio-iptables-lab")
NS_PREFIX = "ilab-"
LABID_RE = re.compile(r"^[a-z0-9]{1,12}$")
LOCK = ".lock"


def ns_name(labid: str, pod: str) -> str:
    return f"{NS_PREFIX}{labid}-{pod}"


def labid_of(ns: str) -> str | None:
    m = re.match(rf"^{NS_PREFIX}([a-z0-9]+)-", ns)
    return m.group(1) if m else None


def _start_time(pid: int) -> str | None:
    found = procfs.stat(pid)
    return found.start_time if found else None


@dataclass
class Record:
    labid: str
    owner_pid: int
    owner_start: str | None
    detached: bool = False  # left up on purpose by `istio-lab up`
    pids: dict[str, int] = field(default_factory=dict)  # process name -> pid
    ipv6: bool = False  # a dual-stack lab
    inbound_mode: str = "REDIRECT"  # how the sidecar's rules hand inbound to Envoy: REDIRECT or TPROXY
    backend: str = "legacy"  # the netfilter backend its rules went through: legacy or nft
    created: float = field(default_factory=time.time)

    @property
    def dir(self) -> str:
        return os.path.join(STATE_DIR, self.labid)

    def save(self) -> None:
        with _turn():
            os.makedirs(self.dir, mode=0o755, exist_ok=True)
            tmp = os.path.join(self.dir, "record.json.tmp")
            with open(tmp, "w") as f:
                json.dump(asdict(self), f)
            os.replace(tmp, os.path.join(self.dir, "record.json"))

    def owner_alive(self) -> bool:
        return _start_time(self.owner_pid) == self.owner_start and self.owner_start is not None

    @classmethod
    def new(cls, labid: str, detached: bool = False) -> "Record":
        pid = os.getpid()
        return cls(labid, pid, _start_time(pid), detached)

    @classmethod
    def load(cls, labid: str) -> "Record | None":
        """The lab's record; None when there is none or it cannot be read (its writer died
        writing it).  Fields this version does not know are left aside: a record written by
        a newer istio-lab is still a live lab's, and must not be taken for a dead one."""
        try:
            with open(os.path.join(STATE_DIR, labid, "record.json")) as f:
                data = json.load(f)
            known = {f.name for f in fields(cls)}
            return cls(**{k: v for k, v in data.items() if k in known})
        except (OSError, ValueError, TypeError, AttributeError):
            return None


@contextlib.contextmanager
def _turn(deadline: float = 10.0):
    """Hold the state dir's lock (released by the kernel if we die); give up after `deadline` s."""
    os.makedirs(STATE_DIR, mode=0o755, exist_ok=True)
    fd = os.open(os.path.join(STATE_DIR, LOCK), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        end, pause = time.monotonic() + deadline, 0.0002
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > end:
                    raise LabError(f"another istio-lab has held {STATE_DIR}/{LOCK} for {deadline:g}s") from None
                time.sleep(pause)  # labs side by side take it in turns: most holds are a record's write
                pause = min(pause * 2, 0.005)
        yield
    finally:
        os.close(fd)


def known_labids() -> set[str]:
    ids = {labid_of(n) for n in netns.names()} - {None}
    if os.path.isdir(STATE_DIR):
        ids |= {d for d in os.listdir(STATE_DIR) if LABID_RE.match(d)}
    return ids


def lab_namespaces(labid: str) -> list[str]:
    return [n for n in netns.names() if labid_of(n) == labid]


def _pids_in(namespaces: list[str]) -> list[int]:
    """Every process whose network namespace is one of these (never the host's)."""
    inodes = set()
    for ns in namespaces:
        try:
            inodes.add(netns.inode(netns.path(ns)))
        except OSError:
            pass
    inodes -= {procfs.net_inode("self"), procfs.net_inode(1)}  # never ours or init's, whatever a name claims
    return [int(entry) for entry in os.listdir("/proc") if entry.isdigit() and procfs.net_inode(entry) in inodes]


def destroy(labid: str, deadline: float = 2.0) -> None:
    """Kill the lab's processes, delete its namespaces, then its record."""
    namespaces = stop(labid, deadline)
    for ns in sorted(namespaces, key=lambda n: n.endswith("-node")):  # fabric last
        netns.remove(ns)
    shutil.rmtree(os.path.join(STATE_DIR, labid), ignore_errors=True)


def stop(labid: str, deadline: float = 2.0) -> list[str]:
    """Kill the processes in the lab's namespaces (and those its record names, while its
    owner lives); the namespaces, which stay, with its record."""
    namespaces = lab_namespaces(labid)
    rec = Record.load(labid)
    # Recorded pids are trusted only while their owner lives: then they are its children
    # (a child's pid is not reused until it is reaped).  Otherwise the namespaces tell.
    # They are stopped first: they take milliseconds to die, the time a walk of /proc for
    # whatever else is in the namespaces takes on a busy machine.
    recorded = [p for p in rec.pids.values() if p != os.getpid()] if rec and rec.owner_alive() else []
    for pid in recorded:
        _signal(pid, signal.SIGTERM)
    others = sorted(set(_pids_in(namespaces)) - set(recorded) - {os.getpid()})
    for pid in others:
        _signal(pid, signal.SIGTERM)
    victims = recorded + others
    end, pause = time.monotonic() + deadline, 0.0005
    while victims and time.monotonic() < end:
        victims = [p for p in victims if _reap(p)]
        if victims:
            time.sleep(pause)
            pause = min(pause * 2, 0.005)
    for pid in victims:
        _signal(pid, signal.SIGKILL)
        _reap(pid, block=True)
    return namespaces


def _signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def _reap(pid: int, block: bool = False) -> bool:
    """True while the process still runs; collects our own children."""
    try:
        done, _ = os.waitpid(pid, 0 if block else os.WNOHANG)
        return done == 0
    except ChildProcessError:  # not our child: alive while /proc says so and not a zombie
        return procfs.running(pid)


def reap_orphans() -> list[str]:
    """Destroy every lab whose owner is dead and that was not left up on purpose.

    Only what a record says an istio-lab made: `ilab-` namespaces with no record directory
    are someone else's (a test's, made by hand), and were once reaped from under them.
    A directory with no readable record is a record its writer died writing: the lock
    rules out one being written now.
    """
    reaped = []
    with _turn():
        for labid in sorted(known_labids()):
            if not os.path.isdir(os.path.join(STATE_DIR, labid)):
                continue
            record = Record.load(labid)
            if record is not None and (record.detached or record.owner_alive()):
                continue
            destroy(labid)
            reaped.append(labid)
    return reaped

