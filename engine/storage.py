"""Where a run's client state lives, and whether every node of a cluster can reach it.

Ray's own convention for multi-node storage (Ray Train's `RunConfig(storage_path)`) is followed:
the place is a pyarrow.fs URI (s3://bucket/prefix, gs://..., hdfs://...) or a filesystem path that
every node mounts at the same place, and a marker file written by the driver must be visible from
every worker before any work starts. `engine.storage` names that place; the run's client state goes
to `<engine.storage>/<run name>/client_state`. Unset, it stays in the run directory, which is on
the driver's disk: fine on one machine, refused on a multi-node cluster for a method that keeps
client state (a client trained on node A and sampled on node B would silently start fresh).

Ours, not from a paper.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path

import pyarrow.fs as pafs

from simfed.core.errors import SimfedError
from simfed.partitions.remote import is_uri, redact  # noqa: F401  (redact: part of this module's API)

MARKER = ".simfed-storage-marker"


def resolve(path: str) -> tuple[pafs.FileSystem | None, str]:
    """(filesystem, path inside it) for a URI; (None, absolute path) for a local path.

    Local paths get no pyarrow filesystem: plain os calls suffice, and a process that used
    pyarrow's LocalFileSystem with torch imported was seen to abort at exit (partitions.store)."""
    if is_uri(path):
        try:
            fs, inner = pafs.FileSystem.from_uri(path)
        except Exception as exc:  # pyarrow raises several types for unknown schemes and hosts
            raise SimfedError(f"engine.storage {redact(path)}: cannot open ({exc})") from None
        return fs, inner.rstrip("/")
    local = path[len("file://"):] if path.startswith("file://") else path
    return None, os.path.abspath(local)


def join(base: str, *parts: str) -> str:
    """Append path components to a path or a URI (before its ?query)."""
    if is_uri(base):
        head, sep, query = base.partition("?")
        return "/".join([head.rstrip("/"), *parts]) + (sep + query)
    return str(Path(base, *parts).absolute())


def state_root(storage: str, run_dir: str | os.PathLike) -> str:
    """Where this run's client state goes."""
    if not storage:
        return str(Path(run_dir, "client_state").absolute())
    return join(storage, Path(run_dir).absolute().name, "client_state")


def write_marker(root: str) -> str:
    """Write a fresh marker under `root`; returns its token for the workers to find."""
    fs, base = resolve(root)
    token = secrets.token_hex(8)
    try:
        if fs is None:
            os.makedirs(base, exist_ok=True)
            Path(base, MARKER).write_text(token)
        else:
            fs.create_dir(base)
            with fs.open_output_stream(f"{base}/{MARKER}") as f:
                f.write(token.encode())
    except OSError as exc:
        raise SimfedError(f"cannot write client state at {redact(root)} ({exc}); set engine.storage to a place "
                          "this machine can write") from None
    return token


def sees_marker(root: str, token: str) -> bool:
    """Run on a worker: does this node see the driver's marker?"""
    fs, base = resolve(root)
    try:
        if fs is None:
            return Path(base, MARKER).read_text() == token
        with fs.open_input_stream(f"{base}/{MARKER}") as f:
            return f.read().decode() == token
    except (OSError, UnicodeDecodeError):
        return False


def drop_marker(root: str) -> None:
    """Remove the marker again (a check before the run leaves nothing behind)."""
    fs, base = resolve(root)
    try:
        if fs is None:
            Path(base, MARKER).unlink(missing_ok=True)
        else:
            fs.delete_file(f"{base}/{MARKER}")
    except OSError:
        pass  # a marker left behind is harmless: the next check writes a fresh token


def unshared_message(root: str, storage: str, node: str = "every node") -> str:
    where = (f"client state at {redact(root)} (engine.storage = {redact(storage)!r}) is not visible from {node}"
             if storage else "client state would be kept in the run directory, on this machine's disk, "
             "which the other nodes cannot reach")
    return (f"{where} of this multi-node cluster; set engine.storage to a URI all nodes can reach "
            "(s3://bucket/prefix, gs://...) or a shared filesystem path mounted on every node (/mnt/nfs/simfed)")
