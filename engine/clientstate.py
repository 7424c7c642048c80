"""Per-client persistent state on local disk, versioned so that checkpoints and retries stay exact.

Each write is a new file `<root>/<cid % 1000>/<cid>/r<round>p<phase>.pt` (written to a temporary
name and renamed), and a read returns the newest version strictly before the current (round,
phase). So a retried chunk sees exactly what the first attempt saw, and resuming from a checkpoint
at round R only has to delete the versions written after R. Old versions are removed once a newer
one is covered by a checkpoint.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import torch

from simfed.engine.errors import SimfedError

_NAME = re.compile(r"^r(\d+)p(\d+)\.pt$")


def _load(path: Path, mmap: bool = False) -> Any:
    from simfed.partitions.safeio import regular_file

    regular_file(path, "client state file")  # a FIFO would block torch.load forever
    try:
        return torch.load(path, weights_only=True, mmap=mmap)
    except Exception as exc:  # damaged zip, truncated file, or a pickle weights_only refuses
        raise SimfedError(f"{path}: cannot load client state ({type(exc).__name__}); the run directory is "
                          "damaged: restore the file or start a new run") from None


class ClientStateStore:
    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)

    def _dir(self, cid: int) -> Path:
        return self.root / f"{cid % 1000:03d}" / str(cid)

    def _versions(self, cid: int) -> list[tuple[int, int, Path]]:
        d = self._dir(cid)
        if not d.is_dir():
            return []
        out = []
        for name in os.listdir(d):
            m = _NAME.match(name)
            if m:
                out.append((int(m.group(1)), int(m.group(2)), d / name))
        return sorted(out)

    def get(self, cid: int, round: int, phase: int) -> Any:
        """The newest state written before (round, phase), or None for a client never trained."""
        for r, p, path in reversed(self._versions(cid)):
            if (r, p) < (round, phase):
                return _load(path)
        return None

    def check(self, before_round: int) -> int:
        """Open every version a resumed run may read (rounds < before_round) without loading its
        tensors (mmap); a damaged file fails here, before any work, not inside a worker."""
        if not self.root.is_dir():
            return 0
        n = 0
        for path in sorted(self.root.glob("*/*/r*p*.pt")):
            m = _NAME.match(path.name)
            if m and int(m.group(1)) < before_round:
                _load(path, mmap=True)
                n += 1
        return n

    def put(self, cid: int, round: int, phase: int, state: Any, checkpointed_round: int = -1) -> None:
        d = self._dir(cid)
        d.mkdir(parents=True, exist_ok=True)
        final = d / f"r{round:06d}p{phase:02d}.pt"
        tmp = d / f".{final.name}.{os.getpid()}.tmp"
        torch.save(state, tmp)
        os.replace(tmp, final)
        self._collect(cid, checkpointed_round)

    def _collect(self, cid: int, checkpointed_round: int) -> None:
        # Keep every version after the last checkpoint, and the newest one it covers.
        covered = [v for v in self._versions(cid) if v[0] < checkpointed_round]
        for _, _, path in covered[:-1]:
            path.unlink(missing_ok=True)

    def truncate_after(self, round: int) -> int:
        """Delete versions written in rounds >= `round` (resume from a checkpoint taken after round-1)."""
        removed = 0
        if not self.root.is_dir():
            return 0
        for path in self.root.glob("*/*/r*p*.pt"):
            m = _NAME.match(path.name)
            if m and int(m.group(1)) >= round:
                path.unlink()
                removed += 1
        return removed
