"""Every profile at once: scenarios × profiles from one process.

`istio-lab run --profile all` (or `--profile a,b,c`) plans each profile's labs as a run of
that profile alone would (runner.plan: one lab per distinct rule set and pod), then builds
them side by side.  Each lab is built and run by a worker process forked from this one once
everything is imported, at most `jobs` at a time, the largest first: a worker is a process
of its own, so its namespaces are created on its own main thread (netns.create must run on
a main thread), and it sends back its scenarios' views through a pipe.  Labs side by side
never see each other: each has its own namespaces, processes and trace readers.  A lab that
cannot be built fails its own scenarios, with the reason, and the others go on.

A worker stops each lab when it is done and removes their namespaces once it is given no
more (world.Lab.stop says why), while the caller writes the report.  A worker dies with its
parent (SIGTERM, on which it tears its labs down); an interrupted matrix stops its workers
and waits for them to tear down before it returns.
"""

from __future__ import annotations

import dataclasses
import os
import pickle
import select
import signal
import struct
import sys
from dataclasses import dataclass

from . import backend as backends
from . import dualstack, interrupts, netns, record, runner, view
from .backend import Backend
from .errors import LabError
from .rules import annotations, profiles, ruleset, xtables
from .scenario import Scenario
from .trace import TraceError
from .view import MatrixView, ScenarioView

ALL = "all"
WORKER = "ilab-worker"  # a worker's process name (ps, /proc/PID/comm)
# Labs side by side by default: each lab's seven processes hold ~55 MB while it runs, its
# worker ~19 MB, so two put a whole matrix run's peak at ~180 MB (scripts/bench), whatever the
# number of profiles.  On two cores a third bought ~7% (the labs contend for CPU and the
# kernel's rtnl lock).
DEFAULT_JOBS = 2
_INDEX = struct.Struct("=I")  # a worker is given a lab by its index in the plan
_LENGTH = struct.Struct("=Q")  # and sends back its views, pickled, after their length


def default_jobs() -> int:
    return max(1, min(os.cpu_count() or 1, DEFAULT_JOBS))


def asked(text: str | None) -> list[str] | None:
    """The profiles `--profile` names when it asks for a matrix (`all`, or names joined by
    commas), else None.  An unknown name is one line (LabError)."""
    if text is None or (text != ALL and "," not in text):
        return None
    if text == ALL:
        return list(profiles.profiles())
    names = [name.strip() for name in text.split(",")]
    if not all(names):
        raise LabError(f"--profile {text!r}: an empty name between commas")
    for name in names:
        profiles.get(name)
    return list(dict.fromkeys(names))


def backend_for(name: str, asked: str, chosen: str) -> str:
    """The backend a profile's labs run on: the one chosen for the run, but nf_tables for a
    native nftables profile when --backend left it to the lab (auto)."""
    return backends.NFT if asked == backends.AUTO and profiles.get(name).native_nftables else chosen


def unrunnable(name: str, backend: str) -> str | None:
    """Why the backend cannot run a profile's rules, or None when it can."""
    if profiles.get(name).native_nftables and backend != backends.NFT:
        return f"a native nftables profile: the {backend} backend cannot apply it (--backend nft runs it)"
    try:
        ruleset.profile(name)
    except LabError as e:
        return f"the lab cannot build its rules: {e}"
    return None


@dataclass(frozen=True)
class Plan:
    profiles: tuple[str, ...]  # the columns that run, in the order asked
    labs: tuple[runner.Lab, ...]  # each with its column's profile
    left_out: tuple[str, ...]  # a profile or a scenario left out, and why


def plan(scenarios: list[Scenario], names: list[str], backend: str, pod: annotations.PodAnnotations | None = None,
         all_asked: bool = True, named: bool = False, asked: str = "") -> Plan:
    """Each profile's labs, on `backend` (or, with `asked` auto, backend_for's).  A profile its
    backend cannot run is left out when `all` asked for it, and an error (LabError) when it
    was named; scenarios are left out of a column as a run of that profile alone leaves them
    out (runner.plan)."""
    columns, labs, left_out = [], [], []
    for name in names:
        on = backend_for(name, asked, backend)
        why = unrunnable(name, on)
        if why and not all_asked:
            raise LabError(f"--profile {name}: {why}")
        if why:
            left_out.append(f"{name}: left out: {why}")
            continue
        mine, skipped = runner.plan(scenarios, runner.Choice(name, None, pod), named)
        left_out += [f"{name}: {line}" for line in skipped]
        if not mine:
            left_out.append(f"{name}: left out: none of the scenarios applies to its rules")
            continue
        columns.append(name)
        labs += [dataclasses.replace(lab, backend=on) for lab in mine]
    return Plan(tuple(columns), tuple(labs), tuple(left_out))


