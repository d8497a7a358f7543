"""docs/manual-lab.md, run: every ```sh block of the guide, in order, in a lab of its own.

A block may be preceded by HTML comments that the rendered guide hides:
    <!-- expect: TEXT -->     TEXT must appear in the block's output
    <!-- expect-re: REGEX --> REGEX must match a line of the output
    <!-- background -->       runs alongside the next block, as the guide's "terminal 2";
                              it is stopped with SIGINT (the reader's Ctrl-C) once the
                              next block is done, and its expectations are read then.
    <!-- background: stops by itself -->   the same, but waited for, not stopped
                              (--count): a SIGINT could land as it exits.
The guide's lab id `demo` becomes a fresh one, its state directory the one this run's labs
use (ISTIO_LAB_STATE_DIR); `sudo` is dropped (the test runs as root).
Also here: `istio-lab trace`'s answers to bad options.
"""

from __future__ import annotations

import os
import queue
import re
import signal
import subprocess
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from lab.record import STATE_DIR

REPO = Path(__file__).resolve().parent.parent
GUIDE = REPO / "docs" / "manual-lab.md"
GUIDE_LABID = "demo"
GUIDE_STATE_DIR = "/run/istio-iptables-lab"
BLOCK_TIMEOUT = 120  # a guard against a hang, not a measurement
SBIN = "/usr/local/sbin:/usr/sbin:/sbin"  # iptables-legacy and ip, where sudo's secure_path has them
COMMENT = re.compile(r"^<!--\s*(background|expect|expect-re)\s*(?::\s*(.*?))?\s*-->$")


@dataclass
class Block:
    line: int  # where the fence opens, for messages
    script: str
    background: bool = False
    stops_by_itself: bool = False
    expect: list[str] = field(default_factory=list)
    expect_re: list[str] = field(default_factory=list)

    def check(self, output: str, labid: str) -> None:
        for text in self.expect:
            text = as_run(text, labid)
            assert text in output, f"{GUIDE.name}:{self.line}: expected {text!r} in:\n{output}"
        for regex in self.expect_re:
            assert re.search(regex, output, re.M), f"{GUIDE.name}:{self.line}: expected /{regex}/ in:\n{output}"


def blocks(text: str) -> list[Block]:
    """The guide's ```sh blocks with the annotations right above them."""
    lines = text.splitlines()
    out, pending = [], []
    i = 0
    while i < len(lines):
        line = lines[i].strip()
        if line.startswith("<!--"):
            m = COMMENT.match(line)
            assert m, f"{GUIDE.name}:{i + 1}: unknown annotation {line!r}"
            pending.append((m.group(1), m.group(2)))
        elif line == "```sh":
            start = i + 1
            i += 1
            body = []
            while lines[i].strip() != "```":
                body.append(lines[i])
                i += 1
            block = Block(start, "\n".join(body))
            for key, value in pending:
                if key == "background":
                    assert value in (None, "stops by itself"), f"{GUIDE.name}:{start}: background: {value}?"
                    block.background, block.stops_by_itself = True, value is not None
                else:
                    assert value, f"{GUIDE.name}:{start}: {key} needs a value"
                    (block.expect if key == "expect" else block.expect_re).append(value)
            out.append(block)
            pending = []
        elif line:
            assert not pending, f"{GUIDE.name}:{i + 1}: an annotation must sit right above a ```sh block"
        i += 1
    return out


def as_run(script: str, labid: str) -> str:
    script = re.sub(rf"\b{GUIDE_LABID}\b", labid, script)
    script = script.replace(f"{GUIDE_STATE_DIR}/", f"{STATE_DIR}/")
    return re.sub(r"^sudo ", "", script, flags=re.M)


def test_guide_is_well_formed() -> None:
    fences = [line.strip() for line in GUIDE.read_text().splitlines() if line.strip().startswith("```")]
    assert set(fences) <= {"```sh", "```"}, "every fenced block is a ```sh block the test runs"
    found = blocks(GUIDE.read_text())
    assert len(found) >= 20
    for block, after in zip(found, found[1:] + [None]):
        assert block.script.strip(), f"{GUIDE.name}:{block.line}: empty block"
        if block.background:
            assert after is not None and not after.background, \
                f"{GUIDE.name}:{block.line}: a background block needs a foreground block after it"
    for n in range(1, 7):
        assert f"## Type {n}:" in GUIDE.read_text()


# --------------------------------------------------------------- running it
def _env() -> dict[str, str]:
    return {**os.environ, "PATH": f"{SBIN}:{os.environ.get('PATH', '/usr/bin:/bin')}"}


def _bash(script: str) -> list[str]:
    return ["bash", "-e", "-o", "pipefail", "-c", script]


