"""Ditto (Li, Hu, Beirami, Smith, ICML 2021, arXiv 2012.04221): FedAvg plus a proximal personal model.

The global model w is trained by FedAvg (fedavg.local_sgd, server = FedAvg's weighted mean change).
Each client also keeps a personal model v_i (engine-held client state) and, whenever it is
sampled, takes s SGD steps on h_i(v) = f_i(v) + lam/2 ||v - w||^2, i.e. with the gradient
grad f_i(v; batch) + lam (v - w), w being the global model it received this round.

From the paper: the objective h_i, the personal steps against the round's global model, and that
the global update is plain FedAvg (Ditto's Algorithm 1). From the authors' code (litian96/ditto;
FL-bench's DittoClient, which PeFLL used): the proximal term is added to the mini-batch gradient
before the optimizer step (so momentum, when set, acts on the full proximal gradient); the personal
model is the one evaluated. Ours (each a config key; defaults in brackets):
- `lam` [1.0]: FL-bench's default; the paper tunes lam per dataset in {0.01, 0.1, 1, 2}.
- `personal_steps` [20] (s) or `personal_epochs` [0; > 0 overrides] and `personal_lr` [0.05].
- A client's first personal model starts at the global model it receives then (the authors start
  every v_i at the initial model; the two coincide only in round 0).
- New clients (PeFLL's appendix does not state a Ditto protocol): v is trained from w with the
  same objective for `unseen_epochs` [20] epochs, the budget PeFLL gives FedRep and pFedMe; a seen
  client that has never been sampled is evaluated the same way.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch.nn import functional as F

from simfed.algorithms.kit import training
from simfed.algorithms.base import Capabilities, Reply
from simfed.algorithms.fedavg import FedAvg, client_model, local_sgd
from simfed.algorithms.kit.models import flat_params, load_flat
from simfed.algorithms.registry import register


@dataclass(frozen=True)
class DittoConfig:
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 0.0
    batch_size: int = 32
    local_steps: int = 20
    local_epochs: float = 0.0
    server_lr: float = 1.0
    lam: float = 1.0
    personal_lr: float = 0.05
    personal_steps: int = 20
    personal_epochs: float = 0.0
    unseen_epochs: float = 20.0

    def __post_init__(self):
        if not self.lam >= 0:
            raise ValueError(f"lam must be >= 0 (weight of the proximal term lam/2 ||v - w||^2), got {self.lam}")
        if self.lr <= 0 or self.personal_lr <= 0 or self.server_lr <= 0:
            raise ValueError("lr, personal_lr and server_lr must be > 0")
        if self.batch_size < 1 or self.local_steps < 1 or self.personal_steps < 1:
            raise ValueError("batch_size, local_steps and personal_steps must be >= 1")
        if self.local_epochs < 0 or self.personal_epochs < 0 or self.unseen_epochs < 0:
            raise ValueError("local_epochs, personal_epochs and unseen_epochs must be >= 0")


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
                 momentum: float, gen: torch.Generator, epochs: float = 0.0) -> int:
    """SGD in place on f + lam/2 ||v - anchor||^2 over training.batches (epochs > 0: whole passes,
    else `steps` steps); returns samples processed."""
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum)
    model.train()
    seen = 0
    for idx in training.batches(int(y.shape[0]), batch_size, steps, gen, epochs):
        proximal_grads(model, anchor, lam, x[idx], y[idx])
        opt.step()
        seen += int(idx.numel())
    return seen


@register
class Ditto(FedAvg):
    name = "ditto"
    Config = DittoConfig
    summary = "Ditto: FedAvg global model plus proximal personal models (Li et al. 2021)"
    capabilities = Capabilities(client_state=True)

    def cost(self, cfg, n_train: int) -> float:
        glob = math.ceil(cfg.local_epochs * n_train / cfg.batch_size) if cfg.local_epochs > 0 else cfg.local_steps
        pers = (math.ceil(cfg.personal_epochs * n_train / cfg.batch_size) if cfg.personal_epochs > 0
                else cfg.personal_steps)
        return float(max(1, glob + pers))

    def _personal(self, cfg, model, w, data, steps_epochs, gen) -> int:
        x, y = data.split("train")
        steps, epochs = steps_epochs
        return proximal_sgd(model, w, cfg.lam, x, y, steps=steps, batch_size=cfg.batch_size, lr=cfg.personal_lr,
                            momentum=cfg.momentum, gen=gen, epochs=epochs)

    def client(self, phase, cfg, bcast, payload, data, cstate, ctx) -> Reply:
        model = client_model(ctx)
        if ctx.mode == "eval":
            load_flat(model, bcast if cstate is None else cstate)
            if cstate is None and cfg.unseen_epochs > 0 and data.n("train") > 0:
                self._personal(cfg, model, bcast, data, (1, cfg.unseen_epochs), ctx.generator("unseen"))
            return Reply(evals=training.evaluate_splits(model, data))
        load_flat(model, bcast)
        seen, loss = local_sgd(model, data, cfg, ctx.generator("sgd"))
        n = float(data.n("train"))
        delta = bcast - flat_params(model)
        load_flat(model, bcast if cstate is None else cstate)
        seen += self._personal(cfg, model, bcast, data, (cfg.personal_steps, cfg.personal_epochs),
                               ctx.generator("personal"))
        return Reply(sums={"delta": delta * n, "n": torch.tensor(n, dtype=torch.float64)},
                     state=flat_params(model), n_train=seen, train_loss=loss)
