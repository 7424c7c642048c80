"""Proximal personal models: SGD on f(v) + lam/2 ||v - anchor||^2 (Ditto's personal objective, and
the inner problem of pFedMe's Moreau envelope), and the evaluation of a personal model.

`proximal_grads` adds the gradient of the proximal term, lam (v - anchor), to the mini-batch
gradient of f before the optimizer step, as Ditto's code does (litian96/ditto; FL-bench's
DittoClient), so that momentum, when set, acts on the full proximal gradient; pFedMe's plain inner
steps use the same gradient.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch.nn import functional as F

from simfed.algorithms.base import ClientData, Reply
from simfed.algorithms.kit import training
from simfed.algorithms.kit.models import load_flat
from simfed.algorithms.kit.sgd import SGD


def proximal_grads(model, anchor: torch.Tensor, lam: float, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Set each parameter's .grad to the gradient of f(v; x, y) + lam/2 ||v - anchor||^2 at v = model;
    returns f(v; x, y) (the mean cross-entropy, detached) for loss reporting."""
    model.zero_grad(set_to_none=True)
    loss = F.cross_entropy(model(x), y)
    loss.backward()
    offset = 0
    with torch.no_grad():
        for p in model.parameters():
            n = p.numel()
            p.grad.add_(p - anchor[offset:offset + n].view_as(p), alpha=lam)
            offset += n
    return loss.detach()


def proximal_sgd(model, anchor: torch.Tensor, lam: float, x, y, *, steps: int, batch_size: int, lr: float,
                 momentum: float, gen: torch.Generator, epochs: float = 0.0, budget: int | None = None) -> int:
    """SGD in place on f + lam/2 ||v - anchor||^2 over training.batches (epochs > 0: whole passes,
    else `steps` steps; at most `budget` of them); returns samples processed."""
    opt = SGD(model.parameters(), lr=lr, momentum=momentum)
    model.train()
    seen = 0
    for idx in training.batches(int(y.shape[0]), batch_size, steps, gen, epochs, budget):
        proximal_grads(model, anchor, lam, x[idx], y[idx])
        opt.step()
        seen += int(idx.numel())
    return seen


def evaluate_personal(model, theta: torch.Tensor, cstate, data: ClientData, epochs: float,
                      fit: Callable[[], object]) -> Reply:
    """Evaluate a client's personal model: its state when it has one; else the model starts at the
    global theta and `fit()` trains it in place (when `epochs` > 0 and the client has train
    samples), which is how a new client, or a seen one never sampled, gets a personal model."""
    load_flat(model, theta if cstate is None else cstate)
    if cstate is None and epochs > 0 and data.n("train") > 0:
        fit()
    return Reply(evals=training.evaluate_splits(model, data))
