"""Open a page in headless Chromium and keep what a reader would notice.

Chromium is driven over the DevTools protocol on a pipe (--remote-debugging-pipe:
it reads commands on fd 3 and writes answers on fd 4, each a JSON text ending in
NUL), so the visit sees the page's console messages, uncaught exceptions, the
browser's own error log (failed loads) and every URL the page asked for, and
takes a screenshot of the whole page, not only the window.

    python -m tests.browser PAGE.html OUT.png [CSS-SELECTOR]   # e.g. the README's screenshot
"""

from __future__ import annotations

import base64
import fcntl
import json
import os
import select
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run", "--hide-scrollbars",
         "--remote-debugging-pipe")


class BrowserError(RuntimeError):
    pass


@dataclass
class Visit:
    png: bytes = b""
    console_errors: list[str] = field(default_factory=list)  # console.error, exceptions, failed loads
    requests: list[str] = field(default_factory=list)  # every URL the page asked for


def chromium() -> str | None:
    names = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")  # Debian; GitHub's runner
    return next((path for path in map(shutil.which, names) if path), None)


class _Pipe:
    def __init__(self, proc: subprocess.Popen, to_browser: int, from_browser: int, deadline: float):
        self.proc, self.out, self.inp, self.deadline = proc, to_browser, from_browser, deadline
        self.buffer, self.next_id, self.events = b"", 0, []

    def _read(self) -> dict:
        while b"\0" not in self.buffer:
            left = self.deadline - time.monotonic()
            if left <= 0 or not select.select([self.inp], [], [], left)[0]:
                raise BrowserError("Chromium did not answer in time")
            chunk = os.read(self.inp, 1 << 16)
            if not chunk:
                raise BrowserError(f"Chromium closed its DevTools pipe (exit status {self.proc.poll()})")
            self.buffer += chunk
        message, self.buffer = self.buffer.split(b"\0", 1)
        return json.loads(message)

    def call(self, method: str, session: str | None = None, **params) -> dict:
        self.next_id += 1
        message = {"id": self.next_id, "method": method, "params": params}
        if session:
            message["sessionId"] = session
        os.write(self.out, json.dumps(message).encode() + b"\0")
        while True:
            answer = self._read()
            if answer.get("id") != self.next_id:
                self.events.append(answer)
                continue
            if "error" in answer:
                raise BrowserError(f"{method}: {answer['error'].get('message')}")
            return answer.get("result", {})

    def wait_for(self, event: str) -> None:
        while not any(e.get("method") == event for e in self.events):
            self.events.append(self._read())


def _errors_and_requests(events: list[dict]) -> tuple[list[str], list[str]]:
    errors, requests = [], []
    for e in events:
        method, p = e.get("method"), e.get("params", {})
        if method == "Runtime.consoleAPICalled" and p.get("type") in ("error", "assert"):
            errors.append("console: " + " ".join(str(a.get("value", a.get("description", ""))) for a in p["args"]))
        elif method == "Runtime.exceptionThrown":
            details = p["exceptionDetails"]
            errors.append("exception: " + details.get("exception", {}).get("description", details.get("text", "")))
        elif method == "Log.entryAdded" and p["entry"]["level"] == "error":
            errors.append(f"log: {p['entry']['text']} {p['entry'].get('url', '')}".rstrip())
        elif method == "Network.requestWillBeSent":
            requests.append(p["request"]["url"])
    return errors, requests


def _spawn(binary: str, profile: str) -> tuple[subprocess.Popen, int, int]:
    """Chromium with our pipes on its fds 3 (commands) and 4 (answers)."""
    cmd_r, cmd_w = os.pipe()
    ans_r, ans_w = os.pipe()

    def onto_3_and_4():
        high = [fcntl.fcntl(fd, fcntl.F_DUPFD, 10) for fd in (cmd_r, ans_w)]  # out of 3 and 4's way
        os.dup2(high[0], 3)
        os.dup2(high[1], 4)

    try:
        proc = subprocess.Popen([binary, *FLAGS, f"--user-data-dir={profile}", "about:blank"],
                                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                preexec_fn=onto_3_and_4, close_fds=False)  # Python's own fds close on exec
    finally:
        os.close(cmd_r)
        os.close(ans_w)
    return proc, cmd_w, ans_r


def _box(pipe: _Pipe, session: str, selector: str) -> dict:
    """The element's box in page coordinates, with a margin of white around it."""
    script = (f"(() => {{ const r = document.querySelector({json.dumps(selector)}).getBoundingClientRect(), m = 16;"
              " const x = Math.max(0, r.left + scrollX - m), y = Math.max(0, r.top + scrollY - m);"
              " return {x: x, y: y, width: r.right + scrollX + m - x, height: r.bottom + scrollY + m - y}; })()")
    answer = pipe.call("Runtime.evaluate", session, expression=script, returnByValue=True)
    if "exceptionDetails" in answer:
        raise BrowserError(f"no element {selector!r} on the page")
    return answer["result"]["value"]


def visit(url: str, width: int = 1400, selector: str = "", timeout: float = 60.0) -> Visit:
    """Load url at the given window width; the screenshot covers the whole page, or the selected element."""
    binary = chromium()
    if binary is None:
        raise BrowserError("chromium is not installed (sudo scripts/setup installs it)")
    with tempfile.TemporaryDirectory(prefix="ilab-chromium-") as profile:
        proc, to_browser, from_browser = _spawn(binary, profile)
        pipe = _Pipe(proc, to_browser, from_browser, time.monotonic() + timeout)
        try:
            target = pipe.call("Target.createTarget", url="about:blank")["targetId"]
            session = pipe.call("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
            for domain in ("Page", "Runtime", "Log", "Network"):
                pipe.call(f"{domain}.enable", session)
            pipe.call("Emulation.setDeviceMetricsOverride", session, width=width, height=900,
                      deviceScaleFactor=1, mobile=False)
            pipe.events.clear()  # what about:blank did is not the page's
            pipe.call("Page.navigate", session, url=url)
            pipe.wait_for("Page.loadEventFired")
            size = pipe.call("Page.getLayoutMetrics", session)["cssContentSize"]
            clip = {"x": 0, "y": 0, "width": width, "height": size["height"], "scale": 1}
            if selector:
                clip.update(_box(pipe, session, selector))
            shot = pipe.call("Page.captureScreenshot", session, format="png", captureBeyondViewport=True, clip=clip)
            errors, requests = _errors_and_requests(pipe.events)
            pipe.call("Browser.close")
            return Visit(base64.b64decode(shot["data"]), errors, requests)
        finally:
            os.close(to_browser)
            os.close(from_browser)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def main(argv: list[str]) -> int:
    page, out = Path(argv[0]).resolve(), Path(argv[1])
    seen = visit(page.as_uri(), selector=argv[2] if len(argv) > 2 else "")
    out.write_bytes(seen.png)
    for e in seen.console_errors:
        print(f"browser: {e}", file=sys.stderr)
    print(f"wrote {out} ({len(seen.png)} bytes)")
    return 1 if seen.console_errors else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
