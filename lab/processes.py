"""Start a lab's processes, know when they are ready, and notice when one dies.

Every process is forked by netns.spawn with its config as plain Python objects.  Readiness
is read from /proc, never probed with a connection: a probe would itself be traffic (rule
counters, TRACE events, access-log lines) in a lab whose witnesses must see only the
scenario.  A process is ready when the sockets it owns (/proc/PID/fd) include a LISTEN
socket on each of its addresses and an ESTABLISHED one to each peer it must dial, as its
namespace's socket tables show (sock_diag, lab.sockdiag), and a bound UDP socket on each
of its datagram addresses (/proc/PID/net/udp).  They start in three waves: the
listeners; then pilot-agent, whose first dial to istiod and first /ready poll then succeed;
then the scraper, whose first round is its readiness.  After start() returns, no process
opens a connection until the harness asks for one.
"""

from __future__ import annotations

import functools
import os
import signal
import time
from dataclasses import dataclass
from typing import Callable

from . import dns, interrupts, netns, plan, podspec, procfs, proxylogs, sockdiag, workloads
from .addr import Address
from .errors import LabError
from .proxylogs import ACCESS_LOG, DNS_PROXY_LOG, ISTIOD_LOG, KUBE_DNS_LOG, SCRAPE_LOG
from .sidecar import agent, dnsproxy, envoy
from .world import Lab

KUBE_DNS_UID = KUBE_DNS_GID = 65532  # CoreDNS's image runs as nonroot
ISTIOD_UID = ISTIOD_GID = 1337  # istiod's own Deployment runs as 1337 too
PROMETHEUS_UID = PROMETHEUS_GID = 65534  # nobody, as the Prometheus image runs


@dataclass(frozen=True)
class Spec:
    """One process of the lab: where it runs, as whom, what it runs, when it is ready."""

    name: str
    pod: str
    uid: int
    gid: int
    run: Callable[[], None]
    listens: tuple[Address, ...] = ()
    dials: tuple[Address, ...] = ()  # peers it holds an established connection to
    datagrams: tuple[Address, ...] = ()  # UDP addresses it is bound to
    capabilities: tuple[str, ...] = ()  # all others are dropped


class ProcessDied(LabError):
    """A lab process that exited; the message is one line, `log_tail` has the rest."""

    def __init__(self, name: str, how: str, log_path: str):
        self.name, self.log_tail = name, tail(log_path)
        last = self.log_tail.strip().splitlines()[-1:] or ["(nothing on stderr)"]
        super().__init__(f"{name} {how}: {last[0]} (log: {log_path})")


def log_path(lab: Lab, name: str) -> str:
    """The process's stdout+stderr."""
    return os.path.join(lab.run_dir, f"{name}.log")


def scrape_targets(lab: Lab) -> tuple[tuple[str, int, str], ...]:
    ip = lab.pods["sidecar"].ip
    return ((ip, plan.Port.STATS, "/stats/prometheus"), (ip, plan.Port.AGENT, "/stats/prometheus"))


