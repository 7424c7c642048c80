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

from simfed.core.errors import SimfedError

FORMAT = 1
NAME = "checkpoint.pt"


def save(run_dir: str | os.PathLike, completed_rounds: int, server_state: dict, counters: dict[str, int],
         final: bool = False, clock: float | None = None) -> Path:
    """`final`: the run is finished and `server_state` holds the model without optimizer state.
    `clock`: the virtual time after the last round (runs with a [system] clock)."""
    path = Path(run_dir) / NAME
    tmp = path.with_name(f".{NAME}.tmp")
    extra = {} if clock is None else {"clock": float(clock)}
    torch.save({"format": FORMAT, "round": completed_rounds, "server": server_state, "counters": dict(counters),
                "final": bool(final), **extra}, tmp)
    os.replace(tmp, path)
    return path


def load(run_dir: str | os.PathLike) -> dict[str, Any] | None:
    """The checkpoint of a run directory (None if there is none), its fields checked."""
    from simfed.core.safeio import regular_file

    path = Path(run_dir) / NAME
    if not os.path.lexists(path):
        return None
    regular_file(path, "checkpoint")  # a FIFO would block torch.load forever
    try:
        ckpt = torch.load(path, weights_only=True)
    except Exception as exc:  # weights_only refuses anything but tensors and plain containers
        text = str(exc).strip()
        why = ("torch.load(weights_only=True) refused it: it holds objects other than tensors and plain "
               "containers, or is not a checkpoint" if "Weights only load failed" in text
               else f"{type(exc).__name__}: {text.splitlines()[0][:160] if text else ''}")
        raise SimfedError(f"{path}: cannot load checkpoint ({why}); the file is damaged: restore it or start a "
                          "new run") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise SimfedError(f"{path}: not a simfed checkpoint of format {FORMAT}")
    r = ckpt.get("round")
    if isinstance(r, bool) or not isinstance(r, int) or r < 0:
        raise SimfedError(f"{path}: 'round' is missing or not a non-negative integer; the checkpoint is damaged")
    if not isinstance(ckpt.get("server"), dict):
        raise SimfedError(f"{path}: 'server' state is missing; the checkpoint is damaged")
    counters = ckpt.get("counters")
    if not isinstance(counters, dict) or not all(isinstance(k, str) and isinstance(v, int) and not isinstance(v, bool)
                                                 for k, v in counters.items()):
        raise SimfedError(f"{path}: 'counters' is missing or not a table of integers; the checkpoint is damaged")
    clock = ckpt.get("clock", 0.0)
    if isinstance(clock, bool) or not isinstance(clock, float) or not clock >= 0 or clock == float("inf"):
        raise SimfedError(f"{path}: 'clock' is not a non-negative virtual time; the checkpoint is damaged")
    return ckpt


def check_matches(saved: Any, reference: Any, where: str, key: str = "server") -> None:
    """Raise SimfedError where `saved` (a checkpoint's server state) lacks a named entry of
    `reference` (a freshly initialized state of the same method and task) or holds a tensor of
    another shape or dtype. Tables keyed by client id grow during a run, so only named (str)
    keys must be present, and lists of different lengths are left alone."""
    def fail(why: str) -> SimfedError:
        return SimfedError(f"{where}: {key} {why}; the checkpoint does not belong to this experiment or is "
                           "damaged")

    if isinstance(reference, torch.Tensor):
        if not isinstance(saved, torch.Tensor):
            raise fail(f"is {type(saved).__name__}, expected a tensor")
        if saved.shape != reference.shape or saved.dtype != reference.dtype:
            raise fail(f"has shape {tuple(saved.shape)} {saved.dtype}, expected {tuple(reference.shape)} "
                       f"{reference.dtype}")
    elif isinstance(reference, dict):
        if not isinstance(saved, dict):
            raise fail(f"is {type(saved).__name__}, expected a table")
        missing = [k for k in reference if isinstance(k, str) and k not in saved]
        if missing:
            raise fail(f"lacks {missing[0]!r}")
        for k in reference:
            if k in saved:
                check_matches(saved[k], reference[k], where, f"{key}.{k}")
    elif isinstance(reference, (list, tuple)):
        if not isinstance(saved, (list, tuple)):
            raise fail(f"is {type(saved).__name__}, expected a list")
        if len(saved) == len(reference):
            for i, (a, b) in enumerate(zip(saved, reference)):
                check_matches(a, b, where, f"{key}[{i}]")
    elif isinstance(reference, (int, float)) and not isinstance(reference, bool):
        if isinstance(saved, bool) or not isinstance(saved, (int, float)):
            raise fail(f"is {type(saved).__name__}, expected a number")
