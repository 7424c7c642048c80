"""Per-client persistent state, versioned so that checkpoints and retries stay exact.

Each write is a new file `<root>/<cid % 1000>/<cid>/r<round>p<phase>.pt`, and a read returns the
newest version strictly before the current (round, phase). So a retried chunk sees exactly what the
first attempt saw, and resuming from a checkpoint at round R only has to delete the versions
written after R. Old versions are removed once a newer one is covered by a checkpoint.

The root is a local path or any pyarrow.fs URI (engine.storage). Local files are written to a
temporary name and renamed; an object store makes an object visible only once it is complete, so
there a plain write is already atomic.
"""

from __future__ import annotations

import io
import os
import re
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs
import torch

from simfed.engine import noise, signals
from simfed.engine.storage import resolve
from simfed.core.errors import SimfedError

_NAME = re.compile(r"^r(\d+)p(\d+)\.pt$")


def _load(path: Path, mmap: bool = False) -> Any:
    from simfed.core.safeio import regular_file

    regular_file(path, "client state file")  # a FIFO would block torch.load forever
    try:
        with noise.quiet_warnings():  # torch warns about a foreign pickle before it refuses it
            return torch.load(path, weights_only=True, mmap=mmap)
    except Exception as exc:  # damaged zip, truncated file, or a pickle weights_only refuses
        raise SimfedError(f"{path}: cannot load client state ({type(exc).__name__}); the run directory is "
                          "damaged: restore the file or start a new run") from None


class ClientStateStore:
    def __init__(self, root: str | os.PathLike):
        self.root = str(root)
        self._fs, self._base = resolve(self.root)

    def __reduce__(self):  # a filesystem object need not pickle; the URI does
        return (ClientStateStore, (self.root,))

    def _dir(self, cid: int) -> str:
        return f"{self._base}/{cid % 1000:03d}/{cid}"

    def _list(self, d: str, recursive: bool = False) -> list[str]:
        """Paths of the files under `d` ([] if it does not exist)."""
        if self._fs is None:
            if not os.path.isdir(d):
                return []
            if recursive:
                return [str(p) for p in Path(d).glob("*/*/*") if p.is_file()]
            return [f"{d}/{name}" for name in os.listdir(d)]
        infos = self._fs.get_file_info(pafs.FileSelector(d, recursive=recursive, allow_not_found=True))
        return [i.path for i in infos if i.type == pafs.FileType.File]

    def _versions(self, cid: int) -> list[tuple[int, int, str]]:
        out = []
        for path in self._list(self._dir(cid)):
            m = _NAME.match(path.rsplit("/", 1)[-1])
            if m:
                out.append((int(m.group(1)), int(m.group(2)), path))
        return sorted(out)

    def _delete(self, path: str) -> None:
        if self._fs is None:
            Path(path).unlink(missing_ok=True)
        else:
            self._fs.delete_file(path)

    def get(self, cid: int, round: int, phase: int) -> Any:
        """The newest state written before (round, phase), or None for a client never trained."""
        for r, p, path in reversed(self._versions(cid)):
            if (r, p) < (round, phase):
                if self._fs is None:
                    return _load(Path(path))
                try:
                    with self._fs.open_input_stream(path) as f, noise.quiet_warnings():
                        return torch.load(io.BytesIO(f.read()), weights_only=True)
                except Exception as exc:  # damaged zip, truncated file, or a pickle weights_only refuses
                    raise SimfedError(f"{path}: cannot load client state ({type(exc).__name__}); restore the "
                                      "file or start a new run") from None
        return None

    def check(self, before_round: int) -> int:
        """Open every version a resumed run may read (rounds < before_round) without loading its
        tensors (mmap); a damaged file fails here, before any work, not inside a worker."""
        if self._fs is not None:  # remote state: a damaged file fails as it is read
            return 0
        root = Path(self._base)
        if not root.is_dir():
            return 0
        n = 0
        for path in sorted(root.glob("*/*/r*p*.pt")):
            m = _NAME.match(path.name)
            if m and int(m.group(1)) < before_round:
                _load(path, mmap=True)
                n += 1
        return n

    def put(self, cid: int, round: int, phase: int, state: Any, checkpointed_round: int = -1) -> None:
        d = self._dir(cid)
        final = f"{d}/r{round:06d}p{phase:02d}.pt"
        if self._fs is None:
            os.makedirs(d, exist_ok=True)
            tmp = f"{d}/.r{round:06d}p{phase:02d}.pt.{os.getpid()}.tmp"
            with signals.deferred():  # in-process (serial backend): no half-written file on a stop signal
                torch.save(state, tmp)
                os.replace(tmp, final)
        else:
            buf = io.BytesIO()
            torch.save(state, buf)
            with self._fs.open_output_stream(final) as f:
                f.write(buf.getbuffer())
        self._collect(cid, checkpointed_round)

    def _collect(self, cid: int, checkpointed_round: int) -> None:
        # Keep every version after the last checkpoint, and the newest one it covers.
        covered = [v for v in self._versions(cid) if v[0] < checkpointed_round]
        for _, _, path in covered[:-1]:
            self._delete(path)

    def truncate_after(self, round: int) -> int:
        """Delete versions written in rounds >= `round` (resume from a checkpoint taken after round-1)."""
        removed = 0
        for path in self._list(self._base, recursive=True):
            m = _NAME.match(path.rsplit("/", 1)[-1])
            if m and int(m.group(1)) >= round:
                self._delete(path)
                removed += 1
        return removed