def _servers(lab: Lab, dns_proxy: bool, one_listener: bool = False) -> list[Spec]:
    P, run_dir = plan.Port, lab.run_dir
    mode = lab.record.inbound_mode
    proxy = lab.sidecar_identity
    families = (4, 6) if lab.ipv6 else (4,)
    envoy_config = envoy.Config(os.path.join(run_dir, ACCESS_LOG), envoy.endpoints_from(), inbound_mode=mode,
                                families=families, inbound=lab.spec.envoy_inbound,
                                service_ports=envoy.pod_service_ports("sidecar"), one_listener=one_listener)
    istiod = lab.pods["istiod"]
    dns_config = dnsproxy.Config(os.path.join(run_dir, DNS_PROXY_LOG), dns.service_names()) if dns_proxy else None
    dns_listens = (dns_config.listen,) if dns_config else ()
    agent_config = agent.Config(istiods=tuple((ip, P.ISTIOD) for ip in (istiod.ip, istiod.ip6) if ip), dns=dns_config)
    kube_dns = _kube_dns_config(lab)

    def anywhere(*ports: int) -> tuple[Address, ...]:
        return tuple(Address(plan.WILDCARD[f], port) for port in ports for f in families)

    app = workloads.AppConfig("sidecar", P.SIDECAR_APP, families, localhost_only=lab.spec.app_localhost)
    remote = workloads.AppConfig("remote", P.REMOTE_APP, families, udp_echo=True)

    def addresses(*pairs: tuple[str, int]) -> tuple[Address, ...]:
        return tuple(Address(*pair) for pair in pairs)

    return [
        Spec("envoy", "sidecar", proxy.uid, proxy.gid, functools.partial(envoy.run, envoy_config),
             listens=anywhere(P.OUTBOUND, P.INBOUND, P.STATS, P.READY)
             + tuple(Address(plan.LOCALHOST[f], P.ADMIN) for f in families),
             capabilities=proxy.capabilities),
        Spec("pilot-agent", "sidecar", proxy.uid, proxy.gid, functools.partial(agent.run, agent_config),
             listens=addresses(("0.0.0.0", P.AGENT), *dns_listens), dials=addresses(*agent_config.istiods),
             datagrams=addresses(*dns_listens),
             capabilities=proxy.capabilities),
        Spec("app-sidecar", "sidecar", plan.APP_UID, plan.APP_GID, functools.partial(workloads.run_app, app),
             listens=tuple(Address(host, P.SIDECAR_APP) for host in app.hosts)),
        Spec("app-remote", "remote", plan.APP_UID, plan.APP_GID, functools.partial(workloads.run_app, remote),
             listens=anywhere(P.REMOTE_APP), datagrams=anywhere(P.REMOTE_APP)),
        Spec("istiod", "istiod", ISTIOD_UID, ISTIOD_GID,
             functools.partial(workloads.run_istiod,
                               workloads.IstiodConfig(os.path.join(run_dir, ISTIOD_LOG), families=families)),
             listens=anywhere(P.ISTIOD)),
        Spec("kube-dns", "kube-dns", KUBE_DNS_UID, KUBE_DNS_GID,
             functools.partial(workloads.run_kube_dns, kube_dns), listens=addresses(*kube_dns.tcp),
             datagrams=addresses(*kube_dns.udp)),
    ]


def _kube_dns_config(lab: Lab) -> workloads.KubeDnsConfig:
    """UDP on each address it answers from (the resolver's, its pod IP); TCP on any."""
    udp = tuple((ip, plan.Port.DNS) for ip in (*plan.HELD_VIPS["kube-dns"], lab.pods["kube-dns"].ip))
    return workloads.KubeDnsConfig(os.path.join(lab.run_dir, KUBE_DNS_LOG), udp=udp,
                                   tcp=((plan.WILDCARD[4], plan.Port.DNS),))


def _scraper(lab: Lab) -> Spec:
    config = workloads.ScraperConfig(os.path.join(lab.run_dir, SCRAPE_LOG), scrape_targets(lab))
    return Spec("prometheus", "prometheus", PROMETHEUS_UID, PROMETHEUS_GID,
                functools.partial(workloads.run_scraper, config))


def start(lab: Lab, inbound_mode: str = "REDIRECT", timeout: float = 3.0, dns_proxy: bool = False,
          one_listener: bool = False) -> None:
    """Spawn every process, record their pids, and return once all are ready.

    `inbound_mode` is the sidecar rules' (routing.inbound_mode): Envoy's inbound listener
    and the sidecar's identity follow it, as Istio's injection does.  `dns_proxy`: pilot-agent
    runs its DNS proxy, as when the pod's rules capture DNS.  `one_listener`: the rules send
    inbound traffic to Envoy's outbound port, and Envoy tells the two apart there.

    All or nothing: on any failure the processes this call spawned are killed by pid and
    reaped before the error (LabError, or ProcessDied naming the one that died) goes up.
    Teardown alone could miss a child forked but not yet inside its pod's namespace.
    """
    if not lab.up:
        raise LabError(f"lab {lab.labid} is not up: create it before starting processes")
    if lab.record.pids:
        raise LabError(f"lab {lab.labid} already runs {', '.join(lab.record.pids)}")
    lab.record.inbound_mode = inbound_mode
    try:
        _start(lab, time.monotonic() + timeout, dns_proxy, one_listener)
    except BaseException:
        for name in lab.record.pids:
            _kill(lab, name)
        raise


