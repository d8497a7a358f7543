"""SIGINT, SIGTERM and SIGHUP stop the harness: they raise KeyboardInterrupt, so every
`with Lab()` unwinds and tears down.

Where that exception lands matters.  Python prints and drops one raised inside a
destructor or an at-fork hook (python-iptables frees buffers in __del__; logging has an
at-fork hook): the stop was lost and `up --hold` waited forever.  And one raised inside
a library between two steps that belong together left it broken: python-iptables freed a
table handle twice (SIGBUS), pyroute2's event loop was left in pieces, the harness kept
the app's fsuid and could not remove its namespaces.  So:

  - a stop not yet raised (held back, or dropped by a destructor) is remembered, and the
    places that wait (start-up, each scenario, `up --hold`, the end of a command) check it;
  - code in a held() block is never interrupted: the KeyboardInterrupt is raised when the
    block ends.  The lab holds it around its calls into python-iptables and pyroute2,
    around namespace switches and around fork.
Once stopping, the harness's last word is its one line: destructors of a library cut
short are not heard.
"""

from __future__ import annotations

import contextlib
import signal
import sys
import warnings
from typing import Iterator

SIGNALS = {signal.SIGINT, signal.SIGTERM, signal.SIGHUP}
_stopped: list[int] = []  # every stop signal received
_pending: list[int] = []  # those whose KeyboardInterrupt is still to be raised
_holding = [0]  # depth of held() blocks


def _stopping(signum: int) -> None:
    _stopped.append(signum)
    warnings.simplefilter("ignore")  # e.g. "coroutine ... was never awaited" from a library cut short


def install() -> None:
    """SIGINT is set explicitly too: a shell starts background commands with it ignored."""

    def stop(signum, frame):
        _stopping(signum)
        if _holding[0]:
            _pending.append(signum)
        else:
            raise KeyboardInterrupt

    def dropped(unraisable, report=sys.unraisablehook):
        if issubclass(unraisable.exc_type, KeyboardInterrupt):
            _pending.append(signal.SIGINT)  # raised in a destructor and dropped: raise it again later
        elif not _stopped:
            report(unraisable)

    for sig in SIGNALS:
        signal.signal(sig, stop)
    sys.unraisablehook = dropped


def check() -> None:
    """Raise KeyboardInterrupt for a stop held back or dropped by a destructor, once."""
    if _pending:
        _pending.clear()
        raise KeyboardInterrupt


@contextlib.contextmanager
def held() -> Iterator[None]:
    """No KeyboardInterrupt from a stop signal inside the block; it is raised as the block ends.

    A flag, not a signal mask: Python runs a signal's handler in the main thread whichever
    thread the kernel gave the signal to (rich's spinner runs one), so a mask on this thread
    would not hold it back.
    """
    _holding[0] += 1
    try:
        yield
    finally:
        _holding[0] -= 1
    if not _holding[0]:
        check()


def are_held() -> bool:
    return _holding[0] > 0


def forked() -> None:
    """In a child forked inside held(): the parent's blocks are not the child's, so it starts
    with nothing held and nothing pending."""
    _holding[0] = 0
    _pending.clear()


def wait() -> None:
    """Until a stop is asked for, then raise KeyboardInterrupt; none can slip in between."""
    old = signal.pthread_sigmask(signal.SIG_BLOCK, SIGNALS)
    try:
        while True:
            check()  # one that came to another thread, or was dropped before
            if got := signal.sigtimedwait(SIGNALS, 1.0):
                _stopping(got.si_signo)
                break
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)
    raise KeyboardInterrupt
