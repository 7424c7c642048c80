"""Train a chunk of clients at once: k SGD steps for C clients as one vmap over torch.func.grad.

Ours (no paper). On a GPU the per-client loop is the wrong shape: LeNet on a batch of 32 is a few
microseconds of arithmetic behind dozens of kernel launches per step. Here the C clients' parameters
are stacked ([C, ...] per tensor), every step is one `vmap(grad(loss))` over the chunk, and the
SGD update (momentum, weight decay, per-client gradient-norm clipping) is a few batched tensor ops.

Exactly the per-client loop's computation (`training.sgd_train`), client by client:
- each client's index batches come from the SAME seeded generator and the same `training.batches`
  call, so the samples and their order are the loop's;
- clients of different sizes: every step gathers a [C, B] batch padded to the largest batch of that
  step; padded rows carry weight 0 and the loss is the weighted sum over the client's real rows
  divided by their count, i.e. the loop's mean cross-entropy over its (possibly partial) batch;
- clients with different step counts: a client whose batches are exhausted is frozen (its
  parameters and momentum are selected unchanged with `torch.where`), so a short client ends where
  the loop ends it;
- SGD as torch.optim.SGD (dampening 0, no Nesterov): d = g + wd * p; buf = d at the first step,
  then buf = momentum * buf + d; p -= lr * buf. Clipping as nn.utils.clip_grad_norm_: the total
  2-norm over all tensors, scaled by min(1, clip / (norm + 1e-6)), before weight decay.
In float64 this equals the loop to rounding (tests require 1e-10); in float32 the summation order
inside the batched kernels differs from the loop's, so the two paths are not bit-identical and a
run keeps one setting (`engine.vectorize`) throughout.

A chunk's data move to the device once (one padded [C, N_max, ...] tensor per chunk).
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn
from torch.func import functional_call, grad, vmap
from torch.nn import functional as F

from simfed.algorithms.kit import training
from simfed.algorithms.kit.models import param_shapes, unflatten


def stack_data(xs: Sequence[torch.Tensor], ys: Sequence[torch.Tensor], device) -> tuple[torch.Tensor, torch.Tensor]:
    """[C, N_max, ...] inputs and [C, N_max] labels, zero-padded; moved to the device once."""
    n_max = max(int(y.shape[0]) for y in ys)
    X = xs[0].new_zeros((len(xs), n_max, *xs[0].shape[1:]), device=device)
    Y = torch.zeros((len(ys), n_max), dtype=torch.long, device=device)
    for c, (x, y) in enumerate(zip(xs, ys)):
        X[c, : x.shape[0]] = x.to(device)
        Y[c, : y.shape[0]] = y.to(device)
    return X, Y


def gather(X: torch.Tensor, Y: torch.Tensor, idx_list: Sequence[torch.Tensor | None],
           dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One step's batch of every client, [C, B, ...] inputs, [C, B] labels and [C, B] weights,
    padded to the widest batch; padded rows (and a client with None: no batch) weigh 0."""
    C = len(idx_list)
    width = max((int(i.numel()) for i in idx_list if i is not None), default=0)
    idx = torch.zeros((C, width), dtype=torch.long)
    w = torch.zeros((C, width), dtype=dtype)
    for c, i in enumerate(idx_list):
        if i is not None:
            idx[c, : i.numel()] = i
            w[c, : i.numel()] = 1.0
    rows = torch.arange(C, device=X.device)[:, None]
    idx = idx.to(X.device)
    return X[rows, idx], Y[rows, idx], w.to(X.device)