def _start(lab: Lab, deadline: float, dns_proxy: bool, one_listener: bool = False) -> None:
    proxy = lab.sidecar_identity
    for name, uid, gid in ((ACCESS_LOG, proxy.uid, proxy.gid), (DNS_PROXY_LOG, proxy.uid, proxy.gid),
                           (ISTIOD_LOG, ISTIOD_UID, ISTIOD_GID), (SCRAPE_LOG, PROMETHEUS_UID, PROMETHEUS_GID),
                           (KUBE_DNS_LOG, KUBE_DNS_UID, KUBE_DNS_GID)):
        proxylogs.create(lab.run_dir, name, uid, gid)

    specs = _servers(lab, dns_proxy, one_listener)
    if lab.spec.stage == podspec.INIT:  # only istio-init has run in the sidecar pod: its containers are not up
        specs = [s for s in specs if s.pod != "sidecar"]
    listeners, dialers = [s for s in specs if not s.dials], [s for s in specs if s.dials]
    for wave in (listeners, dialers):  # dialers once their peers listen: first dial and poll succeed
        _spawn(lab, wave)
        _wait(lab, {s.name: functools.partial(_sockets_missing, lab.record.pids[s.name], s, lab.pods[s.pod].ns)
                    for s in wave}, deadline)
    if lab.spec.stage == podspec.INIT:  # nothing in the sidecar pod to scrape yet
        return
    prometheus = _scraper(lab)
    _spawn(lab, [prometheus])
    _wait(lab, {prometheus.name: functools.partial(_scrapes_missing, lab, len(scrape_targets(lab)))}, deadline)
    failed = [s for s in proxylogs.read(lab.run_dir, SCRAPE_LOG) if s["status"] != 200]
    if failed:
        raise LabError(f"prometheus: first scrape of {failed[0]['target']} failed: "
                       f"{failed[0]['error'] or 'HTTP ' + str(failed[0]['status'])}")


def _spawn(lab: Lab, specs: list[Spec]) -> None:
    with interrupts.held():  # a Ctrl-C lands after the pids are recorded, so start() can kill them
        for s in specs:
            lab.record.pids[s.name] = netns.spawn(lab.pods[s.pod].ns, s.run, name=s.name, uid=s.uid, gid=s.gid,
                                                  log_path=log_path(lab, s.name),
                                                  die_with_parent=not lab.record.detached,
                                                  capabilities=s.capabilities)
    lab.record.save()


def _wait(lab: Lab, pending: dict[str, Callable[[], str | None]], deadline: float) -> None:
    """Poll each process's check (None when ready, else what is missing) until all pass."""
    pause = 0.001
    while True:
        interrupts.check()
        missing = {}
        for name, ready in pending.items():
            check(lab, name)
            if (what := ready()) is not None:
                missing[name] = what
        if not missing:
            return
        if time.monotonic() > deadline:
            name, what = next(iter(missing.items()))
            raise LabError(f"{name} not ready in time: {what}; last logged: {_last_line(log_path(lab, name))} "
                           f"(log: {log_path(lab, name)})")
        pending = {name: pending[name] for name in missing}
        time.sleep(pause)
        pause = min(pause * 2, 0.002)  # a check is cheap (sock_diag, /proc): a coarse poll would cost start-up time


def _kill(lab: Lab, name: str) -> None:
    pid = lab.record.pids[name]
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    _exit_status(lab.labid, pid, wait=True)


