"""A pod's own rules: an iptables-save dump taken from a real pod, checked and fitted to the lab.

    nsenter -t PID -n iptables-save > pod.rules      # on the node, PID of any process of the pod
    istio-lab run --rules pod.rules

The lab's stub Envoy listens on 15001 (outbound) and 15006 (inbound) and runs, with the
stub pilot-agent, as uid/gid 1337.  A dump's proxy uid, gid and ports are read from its
owner matches and REDIRECT/TPROXY targets (or given as options); where they differ from
the lab's they are renumbered to the lab's, and the notes say so.  A dump whose inbound and
outbound redirects share one port (Istio 1.0 and 1.1, 1.5 with listed inbound ports) keeps
it: that port is the lab's outbound one, and Envoy serves both sides there.

Any dump is a fair question about one flow (`probe`, `predict`): an uninjected pod's, or
one whose init container failed, has no Istio chain, and its flows simply meet none.
Only `run`'s article scenarios need Istio's rules (`scenarios=True`): a dump that would
leave them meaningless (no ISTIO_OUTPUT reached from OUTPUT, no redirect to an outbound
port, no owner match to let the proxy's own traffic out) is refused for them, with the
line or table at fault.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field, replace

from .. import plan
from ..errors import LabError
from . import profiles, save

LAB_PORTS = {"outbound": plan.Port.OUTBOUND, "inbound": plan.Port.INBOUND}


@dataclass
class Foreign:
    file: str
    dump: save.Dump  # as it goes into the sidecar pod, renumbered to the lab's uid and ports
    profile: str | None  # the profile whose rules it holds exactly, if any
    notes: list[str] = field(default_factory=list)


def load(file: str, proxy_uid: int | None = None, proxy_gid: int | None = None,
         outbound_port: int | None = None, inbound_port: int | None = None, scenarios: bool = True) -> Foreign:
    try:
        with open(file) as f:
            text = f.read()
    except OSError as e:
        raise LabError(f"{file}: cannot read: {e.strerror}") from None
    except UnicodeDecodeError:
        raise LabError(f"{file}: not a text file (give the output of iptables-save)") from None
    try:
        dump = save.parse(text, source=file)
    except save.SaveFormatError as e:
        raise LabError(str(e)) from None
    for rule in (r for t in dump.tables.values() for r in t.rules):
        addresses = [rule.args[i + 1] for i, a in enumerate(rule.args[:-1]) if a in ("-s", "-d")]
        if any(":" in a for a in addresses):
            raise LabError(f"{file}:{rule.lineno}: an IPv6 address: this is ip6tables-save's dump; "
                           f"--rules takes iptables-save's (IPv4)")
    notes = []
    istio = _istio(dump)
    if scenarios:
        _usable_nat(file, dump)
    elif not istio:
        notes.append("no Istio chain: the pod's traffic meets no Istio rule (an uninjected pod, or one whose "
                     "init container failed)")
    uid = _owner(file, dump, "uid", proxy_uid, notes)
    gid = _owner(file, dump, "gid", proxy_gid, notes)
    if uid is None and gid is None and scenarios:
        raise LabError(f"{file}: no --uid-owner or --gid-owner rule: nothing lets the proxy's own traffic out "
                       f"(Envoy would capture its own connections)")
    nat = dump.tables.get("nat") or save.TableDump("nat")
    outbound = _port(file, nat, "ISTIO_REDIRECT", "outbound", outbound_port, required=scenarios)
    ports = {"outbound": outbound, "inbound": _inbound_port(file, dump, inbound_port, notes if istio else [])}
    if ports["inbound"] is not None and ports["inbound"] == outbound and inbound_port is None:
        ports["inbound"] = None  # one port for both: it stays the outbound one (renumbering it would move both)
        notes.append(f"inbound and outbound are redirected to one port, {outbound}: Envoy serves both there "
                     f"and tells them apart by the original destination (Istio 1.0, 1.1)")
    changes = _changes(uid, gid, ports)
    notes += [f"{what} {theirs} is the lab's {ours} here: renumbered" for what, _, theirs, ours in changes]
    fitted = _renumber(dump, changes)
    return Foreign(file, fitted, profiles.match(fitted), notes)


def _istio(dump: save.Dump) -> bool:
    """Does the dump hold any of Istio's chains?"""
    return any(c.startswith("ISTIO_") for t in dump.tables.values() for c in t.chains)