class Background:
    """A block running as the guide's second terminal: ready once it says it is tracing."""

    def __init__(self, block: Block, script: str):
        self.block = block
        self.proc = subprocess.Popen(_bash(script), cwd=REPO, env=_env(), stdin=subprocess.DEVNULL,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                     start_new_session=True)
        self.stderr: list[str] = []
        self.lines: queue.Queue[str | None] = queue.Queue()
        self.reader = threading.Thread(target=self._read_stderr, daemon=True)
        self.reader.start()

    def _read_stderr(self) -> None:
        for line in self.proc.stderr:
            self.stderr.append(line)
            self.lines.put(line)
        self.lines.put(None)

    def wait_ready(self) -> None:
        while True:
            try:
                line = self.lines.get(timeout=BLOCK_TIMEOUT)
            except queue.Empty:
                pytest.fail(f"{GUIDE.name}:{self.block.line}: no 'tracing' line within {BLOCK_TIMEOUT}s")
            if line is None:
                pytest.fail(f"{GUIDE.name}:{self.block.line}: ended before tracing:\n{''.join(self.stderr)}")
            if line.startswith("istio-lab: tracing"):
                return

    def stop(self) -> str:
        """Ctrl-C, unless it stops by itself; its stdout."""
        if not self.block.stops_by_itself:
            os.killpg(self.proc.pid, signal.SIGINT)
        try:
            out, _ = self.proc.communicate(timeout=BLOCK_TIMEOUT)
        finally:
            self.kill()
        self.reader.join(timeout=BLOCK_TIMEOUT)
        assert self.proc.returncode == 0, (
            f"{GUIDE.name}:{self.block.line}: exit {self.proc.returncode}\n{out}{''.join(self.stderr)}")
        return out

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()


def _no_trace_rules(labid: str) -> None:
    """`istio-lab trace` took its TRACE rules away again."""
    for ns in sorted(n for n in os.listdir("/run/netns") if n.startswith(f"ilab-{labid}-")):
        saved = subprocess.run(["ip", "netns", "exec", ns, "iptables-legacy-save", "-t", "raw"], env=_env(),
                               capture_output=True, text=True, check=True).stdout
        assert "-j TRACE" not in saved, f"{ns} still has a TRACE rule:\n{saved}"


@pytest.mark.kernel
def test_every_command_in_the_guide_runs() -> None:
    from lab import record, world

    labid = "man" + world.new_labid()[:5]
    background: Background | None = None
    ran = 0
    try:
        for block in blocks(GUIDE.read_text()):
            script = as_run(block.script, labid)
            if block.background:
                background = Background(block, script)
                background.wait_ready()
                continue
            result = subprocess.run(_bash(script), cwd=REPO, env=_env(), stdin=subprocess.DEVNULL,
                                    capture_output=True, text=True, timeout=BLOCK_TIMEOUT)
            assert result.returncode == 0, (
                f"{GUIDE.name}:{block.line}: exit {result.returncode}\n{script}\n{result.stdout}{result.stderr}")
            block.check(result.stdout, labid)
            ran += 1
            if background is not None:
                background.block.check(background.stop(), labid)
                background = None
                ran += 1
                _no_trace_rules(labid)
    finally:
        if background is not None:
            background.kill()
        if labid in record.known_labids():
            record.destroy(labid)
    assert ran == len(blocks(GUIDE.read_text()))
    assert labid not in record.known_labids(), "the guide's last block should have taken the lab down"


# --------------------------------------------------------------- bad options
@pytest.mark.parametrize("args, message", [
    (["--port", "0"], "istio-lab: port 0 is out of range 1-65535\n"),
    (["--pod", "nope"], "istio-lab: no pod 'nope' in a lab (pods: sidecar, remote, istiod, prometheus, kube-dns)\n"),
    (["--table", "bogus"], "istio-lab: no table 'bogus' (tables: raw, mangle, nat, filter, security, istio-proxy-raw, "
                             "istio-proxy-mangle, istio-proxy-nat)\n"),
    (["--count", "0"], "istio-lab: --count must be at least 1, not 0\n"),
    (["--port"] + " --port ".join(map(str, range(1, 17))).split(),
     "istio-lab: at most 15 ports (the multiport match's limit), not 16\n"),
])
def test_trace_rejects_bad_options_in_one_line(args: list[str], message: str) -> None:
    result = subprocess.run([sys.executable, "-m", "lab.cli", "trace", *args], cwd=REPO,
                            capture_output=True, text=True, stdin=subprocess.DEVNULL)
    assert (result.returncode, result.stdout, result.stderr) == (2, "", message)


@pytest.mark.kernel
def test_trace_names_a_missing_lab() -> None:
    result = subprocess.run([sys.executable, "-m", "lab.cli", "trace", "nosuchlab1"], cwd=REPO,
                            capture_output=True, text=True, stdin=subprocess.DEVNULL)
    assert result.returncode == 2
    assert result.stderr.startswith("istio-lab: no lab 'nosuchlab1' on this machine (labs: ")
    assert result.stderr.count("\n") == 1
