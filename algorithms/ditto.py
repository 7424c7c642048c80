"""Ditto (Li, Hu, Beirami, Smith, ICML 2021, arXiv 2012.04221): FedAvg plus a proximal personal model.

The global model w is trained by FedAvg (the kit's global model: local SGD, weighted mean change).
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
- Batches come from `ClientContext.generator`: "sgd" for the global steps, "personal" for the
  personal ones, "unseen" for a new client's.
[privacy] (docs/privacy.md) protects the global model w, FedAvg's release; the personal models
never leave their clients.

- [system] clock: a client's work is its global steps then its personal steps. A straggler under
  stragglers = "partial" spends its step budget in that order (its global update counts, from the
  steps it took; personal steps only if budget is left). FedBuff weights the global update by
  1/sqrt(1 + staleness); the personal model trains against the (stale) global model it received.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from simfed.algorithms.base import Capabilities, Reply, Work
from simfed.algorithms.kit.globalmodel import (GlobalModelMethod, GlobalSGDFields, client_model, global_privacy,
                                               local_update, update_sums)
from simfed.algorithms.kit.models import flat_params, load_flat
from simfed.algorithms.kit.workload import default_steps, epoch_steps
from simfed.algorithms.kit.proximal import evaluate_personal, proximal_sgd
from simfed.algorithms.registry import register


@dataclass(frozen=True)
class DittoConfig(GlobalSGDFields):
    lam: float = 1.0
    personal_lr: float = 0.05
    personal_steps: int = 20
    personal_epochs: float = 0.0
    unseen_epochs: float = 20.0

    def __post_init__(self):
        super().__post_init__()
        if not self.lam >= 0:
            raise ValueError(f"lam must be >= 0 (weight of the proximal term lam/2 ||v - w||^2), got {self.lam}")
        if self.personal_lr <= 0 or self.personal_steps < 1:
            raise ValueError("personal_lr must be > 0 and personal_steps >= 1")
        if self.personal_epochs < 0 or self.unseen_epochs < 0:
            raise ValueError("personal_epochs and unseen_epochs must be >= 0")


def personal_sgd(cfg, model, w, data, steps_epochs: tuple[int, float], gen, budget: int | None = None) -> int:
    """The personal steps on h_i from the model's current parameters; returns samples processed."""
    x, y = data.split("train")
    steps, epochs = steps_epochs
    return proximal_sgd(model, w, cfg.lam, x, y, steps=steps, batch_size=cfg.batch_size, lr=cfg.personal_lr,
                        momentum=cfg.momentum, gen=gen, epochs=epochs, budget=budget)


def personal_steps(cfg, n: int) -> tuple[int, int]:
    """(steps, samples) of a sampled client's personal training."""
    if n < 1:
        return 0, 0
    if cfg.personal_epochs > 0:
        return epoch_steps(n, cfg.batch_size, cfg.personal_epochs)
    return cfg.personal_steps, cfg.personal_steps * min(cfg.batch_size, n)


@register
class Ditto(GlobalModelMethod):
    name = "ditto"
    Config = DittoConfig
    summary = "Ditto: FedAvg global model plus proximal personal models (Li et al. 2021)"
    capabilities = Capabilities(client_state=True, asynchronous=True, partial="steps", privacy=global_privacy(
        "the global model w; the personal models v_i never leave their clients, so they are not released"))

    def work(self, phase, cfg, task, n_train) -> Work:
        full = super().work(phase, cfg, task, n_train)
        steps, samples = personal_steps(cfg, n_train)
        return Work(samples=full.samples + samples, steps=full.steps + steps, bytes_down=full.bytes_down,
                    bytes_up=full.bytes_up)

    def cost(self, cfg, n_train: int) -> float:
        glob = math.ceil(cfg.local_epochs * n_train / cfg.batch_size) if cfg.local_epochs > 0 else cfg.local_steps
        pers = (math.ceil(cfg.personal_epochs * n_train / cfg.batch_size) if cfg.personal_epochs > 0
                else cfg.personal_steps)
        return float(max(1, glob + pers))

    def client(self, phase, cfg, bcast, payload, data, cstate, ctx) -> Reply:
        model = client_model(ctx)
        if ctx.mode == "eval":
            return evaluate_personal(model, bcast, cstate, data, cfg.unseen_epochs, lambda: personal_sgd(
                cfg, model, bcast, data, (1, cfg.unseen_epochs), ctx.generator("unseen")))
        delta, seen, loss = local_update(model, bcast, data, cfg, ctx.generator("sgd"), ctx.budget)
        load_flat(model, bcast if cstate is None else cstate)
        left = None if ctx.budget is None else max(0, ctx.budget - default_steps(cfg, data.n("train"))[0])
        seen += personal_sgd(cfg, model, bcast, data, (cfg.personal_steps, cfg.personal_epochs),
                             ctx.generator("personal"), left)
        return Reply(sums=update_sums(delta, float(data.n("train")), ctx.staleness), state=flat_params(model),
                     n_train=seen, train_loss=loss)
