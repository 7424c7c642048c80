"""Atomic checkpoints: server state, completed rounds and counters, loaded without unpickling code.

RNG positions need no saving beyond the round: every random draw derives from (seed, round,
client id, phase), so a resumed run replays the same streams. Client states live in the versioned
client-state store (engine.clientstate), which a resume trims back to the checkpoint.

Only one checkpoint is kept (each save replaces the last). While a run goes on it holds everything
a bit-identical resume needs, optimizer state included; the checkpoint of a finished run keeps the
model only (`final`), since nothing resumes it (`simfed launch --resume` says it is finished).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from simfed.engine.errors import SimfedError

FORMAT = 1
NAME = "checkpoint.pt"


def save(run_dir: str | os.PathLike, completed_rounds: int, server_state: dict, counters: dict[str, int],
         final: bool = False) -> Path:
    """`final`: the run is finished and `server_state` holds the model without optimizer state."""
    path = Path(run_dir) / NAME
    tmp = path.with_name(f".{NAME}.tmp")
    torch.save({"format": FORMAT, "round": completed_rounds, "server": server_state, "counters": dict(counters),
                "final": bool(final)}, tmp)
    os.replace(tmp, path)
    return path


def load(run_dir: str | os.PathLike) -> dict[str, Any] | None:
    path = Path(run_dir) / NAME
    if not path.exists():
        return None
    try:
        ckpt = torch.load(path, weights_only=True)
    except Exception as exc:  # weights_only refuses anything but tensors and plain containers
        raise SimfedError(f"{path}: cannot load checkpoint ({type(exc).__name__}: {str(exc).splitlines()[0]})")
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise SimfedError(f"{path}: not a simfed checkpoint of format {FORMAT}")
    return ckpt