def check_alive(lab: Lab, grace: float = 0.0) -> None:
    """Raise ProcessDied for the first recorded process that is no longer running.

    With `grace`, keep looking that long: a killed process closes its sockets (its clients
    see a reset) a moment before it is a zombie that waitid reports, so a flow that just
    failed asks again before blaming the flow rather than the process."""
    deadline = time.monotonic() + grace
    while True:
        for name in lab.record.pids:
            check(lab, name)
        if time.monotonic() >= deadline:
            return
        time.sleep(0.005)


def check(lab: Lab, name: str) -> None:
    """Raise ProcessDied if process `name` has ended."""
    how = _exit_status(lab.labid, lab.record.pids[name])
    if how:
        raise ProcessDied(name, how, log_path(lab, name))


_ended: dict[tuple[str, int], str] = {}  # (labid, pid) -> how it ended, for children already reaped


def _exit_status(labid: str, pid: int, wait: bool = False) -> str | None:
    """How the process ended, or None while it runs (with `wait`, once it has ended).

    A dead child is reaped here: teardown finds processes by their network namespace,
    which a zombie no longer has, so a zombie left for it would outlive the lab.
    """
    if (labid, pid) in _ended:
        return _ended[labid, pid]
    try:
        info = os.waitid(os.P_PID, pid, os.WEXITED | (0 if wait else os.WNOHANG))
    except ChildProcessError:  # not our child (a lab started by another process)
        return None if procfs.running(pid) else "exited"
    if info is None:
        return None
    if info.si_code == os.CLD_EXITED:
        how = f"exited with status {info.si_status}"
    else:
        how = f"was killed by {signal.Signals(info.si_status).name}"
    _ended[labid, pid] = how
    return how


def _sockets_missing(pid: int, spec: Spec, ns: str) -> str | None:
    """What the process does not hold yet: its own sockets (/proc/PID/fd) among its namespace's
    TCP sockets (sock_diag) and UDP ones (/proc).  Established sockets are asked for once it
    listens on all it must: that dump walks the host's established hash (about 1 ms)."""
    families = (4, 6) if any(a.family == 6 for a in spec.listens + spec.dials) else (4,)
    try:
        owned = procfs.socket_inodes(pid)
        tcp = [s for s in sockdiag.tcp(ns, {sockdiag.TCP_LISTEN}, families) if s.inode in owned]
        listening = {s.local for s in tcp}
        missing = [f"listening on {a}" for a in spec.listens if a not in listening]
        connected = set()
        if spec.dials and not missing:
            connected = {s.remote for s in sockdiag.tcp(ns, {sockdiag.TCP_ESTABLISHED}, families) if s.inode in owned}
        udp = procfs.sockets(pid, "udp", any(a.family == 6 for a in spec.datagrams)) if spec.datagrams else []
    except OSError as e:
        return f"cannot read its sockets: {e}"
    bound = {s.local for s in udp}
    missing += [f"connected to {a}" for a in spec.dials if a not in connected]
    missing += [f"bound to udp {a}" for a in spec.datagrams if a not in bound]
    return "not " + ", not ".join(missing) if missing else None


def _scrapes_missing(lab: Lab, want: int) -> str | None:
    got = len(proxylogs.read(lab.run_dir, SCRAPE_LOG))
    return None if got >= want else f"{got} of {want} scrapes logged"


def tail(path: str, lines: int = 20) -> str:
    try:
        with open(path, errors="replace") as f:
            return "".join(f.readlines()[-lines:])
    except OSError:
        return ""


def _last_line(path: str) -> str:
    return tail(path, 1).strip() or "(nothing logged)"


def wait_for_scrapes(lab: Lab, want: int, timeout: float) -> None:
    """Until the scraper has logged `want` scrapes in all."""
    _wait(lab, {"prometheus": functools.partial(_scrapes_missing, lab, want)}, time.monotonic() + timeout)
