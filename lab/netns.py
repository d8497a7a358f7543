"""Enter a pod's network namespace for a block of code or a child process.

setns(2) with CLONE_NEWNET changes only the calling thread, so a block of
code can work inside a pod and come back; sockets and netlink handles made
inside stay tied to that namespace after we leave.  Children are forked (not
exec'ed): they enter the pod, drop to their uid/gid and run a Python callable.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import sys
import threading
from typing import Callable, Iterator

from pyroute2 import netns as _netns

from . import interrupts
from .errors import LabError

NETNS_DIR = "/run/netns"

_libc = ctypes.CDLL(None, use_errno=True)  # this process's own libc: no ldconfig run to find it
_PR_SET_PDEATHSIG = 1
_PR_SET_NAME = 15
_PR_SET_KEEPCAPS = 8
_PR_CAPBSET_DROP = 24
_CAPABILITY_VERSION_3 = 0x20080522  # linux/capability.h: two 32-bit words per set
CAPABILITIES = {"NET_ADMIN": 12}  # the ones a process may keep, by name (linux/capability.h)
_CLONE_NEWNET = 0x40000000
_MS_BIND, _MS_REC, _MS_SHARED = 0x1000, 0x4000, 1 << 20  # linux/mount.h
LO_INDEX = 1  # lo is always the first link of a new namespace
_CAP_LAST_CAP_PATH = "/proc/sys/kernel/cap_last_cap"


def path(name: str) -> str:
    return os.path.join(NETNS_DIR, name)


def exists(name: str) -> bool:
    return os.path.exists(path(name))


def names() -> list[str]:
    return sorted(_netns.listnetns())


def create(name: str) -> None:
    """Create a named namespace (as `ip netns add`) without moving the caller: unshare this
    thread into a new namespace, bind-mount it on /run/netns/NAME, come back.

    The namespace mounted is /proc/thread-self's, never /proc/self's: /proc/self/ns/net is
    the *main* thread's namespace, and a library that mounted it from another thread once
    made the host's namespace look like a pod.  This runs on the main thread only, and
    checks the inode of what it made.
    """
    if threading.current_thread() is not threading.main_thread():
        raise RuntimeError("netns.create must run on the main thread")
    _shared_dir()
    target = path(name)
    os.close(os.open(target, os.O_RDONLY | os.O_CREAT | os.O_EXCL, 0))
    try:
        with _saved_netns():
            _call(_libc.unshare(_CLONE_NEWNET), f"unshare a network namespace for {name}")
            _call(_libc.mount(b"/proc/thread-self/ns/net", target.encode(), b"none", _MS_BIND, None),
                  f"bind-mount namespace {name}")
    except BaseException:
        os.unlink(target)
        raise
    if inode(target) == inode("/proc/thread-self/ns/net"):
        remove(name)
        raise RuntimeError(f"namespace {name} came out as the caller's own namespace; removed it")


def _shared_dir() -> None:
    """/run/netns as `ip netns` keeps it: a mount point of its own, shared, so a namespace
    mounted there later is seen from every mount namespace (`ip netns exec` makes one)."""
    os.makedirs(NETNS_DIR, exist_ok=True)
    if _libc.mount(b"", NETNS_DIR.encode(), b"none", _MS_SHARED | _MS_REC, None) == 0:
        return
    _call(_libc.mount(NETNS_DIR.encode(), NETNS_DIR.encode(), b"none", _MS_BIND | _MS_REC, None),
          f"bind-mount {NETNS_DIR} on itself")
    _call(_libc.mount(b"", NETNS_DIR.encode(), b"none", _MS_SHARED | _MS_REC, None), f"share {NETNS_DIR}")


def _call(result: int, what: str) -> None:
    if result != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"cannot {what}: {os.strerror(err)}")


def inode(ns_path: str) -> int:
    return os.stat(ns_path).st_ino


def remove(name: str) -> None:
    if exists(name):
        _netns.remove(name)


@contextlib.contextmanager
def _saved_netns() -> Iterator[None]:
    """Come back to this thread's namespace after the block.  The stop signals are held
    meanwhile (every such block is short: a socket made, rules read, one command run): an
    interrupt between a switch and its way back would leave the thread in a pod."""
    with interrupts.held():
        home = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
        try:
            yield
        finally:
            _netns.setns(home)
            os.close(home)


@contextlib.contextmanager
def entered(name: str) -> Iterator[None]:
    """Run the block inside namespace `name`; the caller always comes back."""
    target = os.open(path(name), os.O_RDONLY)
    try:
        with _saved_netns():
            _netns.setns(target)
            yield
    finally:
        os.close(target)


@contextlib.contextmanager
def fs_identity(uid: int, gid: int) -> Iterator[None]:
    """Make files and sockets created in the block belong to uid/gid.

    xt_owner matches on the credentials a socket's file was opened with
    (f_cred->fsuid/fsgid), so a socket made here is, to `-m owner`, a socket of
    that user.  setfsuid/setfsgid are per thread and never fail loudly, so
    each change is read back.  The stop signals are held for the block (it
    makes a socket): an interrupt between the switch and the way back once left
    the harness as the app's user, and its teardown could not remove the
    namespaces' names (EACCES).
    """
    with interrupts.held():
        old_gid = _libc.setfsgid(gid)
        old_uid = _libc.setfsuid(uid)
        try:
            if _libc.setfsuid(-1) != uid or _libc.setfsgid(-1) != gid:
                raise PermissionError(f"cannot take fs identity {uid}:{gid}")
            yield
        finally:
            _libc.setfsuid(old_uid)
            _libc.setfsgid(old_gid)


@contextlib.contextmanager
def scratch() -> Iterator[None]:
    """Run the block in a fresh, unnamed namespace that vanishes afterwards."""
    with _saved_netns():
        _call(_libc.unshare(_CLONE_NEWNET), "make a network namespace")
        yield


def set_sysctls(name: str, values: dict[str, str]) -> None:
    """Write per-namespace sysctls (paths under /proc/sys/) inside namespace `name`.

    /proc/sys/net answers for the namespace of the thread that opens the file, so each
    write lands in `name` only; each is read back, and the host's value is never opened
    from outside that block.
    """
    with entered(name):
        for key, value in values.items():
            try:
                with open(f"/proc/sys/{key}", "w") as f:
                    f.write(value)
                with open(f"/proc/sys/{key}") as f:
                    took = f.read().strip() == value
            except OSError as e:  # an older kernel without it, say (docs/kernel-requirements.md)
                raise LabError(f"{name}: cannot set sysctl {key.replace('/', '.')}: {e.strerror}") from None
            if not took:
                raise LabError(f"{name}: sysctl {key.replace('/', '.')} did not take {value!r}")


def name_process(name: str) -> None:
    """The name ps and /proc/PID/comm show (15 bytes at most)."""
    _libc.prctl(_PR_SET_NAME, name.encode()[:15], 0, 0, 0)


def die_with_parent(sig: int, parent: int) -> bool:
    """Have the kernel send `sig` to this process when the thread that forked it ends; False
    when `parent` (that process) has already gone, and no signal would come."""
    _libc.prctl(_PR_SET_PDEATHSIG, sig, 0, 0, 0)
    return os.getppid() == parent


def drop_privileges(uid: int, gid: int, keep: tuple[str, ...] = ()) -> None:
    """Become uid/gid with no supplementary groups and only the capabilities in `keep`.

    As a container's securityContext does (`capabilities: {drop: [ALL], add: keep}`):
    uid 0 stays uid 0 but holds nothing else, so it reads and writes only what root
    owns, and xt_owner sees uid 0.
    """
    kept = [CAPABILITIES[name] for name in keep]
    last_cap = int(open(_CAP_LAST_CAP_PATH).read())
    for cap in range(last_cap + 1):
        if cap not in kept:
            _libc.prctl(_PR_CAPBSET_DROP, cap, 0, 0, 0)
    os.setgroups([])
    os.setresgid(gid, gid, gid)
    if kept:
        _libc.prctl(_PR_SET_KEEPCAPS, 1, 0, 0, 0)  # a change to non-zero uids would clear them
    os.setresuid(uid, uid, uid)  # all uids non-zero and nothing kept: every capability set is cleared
    if kept or uid == 0:
        _set_capabilities(kept)


def _set_capabilities(caps: list[int]) -> None:
    """capset(2): effective and permitted = caps, inheritable empty."""
    mask = sum(1 << c for c in caps)
    header = (ctypes.c_uint32 * 2)(_CAPABILITY_VERSION_3, 0)
    data = (ctypes.c_uint32 * 6)(mask & 0xFFFFFFFF, mask & 0xFFFFFFFF, 0, mask >> 32, mask >> 32, 0)
    if _libc.capset(header, data) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"capset: {os.strerror(err)}")


def spawn(
    ns: str,
    run: Callable[[], object],
    *,
    name: str,
    uid: int,
    gid: int,
    log_path: str,
    die_with_parent: bool = True,
    capabilities: tuple[str, ...] = (),
) -> int:
    """Fork a child that enters `ns`, drops to uid/gid (keeping only `capabilities`) and calls `run`.

    The child's stdout and stderr go to `log_path`; with `die_with_parent` the
    kernel kills it when this process dies, even by SIGKILL.  Runs with the stop
    signals held (interrupts.held()) only, and checks: an interrupt raised in an
    at-fork hook would be lost, and one raised before the caller kept the pid would
    leave the child unknown.
    """
    if not interrupts.are_held():
        raise RuntimeError("netns.spawn must run inside interrupts.held()")
    sys.stdout.flush()
    sys.stderr.flush()
    parent = os.getpid()
    pid = os.fork()
    if pid:
        return pid
    code = 1
    try:
        os.setsid()
        _libc.prctl(_PR_SET_NAME, name.encode()[:15], 0, 0, 0)
        for sig in interrupts.SIGNALS:
            signal.signal(sig, signal.SIG_DFL)
        log = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        devnull = os.open(os.devnull, os.O_RDONLY)
        os.dup2(devnull, 0)
        os.dup2(log, 1)
        os.dup2(log, 2)
        os.closerange(3, 65536)
        sys.stdout = os.fdopen(1, "w", buffering=1)
        sys.stderr = os.fdopen(2, "w", buffering=1)
        target = os.open(path(ns), os.O_RDONLY)
        _netns.setns(target)
        os.close(target)
        drop_privileges(uid, gid, capabilities)
        if die_with_parent:  # after the uid change: changing credentials clears the death signal
            _libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
            if os.getppid() != parent:  # the parent died before the signal was armed
                return
        run()
        code = 0
    except BaseException:  # the child must never return into the parent's code
        import traceback

        traceback.print_exc()
    finally:
        os._exit(code)
