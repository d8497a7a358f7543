"""A private view of the machine-wide names labs use, so that a test's labs are its own.

A lab is found by two directories: /run/netns (its namespaces' names) and the state dir
(its record).  A sandbox is a mount namespace in which both are empty tmpfs, kept alive by
a sleeping holder process.  Commands entered into it (nsenter --mount) see, reap and
remove only the labs made there, whatever else runs on the machine: other pytest-xdist
workers, other people's labs.  So a test can SIGKILL a harness and insist that *its* next
command reaps the lab, or run `down --all`, without touching anyone else.  The test
itself stays outside and reads the sandbox through /proc/<holder>/root.

When the holder ends, the mount namespace goes and with it every name made there; a
process left running in a pod would keep its namespace alive, so close() removes any lab
the test left and then ends the processes still inside, by pid: all of them were started
by the test, since the mount namespace is new.  It also collects the zombies the test
made: the processes of a SIGKILLed harness die with it and are handed to pytest (a
subreaper), where a pytest-xdist worker would keep them until it ends.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

from lab import netns, record

REPO = Path(__file__).resolve().parent.parent
GUARD = 120  # seconds: a deadline against a hang, never a measurement
_SETUP = f"""
mkdir -p {netns.NETNS_DIR} {record.STATE_DIR}
mount -t tmpfs -o mode=0755 ilab-sandbox {netns.NETNS_DIR}
mount -t tmpfs -o mode=0755 ilab-sandbox {record.STATE_DIR}
echo ready
exec sleep infinity
"""


def _stat(pid: int) -> list[str]:
    """/proc/PID/stat's fields after the name: state, ppid, ... ([] if it is gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return []


class Sandbox:
    def __init__(self) -> None:
        self.holder = subprocess.Popen(
            ["unshare", "--mount", "--propagation", "private", "sh", "-e", "-c", _SETUP],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        if self.holder.stdout.readline().strip() != "ready":
            self.holder.kill()
            raise RuntimeError(f"sandbox set-up failed: {self.holder.communicate(timeout=GUARD)[1].strip()}")
        self.mnt = os.stat(f"/proc/{self.holder.pid}/ns/mnt").st_ino
        self.born = _stat(self.holder.pid)[19]  # start time, in clock ticks since boot

    # -- running things inside ------------------------------------------------------------

    def argv(self, *argv: str) -> list[str]:
        return ["nsenter", f"--mount=/proc/{self.holder.pid}/ns/mnt", f"--wd={REPO}", "--", *argv]

    def cli(self, *args: str) -> list[str]:
        """`istio-lab ARGS` in the sandbox; nsenter execs it, so a Popen's pid is the harness's."""
        return self.argv(sys.executable, "-m", "lab.cli", *args)

    def run(self, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run(self.cli(*args), capture_output=True, text=True, stdin=subprocess.DEVNULL,
                              timeout=GUARD)

    def popen(self, *args: str, **kwargs) -> subprocess.Popen:
        return subprocess.Popen(self.cli(*args), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, **kwargs)

    def in_pod(self, ns: str, *argv: str) -> str:
        """Run a command in one of the sandbox's namespaces (e.g. iptables-legacy-save); its stdout."""
        return subprocess.run(["nsenter", f"--net={self.path(netns.path(ns))}", "--", *argv], capture_output=True,
                              text=True, stdin=subprocess.DEVNULL, timeout=GUARD).stdout

    # -- reading it from outside ----------------------------------------------------------

    def path(self, inside: str) -> str:
        return f"/proc/{self.holder.pid}/root{inside}"

    def namespaces(self) -> list[str]:
        return sorted(os.listdir(self.path(netns.NETNS_DIR)))

    def records(self) -> list[str]:
        """What the state dir holds for labs (its lock file aside)."""
        return sorted(n for n in os.listdir(self.path(record.STATE_DIR)) if n != record.LOCK)

    def record(self, labid: str) -> dict | None:
        try:
            with open(self.path(os.path.join(record.STATE_DIR, labid, "record.json"))) as f:
                return json.load(f)
        except (OSError, ValueError):
            return None

    def processes(self) -> list[int]:
        """Every process of the sandbox but its holder (a lab's processes inherit its mount namespace)."""
        found = []
        for entry in filter(str.isdigit, os.listdir("/proc")):
            try:
                if int(entry) != self.holder.pid and os.stat(f"/proc/{entry}/ns/mnt").st_ino == self.mnt:
                    found.append(int(entry))
            except OSError:
                pass
        return found

    def leftovers(self) -> dict[str, list]:
        """What a finished command left in the sandbox; empty when nothing."""
        found = {"namespaces": self.namespaces(), "records": self.records(), "processes": self.processes()}
        return {what: items for what, items in found.items() if items}

    # -- the end --------------------------------------------------------------------------

    def close(self) -> None:
        if self.holder.poll() is None:
            if self.namespaces() or self.records():
                self.run("down", "--all")
            for pid in self.processes():
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            self.holder.kill()
        self.holder.communicate(timeout=GUARD)
        self._collect_zombies()

    def _collect_zombies(self) -> None:
        """Our zombie children started since the sandbox was made (a worker runs one test at a time)."""
        for entry in filter(str.isdigit, os.listdir("/proc")):
            fields = _stat(int(entry))
            if fields and fields[0] == "Z" and int(fields[1]) == os.getpid() and int(fields[19]) >= int(self.born):
                try:
                    os.waitpid(int(entry), os.WNOHANG)
                except ChildProcessError:
                    pass

    def __enter__(self) -> Sandbox:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
