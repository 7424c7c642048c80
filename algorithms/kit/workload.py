"""What a client's training phase is made of, for the engine's virtual clock, and the staleness
weight of asynchronous updates.

Ours, except `staleness_weight`: FedBuff's 1/sqrt(1 + staleness) (Nguyen et al., AISTATS 2022,
arXiv 2106.06639, section 3). A client's virtual duration is its training samples over its
compute speed plus its message bytes over its bandwidths; the engine decides deadlines and the
asynchronous schedule from these numbers before anyone trains, so each method states them
(`Algorithm.work`) from its config, the task and the client's train size, and the engine's tests
hold every method's statement to the metric rows it then writes (samples and bytes).

- `default_steps`: local steps and samples of `training.batches` with the usual config keys.
- `lenet_values` / `lenet_bytes`: the client LeNet's parameter count and float32 size.
- `tensor_bytes`: the size `engine.worker.nbytes` counts for a message of given element counts.
- `staleness_weight`: FedBuff's down-weighting of an update computed on an older model.
"""

from __future__ import annotations

import functools
import math
from typing import Any

FLOAT32, FLOAT64, SCALAR = 4, 8, 8  # bytes per element; a Python int/float in a message counts 8


def default_steps(cfg: Any, n_train: int) -> tuple[int, int]:
    """(local steps, samples) that `training.batches` yields with the config's `local_steps`,
    `local_epochs` and `batch_size`; a client without samples takes no step."""
    n = int(n_train)
    if n < 1:
        return 0, 0
    batch = int(getattr(cfg, "batch_size", 32))
    epochs = float(getattr(cfg, "local_epochs", 0.0) or 0.0)
    if epochs > 0:
        return epoch_steps(n, batch, epochs)
    steps = int(getattr(cfg, "local_steps", 0))
    return steps, steps * min(batch, n)


def epoch_steps(n: int, batch: int, epochs: float) -> tuple[int, int]:
    """(steps, samples) of `epochs` passes over n samples in batches of `batch` (last batch partial;
    a fractional pass covers ceil(fraction * n) samples), as `training.batches` draws them."""
    if n < 1 or epochs <= 0:
        return 0, 0
    whole, part = divmod(float(epochs), 1.0)
    passes = [n] * int(whole) + ([math.ceil(part * n)] if part > 0 else [])
    return sum(-(-m // batch) for m in passes), sum(passes)


@functools.lru_cache(maxsize=64)
def lenet_values(input_shape: tuple[int, ...], num_classes: int) -> int:
    """Parameters of the client LeNet for this task (0 if LeNet cannot take it)."""
    from simfed.algorithms.kit.models import lenet_for

    try:
        return sum(p.numel() for p in lenet_for(tuple(input_shape), int(num_classes)).parameters())
    except ValueError:
        return 0


def lenet_bytes(input_shape: tuple[int, ...], num_classes: int) -> int:
    return FLOAT32 * lenet_values(tuple(input_shape), int(num_classes))


def tensor_bytes(*values: int, itemsize: int = FLOAT32) -> int:
    """Bytes of tensors holding these element counts (`engine.worker.nbytes`)."""
    return itemsize * sum(int(v) for v in values)


def staleness_weight(staleness: int) -> float:
    """FedBuff's weight of an update whose start model is `staleness` server updates old."""
    return 1.0 / math.sqrt(1.0 + max(0, int(staleness)))
