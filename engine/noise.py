"""Ray's and torch's own output kept off the user's stderr, and in the run directory's log instead.

simfed's contract is one line on stderr for bad input; libraries write their own lines first.
Ray's C++ GCS client logs to file descriptor 2 before its logging is set up (`gcs_client.cc ...
Failed to get cluster ID`, `rpc_client.h ... Failed to connect`), which no Python logging setting
reaches; torch's weights-only unpickler warns (`UserWarning: Detected pickle protocol ...`)
before it refuses a file. So:

- `captured()` points descriptor 2 at a temporary file while Ray starts or joins a cluster
  (only then: simfed's own progress bar and notes use stderr around it). What was captured is
  kept: `attach(run_dir)` appends it to RUN_DIR/simfed.log once the run has a directory; when the
  start fails, `mention()` names the file in the one-line error.
- `quiet_warnings()` records the warnings of one library call instead of printing them, as log
  records of the "simfed" logger, which `attach` also sends to RUN_DIR/simfed.log.

Ours, not from a paper.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Iterator

LOG = "simfed.log"
logger = logging.getLogger("simfed")
_PENDING: list[str] = []  # captured output and warnings waiting for a run directory
_ATTACHED: list[logging.Handler] = []


class Captured:
    """Where descriptor 2 went during a `captured()` block."""

    def __init__(self, path: Path):
        self.path = path

    def text(self) -> str:
        try:
            return self.path.read_text(errors="replace")
        except OSError:
            return ""

    def mention(self) -> str:
        """' (Ray's own output: PATH)' when something was captured, else ''."""
        return f" (Ray's own output: {self.path})" if self.path.exists() and self.path.stat().st_size else ""


@contextlib.contextmanager
def captured(what: str = "ray") -> Iterator[Captured]:
    """Descriptor 2 to a temporary file for the block. The file is removed when it stays empty; its
    text waits for `attach` when the block succeeds, and the file stays for the error message when not."""
    fd, name = tempfile.mkstemp(prefix=f"simfed-{what}-", suffix=".log")
    out = Captured(Path(name))
    for stream in (sys.stderr, sys.__stderr__):
        with contextlib.suppress(Exception):
            stream.flush()
    saved = os.dup(2)
    os.dup2(fd, 2)
    os.close(fd)
    ok = False
    try:
        yield out
        ok = True
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        text = out.text()
        if ok or not text:
            if text:
                _PENDING.append(text)
            out.path.unlink(missing_ok=True)


@contextlib.contextmanager
def quiet_warnings() -> Iterator[None]:
    """The block's warnings become "simfed" log records (kept for the run's log), not stderr lines."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield
    for w in caught:
        note = f"{w.category.__name__}: {w.message} ({Path(w.filename).name}:{w.lineno})"
        if _ATTACHED:
            logger.debug(note)
        else:
            _PENDING.append(note + "\n")


@contextlib.contextmanager
def attach(run_dir: str | os.PathLike) -> Iterator[None]:
    """For the block: what was kept so far, then the "simfed" logger's records, go to RUN_DIR/simfed.log."""
    path = Path(run_dir) / LOG
    with open(path, "a", encoding="utf-8") as f:
        f.writelines(_PENDING)
    _PENDING.clear()
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logger.addHandler(handler)
    _ATTACHED.append(handler)
    level = logger.level
    logger.setLevel(logging.DEBUG)
    try:
        yield
    finally:
        _ATTACHED.remove(handler)
        logger.removeHandler(handler)
        logger.setLevel(level)
        handler.close()