def _usable_nat(file: str, dump: save.Dump) -> save.TableDump:
    nat = dump.tables.get("nat")
    if nat is None:
        raise LabError(f"{file}: no *nat table: Istio's sidecar redirects in nat (is this an iptables-save of the pod?)")
    if "ISTIO_OUTPUT" not in nat.chains:
        raise LabError(f"{file}: *nat has no ISTIO_OUTPUT chain: the scenarios' outbound traffic would meet no Istio rule")
    jumps = [r for r in nat.chain_rules("OUTPUT") if r.target == "ISTIO_OUTPUT"]
    if not jumps:
        raise LabError(f"{file}: nat OUTPUT never jumps to ISTIO_OUTPUT (no '-A OUTPUT ... -j ISTIO_OUTPUT')")
    return nat


def _owner(file: str, dump: save.Dump, kind: str, given: int | None, notes: list[str]) -> int | None:
    """The proxy's uid (or gid): the one the owner matches name, or the option."""
    if given is not None:
        return given
    seen = Counter(int(v) for t in dump.tables.values() for r in t.rules
                   if (v := r.option(f"--{kind}-owner")) is not None and v.isdigit())
    if not seen:
        return None
    if len(seen) > 1:
        if plan.PROXY_UID in seen:  # "-u 1337,0": Istio's own user besides another
            notes.append(f"--{kind}-owner names {', '.join(map(str, sorted(seen)))}: the proxy is {plan.PROXY_UID}")
            return plan.PROXY_UID
        line = next(r.lineno for t in dump.tables.values() for r in t.rules if r.option(f"--{kind}-owner"))
        raise LabError(f"{file}:{line}: --{kind}-owner names {', '.join(map(str, sorted(seen)))}: "
                       f"say which is the proxy's with --proxy-{kind}")
    (found,) = seen
    return found


def _port(file: str, nat: save.TableDump, chain: str, role: str, given: int | None,
          required: bool = True) -> int | None:
    if given is not None:
        return given
    ports = [(r, r.option("--to-ports")) for r in nat.chain_rules(chain) if r.target == "REDIRECT"]
    if not ports and not required:
        return None
    if not ports:
        raise LabError(f"{file}: no '-A {chain} ... -j REDIRECT --to-ports PORT': nothing sends outbound "
                       f"traffic to Envoy (give --{role}-port if the redirect is elsewhere)")
    rule, port = ports[0]
    if port is None or not port.isdigit():
        raise LabError(f"{file}:{rule.lineno}: {rule}: REDIRECT to {port!r}, not one port "
                       f"(give --{role}-port)")
    return int(port)


def _inbound_port(file: str, dump: save.Dump, given: int | None, notes: list[str]) -> int | None:
    """Envoy's inbound port: ISTIO_IN_REDIRECT's REDIRECT, or TPROXY's --on-port; None without inbound capture."""
    if given is not None:
        return given
    nat = dump.tables.get("nat") or save.TableDump("nat")
    if any(r.target == "REDIRECT" for r in nat.chain_rules("ISTIO_IN_REDIRECT")):
        return _port(file, nat, "ISTIO_IN_REDIRECT", "inbound", None)
    mangle = dump.tables.get("mangle")
    for rule in mangle.rules if mangle else ():
        if rule.target == "TPROXY":
            port = rule.option("--on-port")
            if port is None or not port.isdigit():
                raise LabError(f"{file}:{rule.lineno}: {rule}: TPROXY without --on-port")
            return int(port)
    notes.append("no inbound redirect: inbound traffic goes straight to the app")
    return None


def _changes(uid: int | None, gid: int | None, ports: dict[str, int | None]) -> list[tuple[str, tuple[str, ...], int, int]]:
    """(what, the options that carry it, the dump's value, the lab's) for each value that differs."""
    wanted = [("proxy uid", ("--uid-owner",), uid, plan.PROXY_UID),
              ("proxy gid", ("--gid-owner",), gid, plan.PROXY_GID),
              ("outbound port", ("--to-ports",), ports["outbound"], LAB_PORTS["outbound"]),
              ("inbound port", ("--to-ports", "--on-port"), ports["inbound"], LAB_PORTS["inbound"])]
    return [(what, options, theirs, ours) for what, options, theirs, ours in wanted if theirs not in (None, ours)]


def _renumber(dump: save.Dump, changes: list[tuple[str, tuple[str, ...], int, int]]) -> save.Dump:
    """The dump with the proxy's uid, gid and ports replaced by the lab's, everything else as given."""
    if not changes:
        return dump
    swaps: dict[str, dict[str, str]] = {}
    for _, options, theirs, ours in changes:
        for option in options:
            swaps.setdefault(option, {})[str(theirs)] = str(ours)
    out = save.Dump(family=dump.family)
    for name, table in dump.tables.items():
        rules = []
        for rule in table.rules:
            args = list(rule.args)
            for i, arg in enumerate(args[:-1]):
                if arg in swaps:
                    args[i + 1] = swaps[arg].get(args[i + 1], args[i + 1])
            rules.append(replace(rule, args=tuple(args)))
        out.tables[name] = replace(table, rules=rules)
    return out