def backends_of(chosen: Plan) -> list[Backend]:
    """The backends the plan's labs run on."""
    return [backends.BACKENDS[name] for name in dict.fromkeys(lab.backend for lab in chosen.labs)]


def start(chosen: Plan, jobs: int) -> "Pool":
    """Start building the labs, at most `jobs` side by side, each on its backend: the workers
    are forked and given their first labs now, and build them while the caller goes on
    (report() gathers)."""
    return Pool(list(chosen.labs), max(1, min(jobs, len(chosen.labs))))


def report(chosen: Plan, pool: "Pool", order: list[Scenario]) -> MatrixView:
    """Every lab's views, gathered by profile, each column in `order` (IPv6 twins after their
    scenario).  The workers then remove their labs' namespaces: pool.finish() waits for
    them (the caller reports meanwhile, and must call it, in a `finally`)."""
    done = pool.gather()
    runs = []
    for name in chosen.profiles:
        views = [v for lab, (views, _) in zip(chosen.labs, done) if lab.profile == name for v in views]
        labids = [labid for lab, (_, labid) in zip(chosen.labs, done) if lab.profile == name and labid]
        on = next(lab.backend for lab in chosen.labs if lab.profile == name)
        runs.append(view.run(_in_order(views, order), " ".join(labids), name, name, (), on))
    return view.matrix(runs, chosen.left_out, " and ".join(b.name for b in backends_of(chosen)), len(chosen.labs),
                       pool.jobs)


def _in_order(views: list[ScenarioView], order: list[Scenario]) -> list[ScenarioView]:
    by_id: dict[str, list[ScenarioView]] = {}
    for v in views:
        by_id.setdefault(v.id.removesuffix(dualstack.SUFFIX), []).append(v)
    return [v for s in order for v in by_id.get(s.id, [])]


def _size(lab: runner.Lab) -> int:
    """How long a lab takes, roughly: its flows, and its build."""
    return len(lab.scenarios) * (2 if lab.rules.dual_stack else 1) + 4


def one_lab(lab: runner.Lab, kept: list | None = None) -> tuple[list[ScenarioView], str]:
    """A lab's views and id, built on its backend; a lab that could not be built gives its
    scenarios as failures.  With `kept`, its namespaces are left there for the caller to
    remove (runner.run_lab)."""
    try:
        results, labid = runner.run_lab(lab, backends.BACKENDS[lab.backend], show_rules=lab.profile, kept=kept)
    except (LabError, TraceError) as e:
        results, labid = runner.failed(lab, f"the lab could not be built: {e}", show_rules=lab.profile), ""
    return [r.view for r in results], labid


def _preload(backend: str) -> None:
    """The backend's libraries imported once, here, for every worker forked after."""
    if backend == backends.LEGACY:
        xtables.preload()
    else:
        try:
            import nftables  # noqa: F401  (pip-nftables; the nft backend imports it on first use)
        except ImportError:
            pass


class Pool:
    """The labs' workers: forked at once, given the largest labs first, a lab at a time."""

    def __init__(self, labs: list[runner.Lab], jobs: int):
        self.labs, self.jobs = labs, jobs
        self.out: list[tuple[list[ScenarioView], str] | None] = [None] * len(labs)
        self.todo = sorted(range(len(labs)), key=lambda i: _size(labs[i]), reverse=True)
        self.workers: list[_Worker] = []
        self.died = False
        if jobs <= 1:
            return  # gather() builds them in this process
        for backend in dict.fromkeys(lab.backend for lab in labs):
            _preload(backend)
        try:
            for _ in range(jobs):
                self._fork()
        except BaseException:
            self.finish()
            raise

    def _fork(self) -> None:
        self.workers.append(_Worker.fork(self.labs, self.workers))
        self.workers[-1].give(self.todo)

    def gather(self) -> list[tuple[list[ScenarioView], str]]:
        """Each lab's views and id, in the labs' order."""
        if self.jobs <= 1:
            with runner.removing([]) as kept:
                return [one_lab(lab, kept) for lab in self.labs]
        try:
            while busy := [w for w in self.workers if w.lab is not None]:
                ready, _, _ = select.select(busy, [], [])
                for worker in ready:
                    i, got = worker.lab, worker.receive()
                    if got is None:  # it died: its lab fails, and a new worker takes its place
                        self.died = True
                        why = f"the lab's worker process {worker.how_it_ended()}"
                        self.out[i] = [r.view for r in runner.failed(self.labs[i], why, self.labs[i].profile)], ""
                        worker.give([])
                        if self.todo:
                            self._fork()
                        continue
                    self.out[i] = got
                    worker.give(self.todo)  # with none left: no more work, it removes its labs' namespaces
        except BaseException:
            self.finish()
            raise
        return self.out

    def finish(self) -> None:
        """Wait for every worker to end (stopping those still at work: an interrupted run);
        reap the lab of one that died."""
        stop = any(w.lab is not None for w in self.workers)
        with interrupts.held():  # a second Ctrl-C must not leave a worker tearing down unwaited
            while self.workers:
                self.workers.pop().finish(stop=stop)
            if self.died:
                self.died = False
                record.reap_orphans()  # a worker that died left its lab: its record's owner is dead