def masked_loss(model: nn.Module, shapes):
    """f(flat, x, y, w) = sum_b w_b CE_b / sum_b w_b: with 0/1 weights, the mean cross-entropy over
    one client's real rows, i.e. the per-client loop's loss on its (possibly partial) batch."""

    def f(flat: torch.Tensor, x: torch.Tensor, y: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        per = F.cross_entropy(functional_call(model, unflatten(flat, shapes), (x,)), y, reduction="none")
        return (per * w).sum() / w.sum().clamp_min(1.0)

    return f


def _plan(ns: Sequence[int], batch_size: int, steps: Sequence[int], gens: Sequence[torch.Generator],
          epochs: float, budgets: Sequence[int | None]) -> list[list[torch.Tensor]]:
    """Each client's index batches, drawn exactly as the per-client loop draws them."""
    return [list(training.batches(n, batch_size, s, g, epochs, b)) for n, s, g, b in zip(ns, steps, gens, budgets)]


def sgd_train_chunk(model: nn.Module, thetas: torch.Tensor, xs: Sequence[torch.Tensor], ys: Sequence[torch.Tensor], *,
                    steps: int | Sequence[int], batch_size: int, lr: float, gens: Sequence[torch.Generator],
                    momentum: float = 0.0, weight_decay: float = 0.0, clip: float = 0.0,
                    epochs: float = 0.0, budgets: Sequence[int | None] | None = None,
                    ) -> tuple[torch.Tensor, list[int], list[float]]:
    """`training.sgd_train` for C clients at once.

    thetas: [C, P] flat starting parameters (one row per client, `models.flat_params` order).
    budgets: per client, at most that many steps (a straggler's `ClientContext.budget`; None: all).
    Returns (new thetas [C, P], samples processed per client, mean training loss per client).
    """
    C = thetas.shape[0]
    if not (len(xs) == len(ys) == len(gens) == C):
        raise ValueError("thetas, xs, ys and gens must have one entry per client")
    step_list = [int(steps)] * C if isinstance(steps, int) else [int(s) for s in steps]
    device = thetas.device
    plan = _plan([int(y.shape[0]) for y in ys], batch_size, step_list, gens, epochs, budgets or [None] * C)
    X, Y = stack_data(xs, ys, device)
    shapes = param_shapes(model)
    params = {k: v.clone() for k, v in unflatten(thetas.detach(), shapes).items()}
    bufs: dict[str, torch.Tensor] | None = None

    def loss(p, x, y, w):
        per = F.cross_entropy(functional_call(model, p, (x,)), y, reduction="none")
        return (per * w).sum() / w.sum().clamp_min(1.0), (per * w).sum()

    grad_fn = vmap(grad(loss, has_aux=True))
    seen = [0] * C
    loss_sum = torch.zeros(C, dtype=thetas.dtype, device=device)
    n_steps = max((len(p) for p in plan), default=0)
    model.train()
    for t in range(n_steps):
        idx_list = [p[t] if t < len(p) else None for p in plan]
        for c, i in enumerate(idx_list):
            if i is not None:
                seen[c] += int(i.numel())
        xb, yb, w = gather(X, Y, idx_list, thetas.dtype)
        g, batch_loss = grad_fn(params, xb, yb, w)
        active = torch.tensor([i is not None for i in idx_list], device=device)
        loss_sum += torch.where(active, batch_loss, torch.zeros_like(batch_loss))
        if clip > 0:
            norm = torch.sqrt(sum((v.reshape(C, -1) ** 2).sum(1) for v in g.values()))
            coef = (clip / (norm + 1e-6)).clamp(max=1.0)
            g = {k: v * coef.view(C, *[1] * (v.dim() - 1)) for k, v in g.items()}
        first = bufs is None
        new_bufs = {}
        for k, p in params.items():
            d = g[k] + weight_decay * p if weight_decay != 0 else g[k]
            if momentum != 0:
                d = d.clone() if first else momentum * bufs[k] + d
                new_bufs[k] = d if first else torch.where(_bcast(active, d), d, bufs[k])
            params[k] = torch.where(_bcast(active, p), p - lr * d, p)
        if momentum != 0:
            bufs = new_bufs
    flat = torch.cat([params[name].reshape(C, -1) for name, _ in shapes], dim=1)
    losses = [float(loss_sum[c]) / max(seen[c], 1) for c in range(C)]
    return flat, seen, losses


def _bcast(active: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return active.view(-1, *[1] * (like.dim() - 1))
