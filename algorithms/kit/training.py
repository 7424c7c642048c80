"""Local training and evaluation loops shared by the methods (plain functions of their inputs)."""

from __future__ import annotations

import itertools
import math
from typing import Iterator

import torch
from torch import nn
from torch.nn import functional as F

from simfed.algorithms.base import Eval
from simfed.algorithms.kit.sgd import SGD


def batches(n: int, batch_size: int, steps: int, gen: torch.Generator, epochs: float = 0.0,
            budget: int | None = None) -> Iterator[torch.Tensor]:
    """Index batches for local training.

    epochs > 0: that many passes over the n samples, each a fresh seeded shuffle cut into batches of
    `batch_size` with a partial last batch (a PyTorch DataLoader with shuffle=True, drop_last=False),
    so every sample is trained exactly once per epoch; a fractional part trains the first
    ceil(fraction * n) samples of one more shuffle. Otherwise `steps` full batches drawn without
    replacement, reshuffling after every pass over the data. `budget` (a straggler's
    `ClientContext.budget`): only the first that many of these batches."""
    out = _batches(n, batch_size, steps, gen, epochs)
    return out if budget is None else itertools.islice(out, max(0, int(budget)))


def _batches(n: int, batch_size: int, steps: int, gen: torch.Generator, epochs: float) -> Iterator[torch.Tensor]:
    if epochs > 0:
        whole, part = divmod(float(epochs), 1.0)
        passes = [n] * int(whole) + ([math.ceil(part * n)] if part > 0 else [])
        for m in passes:
            perm = torch.randperm(n, generator=gen)[:m]
            for start in range(0, m, batch_size):
                yield perm[start:start + batch_size]
        return
    bs = min(batch_size, n)
    perm, pos = torch.randperm(n, generator=gen), 0
    for _ in range(steps):
        if pos + bs > n:
            perm, pos = torch.randperm(n, generator=gen), 0
        yield perm[pos:pos + bs]
        pos += bs


def sgd_train(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, steps: int, batch_size: int, lr: float,
              gen: torch.Generator, momentum: float = 0.0, weight_decay: float = 0.0,
              clip: float = 0.0, epochs: float = 0.0, budget: int | None = None) -> tuple[int, float]:
    """Run SGD in place over `batches(...)` (epochs > 0: whole passes, else `steps` steps; at most
    `budget` of them); returns (samples processed, mean training loss)."""
    opt = SGD(model.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)
    model.train()
    # The reported loss is summed in the model's dtype: float32 runs as ever, and a float64 model's
    # loss is not rounded to float32 (the vectorized trainer is checked against it to 1e-10).
    p0 = next(model.parameters())  # the sum stays on the model's device: a CUDA loss adds in place
    seen, loss_sum = 0, torch.zeros((), dtype=p0.dtype, device=p0.device)
    for idx in batches(int(y.shape[0]), batch_size, steps, gen, epochs, budget):
        opt.zero_grad()
        loss = F.cross_entropy(model(x[idx]), y[idx])
        loss.backward()
        if clip > 0:
            nn.utils.clip_grad_norm_(model.parameters(), clip)
        opt.step()
        seen += int(idx.numel())
        loss_sum += loss.detach() * idx.numel()
    return seen, float(loss_sum) / max(seen, 1)


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, class_mask: torch.Tensor | None = None,
             batch_size: int = 2048) -> Eval:
    """Summed cross-entropy and correct count; `class_mask` (bool, C) forbids absent classes."""
    model.eval()
    n = int(y.shape[0])
    loss_sum, correct = 0.0, 0
    for start in range(0, n, batch_size):
        logits = model(x[start:start + batch_size])
        if class_mask is not None:
            # A large finite penalty, not -inf: a masked true label then gives a big but finite loss.
            logits = logits.masked_fill(~class_mask, -1e4)
        yb = y[start:start + batch_size]
        loss_sum += float(F.cross_entropy(logits, yb, reduction="sum"))
        correct += int((logits.argmax(1) == yb).sum())
    return Eval(n=n, loss_sum=loss_sum, correct=correct)


def evaluate_splits(model: nn.Module, data, splits=("val", "test"), class_mask=None) -> dict[str, Eval]:
    out = {}
    for split in splits:
        if data.n(split) > 0:
            x, y = data.split(split)
            out[split] = evaluate(model, x, y, class_mask=class_mask)
    return out
