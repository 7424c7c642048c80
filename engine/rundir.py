"""Run-directory ownership: one run at a time per directory, and a status that tells a crash apart.

A run holds an exclusive `flock` on RUN_DIR/.lock for as long as it owns the directory; the file
names the owner (pid, host, start time). The kernel drops the lock when the owner dies however it
dies (kill -9 included), so a lock that can be taken is stale by construction, and a reader that
finds status.json saying "running" while nobody holds the lock reports "interrupted".

Ours, not from a paper. flock works on local filesystems and on NFS (Linux emulates it with POSIX
byte-range locks there); a filesystem without locking makes `acquire` fail with a clear line.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import socket
import time
from pathlib import Path
from typing import Iterator

from simfed.core.errors import SimfedError

LOCK = ".lock"
STATUS = "status.json"

# Locks this process holds: {realpath: [fd, depth]}. flock is per open file, so a second open in
# the same process would conflict with the first; nested holders share one.
_HELD: dict[str, list] = {}


def _owner_text(path: Path) -> str:
    try:
        owner = json.loads(path.read_text() or "{}")
        return f"pid {owner.get('pid', '?')} on {owner.get('host', '?')} since {owner.get('since', '?')}"
    except (OSError, ValueError, AttributeError):
        return "an unknown process"


def _try_lock(fd: int) -> bool:
    # Readers probe the lock for a few microseconds; a launch that meets one retries briefly.
    for _ in range(20):
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except OSError as exc:
            if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise SimfedError(f"cannot lock the run directory ({exc.strerror}); put runs on a filesystem "
                                  "with file locking") from None
            time.sleep(0.025)
    return False


@contextlib.contextmanager
def hold(run_dir: str | os.PathLike) -> Iterator[None]:
    """Own `run_dir` for the duration (creating it); refuse with one line if a live run owns it."""
    run_dir = Path(run_dir)
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise SimfedError(f"cannot create run directory {run_dir}: {exc.strerror}") from None
    key = os.path.realpath(run_dir)
    if key in _HELD:
        _HELD[key][1] += 1
        try:
            yield
        finally:
            _HELD[key][1] -= 1
        return
    path = run_dir / LOCK
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    if not _try_lock(fd):
        os.close(fd)
        raise SimfedError(f"{run_dir} is in use by another run ({_owner_text(path)}); wait for it to end "
                          "or pick another --out")
    owner = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(owner).encode(), 0)
    _HELD[key] = [fd, 1]
    try:
        yield
    finally:
        _HELD.pop(key, None)
        os.ftruncate(fd, 0)
        os.close(fd)  # closing the last descriptor releases the flock


def owner_alive(run_dir: str | os.PathLike) -> bool:
    """Whether some process holds the run directory's lock now."""
    path = Path(run_dir) / LOCK
    if os.path.realpath(run_dir) in _HELD:
        return True
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        return False
    except OSError:
        return True
    finally:
        os.close(fd)  # also drops the probe's lock if it got one


def write_status(run_dir: str | os.PathLike, status: dict) -> None:
    run_dir = Path(run_dir)
    tmp = run_dir / f".{STATUS}.tmp"
    tmp.write_text(json.dumps(status, indent=2))
    os.replace(tmp, run_dir / STATUS)


def read_status(run_dir: str | os.PathLike) -> dict | None:
    """status.json as a reader should see it: "running" only while the owner is alive."""
    path = Path(run_dir) / STATUS
    if not path.is_file():
        return None
    try:
        status = json.loads(path.read_text())
    except OSError as exc:
        return {"state": "unknown", "error": f"{path} is unreadable ({exc.strerror})"}
    except ValueError:  # UnicodeDecodeError included
        return {"state": "unknown", "error": f"{path} is not valid JSON"}
    if not isinstance(status, dict):
        return {"state": "unknown", "error": f"{path} is not a JSON object"}
    if status.get("state") == "running" and not owner_alive(run_dir):
        # The owner died without a word (kill -9, power loss): the last checkpoint still stands.
        status = {**status, "state": "interrupted"}
    return status
