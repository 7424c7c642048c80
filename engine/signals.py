"""SIGINT, SIGTERM and SIGHUP stop a run alike: at a safe point, resumable, exit 128 + the signal.

SIGTERM is what `timeout`, `kill`, Slurm and Kubernetes send, SIGHUP what a closed terminal or
ssh session sends. Python turns only SIGINT into an exception (KeyboardInterrupt), Ray's
`ray.init` sets its own SIGTERM handler (a bare `sys.exit`) and Ray's core worker then installs
absl's failure handler, which dumps every thread's stack ("*** SIGTERM received ***") and aborts
(exit 134): the run's status.json stayed "running". `handled()` gives all three signals one
handler that raises `Interrupted` (a KeyboardInterrupt, so every existing Ctrl-C path applies:
the round loop writes status "interrupted", the CLI prints how to resume and exits 130, 143 or
129); `cluster.connect` calls `reinstall()` after Ray started.

Safe points: `deferred()` marks code that writes a run's files (a checkpoint and its status, a
metrics file, a client's state); a signal that arrives inside is held until the block ends, so
an interrupted run never leaves a half-written temporary file next to its last consistent state.
Outside, the exception is raised at once, as Ctrl-C always did (a round can take minutes, more
than the 30 s Slurm and Kubernetes wait before SIGKILL).

Ours, not from a paper.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from typing import Iterator

SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


class Interrupted(KeyboardInterrupt):
    """A stop signal arrived; `exit_code` is the shell's convention, 128 + the signal number."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


_STATE: dict = {"installed": False, "first": None, "depth": 0, "pending": None}


def _handler(signum: int, frame) -> None:
    if _STATE["first"] is None:
        _STATE["first"] = signum
    if _STATE["depth"]:
        _STATE["pending"] = _STATE["pending"] or signum
        return
    raise Interrupted(signum)


def received() -> int | None:
    """The first stop signal received while handled (None: none)."""
    return _STATE["first"]


def exit_code(exc: BaseException) -> int:
    """128 + the signal of an interruption. Ray's wait loops re-raise what a handler raised as a bare
    KeyboardInterrupt, so that one is matched to the first signal received (else it is SIGINT's 130)."""
    if isinstance(exc, Interrupted):
        return exc.exit_code
    return 128 + (_STATE["first"] or signal.SIGINT)


@contextlib.contextmanager
def handled() -> Iterator[None]:
    """Our handler for SIGINT, SIGTERM and SIGHUP for the duration (main thread only; elsewhere, and
    when already installed, a no-op); the previous handlers come back after."""
    if _STATE["installed"] or threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.getsignal(s) for s in SIGNALS}
    _STATE.update(installed=True, first=None, depth=0, pending=None)
    try:
        reinstall()
        yield
    finally:
        _STATE["installed"] = False
        for s, h in previous.items():
            signal.signal(s, h if h is not None else signal.SIG_DFL)


def reinstall() -> None:
    """Our handlers again, over those a library installed meanwhile (`ray.init` sets SIGTERM's)."""
    if _STATE["installed"] and threading.current_thread() is threading.main_thread():
        for s in SIGNALS:
            signal.signal(s, _handler)


@contextlib.contextmanager
def deferred() -> Iterator[None]:
    """A stop signal that arrives inside the block is raised when the block ends."""
    _STATE["depth"] += 1
    try:
        yield
    finally:
        _STATE["depth"] -= 1
        pending = _STATE["pending"]
        if pending and not _STATE["depth"]:
            _STATE["pending"] = None
            raise Interrupted(pending)
