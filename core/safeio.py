"""Reading untrusted files and choosing an output directory, without hangs or surprises.

- Only regular files are opened: opening a FIFO blocks until someone writes to it, and a device
  file can stream forever. `os.stat` answers without opening, so the check itself never blocks.
- Reads are bounded: a file larger than what the caller can use is refused before it is read.
- JSON nested thousands deep raises RecursionError inside the parser; it is reported like any
  other malformed file.
- An output directory is refused when it is or contains its own source (`leaf SRC SRC
  --overwrite` used to delete SRC), when `--overwrite` would replace something that is not a
  partition store, or when the directory it would be created in cannot be written. Missing
  parents are fine: the writer creates them (as `mkdir -p`) when it starts writing.
"""

from __future__ import annotations

import errno
import json
import os
import re
import stat
from pathlib import Path
from typing import Any, Iterable

from simfed.core.errors import SimfedError

JSON_MAX_BYTES = 4 << 30  # LEAF's largest all_data file is ~0.3 GB
# scheme:// (s3://, file:///x) and scheme:/ (what pathlib makes of file:///x): a URI, not a path.
URI = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:/")


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"),
                       (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device")):
        if test(mode):
            return name
    return "not a regular file"


def regular_file(path: str | os.PathLike, what: str = "file") -> int:
    """Size of `path` if it is a regular file (symlinks followed); SimfedError otherwise."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise SimfedError(f"{path}: {what} not found") from None
    except OSError as exc:
        raise SimfedError(f"{path}: cannot read ({exc.strerror})") from None
    if not stat.S_ISREG(st.st_mode):
        raise SimfedError(f"{path}: {what} is {_kind(st.st_mode)}, not a regular file; pass a real "
                          "file")
    return st.st_size


def read_bytes(path: str | os.PathLike, limit: int, what: str = "file") -> bytes:
    """The whole file, refused up front if it is not regular or larger than `limit` bytes."""
    size = regular_file(path, what)
    if size > limit:
        raise SimfedError(f"{path}: {what} is {size:,} bytes; at most {limit:,} are accepted")
    try:
        with open(path, "rb") as f:
            data = f.read(limit + 1)
    except OSError as exc:
        raise SimfedError(f"{path}: cannot read ({exc.strerror})") from None
    if len(data) > limit:  # grew while we read it
        raise SimfedError(f"{path}: {what} is larger than {limit:,} bytes")
    return data


def parse_json(data: bytes | str, where: str) -> Any:
    """json.loads with every failure (syntax, encoding, nesting depth) as one SimfedError."""
    try:
        return json.loads(data)
    except json.JSONDecodeError as exc:
        raise SimfedError(f"{where}: malformed JSON ({exc.msg} at line {exc.lineno})") from None
    except UnicodeDecodeError:
        raise SimfedError(f"{where}: not a UTF-8 JSON file") from None
    except RecursionError:
        raise SimfedError(f"{where}: JSON nested too deeply to be a valid file") from None


def load_json(path: str | os.PathLike, limit: int = JSON_MAX_BYTES, what: str = "JSON file") -> Any:
    return parse_json(read_bytes(path, limit, what), str(path))


def local_path(where: str, path: str | os.PathLike) -> Path:
    """`path` resolved (symlinks followed), refused with one line when it is a URI (only local
    paths are supported where this is called) or a symlink loop."""
    from simfed.core import validate

    text = validate.text(where, os.fspath(path))
    if URI.match(text):
        raise SimfedError(f"{where} {text}: a URI, but only a local path is supported here; give a path on this "
                          "machine")
    try:
        return Path(text).resolve()
    except (RuntimeError, OSError) as exc:  # Python 3.11 raises RuntimeError for a symlink loop
        why = "a symlink loop" if isinstance(exc, RuntimeError) or getattr(exc, "errno", None) == errno.ELOOP \
            else (getattr(exc, "strerror", None) or str(exc))
        raise SimfedError(f"{where} {text}: cannot resolve the path ({why}); point it at a real file or "
                          "directory") from None


def _inside(a: Path, b: Path) -> bool:
    """a is b or lies under b (both resolved)."""
    return a == b or b in a.parents


def is_store(path: Path) -> bool:
    return (path / "manifest.json").is_file() and (path / "clients.parquet").is_file()


def check_output(out: str | os.PathLike, overwrite: bool, sources: Iterable[str | os.PathLike] = ()) -> Path:
    """Refuse an OUT that exists (without --overwrite), overlaps a source, is not replaceable, or
    cannot be created: its nearest existing ancestor must be a writable directory. Missing parents
    are not created here (StoreWriter does it, `missing_parents`): this runs before any input is
    read, and a command refused for bad input must leave nothing behind."""
    if URI.match(os.fspath(out)):
        raise SimfedError(f"{out}: stores can only be written to a local path; write locally and "
                          "copy the directory")
    target = local_path("OUT", out)
    out = Path(out)
    if not out.name or out.name in (".", ".."):
        raise SimfedError(f"{out}: name a new directory for the store (e.g. data/my-store)")
    for src in sources:
        s = local_path("SRC", src)
        # OUT strictly inside SRC is harmless (only OUT is ever replaced); OUT equal to SRC, or
        # SRC inside OUT, would put the source under the directory --overwrite deletes.
        if _inside(s, target):
            raise SimfedError(f"{out}: the output would contain the source {src}; write the store to "
                              "a directory outside the source")
    if os.path.lexists(out):
        if not overwrite:
            raise SimfedError(f"{out}: output already exists; remove it, choose another path or "
                              "pass --overwrite")
        if out.is_symlink() or not out.is_dir():
            raise SimfedError(f"{out}: exists and is not a directory; --overwrite only replaces a "
                              "partition store")
        if not is_store(out) and any(out.iterdir()):
            raise SimfedError(f"{out}: exists and is not a partition store; --overwrite only "
                              "replaces a store (manifest.json + clients.parquet) or an empty "
                              "directory")
    missing = missing_parents(target)
    parent = missing[-1].parent if missing else target.parent
    if not parent.is_dir():
        raise SimfedError(f"{parent}: not a directory, so the output {out} cannot be created under it; "
                          "choose another output path")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise SimfedError(f"{parent}: directory is not writable; choose an output somewhere you "
                          "can write")
    return out


def missing_parents(target: Path) -> list[Path]:
    """The ancestors of `target` that do not exist yet, outermost last (the order mkdir -p creates
    them in, reversed)."""
    out, p = [], target.parent
    while not os.path.lexists(p) and p != p.parent:
        out.append(p)
        p = p.parent
    return out