class _Worker:
    """A forked process that builds the labs it is given, one at a time."""

    def __init__(self, pid: int, tasks: int, results: int):
        self.pid, self.tasks, self.results = pid, tasks, results
        self.lab: int | None = None  # the index of the lab it is building
        self.status: int | None = None

    def fileno(self) -> int:
        return self.results

    @classmethod
    def fork(cls, labs: list[runner.Lab], others: list["_Worker"]) -> "_Worker":
        sys.stdout.flush()
        sys.stderr.flush()
        parent = os.getpid()
        with interrupts.held():  # a stop lands once the pid is kept, so the worker is stopped too
            tasks_r, tasks_w = os.pipe()
            results_r, results_w = os.pipe()
            pid = os.fork()
            if pid == 0:
                code = 1
                try:
                    interrupts.forked()
                    netns.name_process(WORKER)
                    for fd in (tasks_w, results_r, *(fd for w in others for fd in (w.tasks, w.results) if fd >= 0)):
                        os.close(fd)  # another worker's pipes: its end of work must reach it
                    if netns.die_with_parent(signal.SIGTERM, parent):
                        _work(labs, tasks_r, results_w)
                    code = 0
                except KeyboardInterrupt:
                    code = 130
                except BaseException:
                    import traceback

                    traceback.print_exc()
                finally:
                    os._exit(code)
            os.close(tasks_r)
            os.close(results_w)
            return cls(pid, tasks_w, results_r)

    def give(self, todo: list[int]) -> None:
        """The next lab, or, with none left, the end of its work."""
        if todo:
            self.lab = todo.pop(0)
            os.write(self.tasks, _INDEX.pack(self.lab))
        else:
            self.lab = None
            self._close_tasks()

    def receive(self) -> tuple[list[ScenarioView], str] | None:
        """The lab's views and id; None when the worker ended before sending them."""
        head = _read(self.results, _LENGTH.size)
        if len(head) < _LENGTH.size:
            self._wait()
            return None
        return pickle.loads(_read(self.results, _LENGTH.unpack(head)[0]))

    def how_it_ended(self) -> str:
        if self.status is None:
            return "ended before sending its results"
        if os.WIFSIGNALED(self.status):
            return f"was killed by {signal.Signals(os.WTERMSIG(self.status)).name}"
        return f"exited with status {os.WEXITSTATUS(self.status)} before sending its results"

    def _close_tasks(self) -> None:
        if self.tasks >= 0:
            os.close(self.tasks)
            self.tasks = -1

    def _wait(self) -> None:
        if self.status is None:
            self.status = os.waitpid(self.pid, 0)[1]

    def finish(self, stop: bool) -> None:
        """Let it end (stop: ask it to, at once) and collect it; it tears down its lab first."""
        self._close_tasks()
        if stop and self.status is None:
            try:
                os.kill(self.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        self._wait()
        if self.results >= 0:
            os.close(self.results)
            self.results = -1


def _read(fd: int, n: int) -> bytes:
    chunks, got = [], 0
    while got < n:
        chunk = os.read(fd, min(n - got, 1 << 20))
        if not chunk:
            break
        chunks.append(chunk)
        got += len(chunk)
    return b"".join(chunks)


def _work(labs: list[runner.Lab], tasks: int, results: int) -> None:
    """A worker's life: build each lab it is given, send its views, until told no more; then
    remove the namespaces of every lab it built (world.Lab.stop says why at the end)."""
    with runner.removing([]) as kept:
        while len(head := _read(tasks, _INDEX.size)) == _INDEX.size:
            _send(results, pickle.dumps(one_lab(labs[_INDEX.unpack(head)[0]], kept)))


def _send(results: int, data: bytes) -> None:
    os.write(results, _LENGTH.pack(len(data)))
    view_bytes = memoryview(data)
    while view_bytes:
        view_bytes = view_bytes[os.write(results, view_bytes):]
