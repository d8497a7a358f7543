"""libnftables, through its JSON-speaking ctypes binding (pip-nftables), one context per call.

A libnftables context opens its netlink socket when it is made (measured with 1.0.6: a
context made in one namespace keeps reading and writing that namespace after the thread
moves).  So a pod's context is made inside the pod's namespace, on its first call, and
serves that namespace only, until release(); none made in the harness's own namespace can
be reused inside a pod, or the other way round.  A scratch namespace's calls get a context
each.

Why not one per call: closing an nf_tables netlink socket while deleted rules wait to be
destroyed (in any namespace: the kernel's destroy list is global) makes nf_tables finish
that work first, an RCU grace period, holding the commit mutex (nft_rcv_nl_event on
NETLINK_URELEASE): about 14 ms measured here each time a flow's trace rules were removed,
and the next transaction waited as long.  Kept open, the sockets let the kernel destroy
the rules in its own time; a lab's contexts go with its readers (release()).
"""

from __future__ import annotations

import contextlib
import json
import os
import threading
from typing import Iterable, Iterator

from ... import netns
from .. import nftset
from ..xtables import RuleError


class NftError(RuleError):
    """libnftables refused a command (a syntax error, a rule the kernel refused); names it."""


_scratch = threading.local()


def _here() -> int:
    return os.stat("/proc/thread-self/ns/net").st_ino


@contextlib.contextmanager
def scratch() -> Iterator[None]:
    """netns.scratch(), remembered: the only place where a call may name no namespace."""
    with netns.scratch():
        _scratch.inode = _here()
        try:
            yield
        finally:
            _scratch.inode = None


@contextlib.contextmanager
def inside(ns: str | None) -> Iterator[None]:
    """Enter `ns`.  None stays in the thread's namespace, and only inside scratch(): a
    call that names no pod anywhere else would land in the harness's own namespace, whose
    rules are never the lab's to change."""
    if ns:
        with netns.entered(ns):
            yield
        return
    if getattr(_scratch, "inode", None) != _here():
        raise RuntimeError("nf_tables: no namespace named outside a scratch namespace: refusing")
    yield


def _context(json_output: bool = False, handles: bool = False, echo: bool = False):
    import nftables  # pip-nftables: loads libnftables.so.1 (Debian's libnftables1)

    ctx = nftables.Nftables()
    ctx.set_json_output(json_output)
    ctx.set_handle_output(handles)
    ctx.set_echo_output(echo)
    return ctx


_contexts: dict[str, tuple[int, object]] = {}  # a pod's namespace -> (its inode, its context made inside it)
_contexts_lock = threading.Lock()


def _cmd(ns: str | None, commands: str, **flags) -> tuple[int, str, str]:
    """Run commands with the namespace's context (already entered: inside(ns)).  A context
    made in a namespace of the same name that is gone (its inode differs) is not reused."""
    if ns is None:  # a scratch namespace: a context for this call alone
        return _context(**flags).cmd(commands)
    with _contexts_lock:
        here = _here()
        inode, ctx = _contexts.get(ns, (None, None))
        if inode != here:
            ctx = _context()
            _contexts[ns] = (here, ctx)
        ctx.set_json_output(flags.get("json_output", False))
        ctx.set_handle_output(flags.get("handles", False))
        ctx.set_echo_output(flags.get("echo", False))
        return ctx.cmd(commands)


def release(ns: str) -> None:
    """Free the namespace's context (its socket, which keeps the namespace alive)."""
    with _contexts_lock:
        _contexts.pop(ns, None)


def _run(ns: str | None, commands: str, what: str, **flags) -> str:
    with inside(ns):
        rc, out, err = _cmd(ns, commands, **flags)
    if rc:
        raise NftError(f"{what}: {_first_error(err)}")
    return out


def _first_error(err: str) -> str:
    """libnftables' first `Error:` line, with the source line it quotes (no caret line)."""
    lines = [line.strip() for line in err.splitlines()]
    for i, line in enumerate(lines):
        if "Error: " in line:
            where, _, message = line.partition("Error: ")
            quoted = lines[i + 1] if i + 1 < len(lines) and set(lines[i + 1]) - set("^~ ") else ""
            return f"{where}{message}" + (f": {quoted}" if quoted else "")
    return " ".join(line for line in lines if line) or "failed"


def _script(ns: str | None, script: str, source: str, **flags) -> str:
    """Run a script as `include` of an in-memory file named `source`.

    libnftables 1.0.6 quotes the first line of a command buffer for every error found
    past parsing, whatever line it is on; an included file's errors name their own line.
    The include is part of the one batch: the script is still all or nothing.
    """
    fd = os.memfd_create(source.replace("/", "_"), os.MFD_CLOEXEC)
    try:
        os.write(fd, script.encode())
        path = f"/proc/self/fd/{fd}"
        with inside(ns):
            rc, out, err = _cmd(ns, f'include "{path}"', **flags)
    finally:
        os.close(fd)
    if rc:
        raise NftError(_first_error(err.replace(path, source)))
    return out


def run(ns: str | None, script: str, source: str = "<rules>") -> None:
    """Run an `nft -f` script in `ns`: libnftables sends it as one batch, all or nothing.
    An error names the source and the line: `rules.nft:37:16-28: Could not process rule:
    No such file or directory: counter jump istio-nowhere`."""
    _script(ns, script, source)


def echo(ns: str | None, script: str, source: str = "<rules>") -> list[dict]:
    """Run a script and return what it made, as JSON objects with their handles."""
    out = _script(ns, script, source, json_output=True, handles=True, echo=True)
    return [cmd[verb] for cmd in (json.loads(out)["nftables"] if out.strip() else []) for verb in cmd]


def listing(ns: str | None, what: str = "ruleset") -> list[dict]:
    """`nft -j -a list WHAT` in `ns`: the JSON items (metainfo, table, chain, rule, ...)."""
    out = _run(ns, f"list {what}", f"nft list {what}", json_output=True, handles=True)
    return json.loads(out)["nftables"] if out.strip() else []


def text(ns: str | None, what: str = "ruleset") -> str:
    """`nft -a list WHAT` in `ns`: rule text with `# handle N` comments."""
    return _run(ns, f"list {what}", f"nft list {what}", handles=True)


def tables(ns: str | None) -> list[tuple[str, str]]:
    """(family, name) of every table in `ns`."""
    return [(t["family"], t["name"]) for item in listing(ns, "tables") if (t := item.get("table"))]


def read(ns: str | None, ip_version: int = 4, only: Iterable[tuple[str, str]] | None = None,
         words: bool = False) -> nftset.RuleSet:
    """The rule set of `ns` as an IPv4 or IPv6 packet meets it (the `ip` or `ip6` tables and
    the `inet` ones), or only the tables named by (family, name), with each rule's handle and
    counter.  From the JSON listing (no rule text: nftset.from_json says why); with `words`,
    from `nft -a list`, each rule in the words nft prints, for tables that hold no rule of
    iptables-nft's (whose xt expressions nft would translate through libxtables)."""
    targets = ["ruleset"] if only is None else [f"table {family} {name}" for family, name in only]
    try:
        if words:
            listed = nftset.parse("\n".join(text(ns, what) for what in targets), "nft list ruleset")
        else:
            listed = nftset.from_json([item for what in targets for item in listing(ns, what)])
        return listed.seen_by(ip_version)
    except nftset.NftFormatError as e:  # nft printed something the model does not hold
        raise NftError(f"{ns}: {e}") from None
