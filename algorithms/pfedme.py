"""pFedMe (Dinh, Tran, Nguyen, NeurIPS 2020, arXiv 2006.08848): personalization with Moreau envelopes.

Client i keeps a local copy w_i of the global model (reset to w each round). For each of R local
iterations it draws a batch and solves the Moreau-envelope problem
    theta_i = argmin_theta f_i(theta; batch) + lam/2 ||theta - w_i||^2
approximately with K gradient steps of size `personal_lr` (gradient grad f_i(theta) + lam
(theta - w_i)), then moves w_i <- w_i - lr * lam * (w_i - theta_i) (the gradient of the envelope).
The server sets w <- (1 - beta) w + beta * (sample-weighted mean of w_i).

From the paper: the envelope objective, the K-step inner solve, the w_i step and the beta server
step (Algorithm 1); lam = 15, K = 3, beta = 1 are PeFLL's settings (its appendix, after the pFedMe
paper). From the authors' code (CharlieDinh/pFedMe; FL-bench's pFedMeClient): theta is not reset
between the R iterations of a round (the inner solve warm-starts at the previous theta); one
iteration uses one batch; the personal model that is evaluated is the last theta; the server mean
is weighted by train samples; personal_lr = 0.01 and lr = 0.005 are the authors' defaults. Ours:
- theta is client state, so a seen client is evaluated with the theta of its last round; a
  round starts theta at the received w (as the authors' code does).
- `local_steps` [20] is R; `local_epochs` > 0 makes R that many passes over the train split.
- No momentum and no weight decay (the authors' optimizer has neither by default).
- New clients (PeFLL's appendix): theta = w_i = w, then `unseen_epochs` [20] epochs of the same
  local procedure (the pFedMe loss) on the client's train split; theta is evaluated. A seen client
  that has never been sampled is evaluated the same way.
- Batches come from `ClientContext.generator` ("local" in training, "unseen" for a new client).
- [system] clock: the local steps are the R iterations (each K inner steps on one batch). A
  straggler under stragglers = "partial" takes the iterations it finishes by the deadline and its
  w_i counts; FedBuff weights w - w_i by 1/sqrt(1 + staleness).
- The reported training loss (`Reply.train_loss`, the train rows' `loss`) is the personalized
  model's inner-objective loss f_i(theta) (cross-entropy only, without the lam/2 ||theta - w_i||^2
  term) on the minibatches, evaluated at each of the K inner steps before that step's update and
  averaged over all R x K evaluations weighted by batch size (the samples `n_train` counts).
- [privacy] (docs/privacy.md) protects the global model w: the mean of w - w_i is clipped and
  noised as FedAvg's update; the personal models theta_i never leave their clients.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from simfed.algorithms.base import Capabilities, Reply, Work
from simfed.algorithms.kit import training
from simfed.algorithms.kit.globalmodel import GlobalModelMethod, client_model, global_privacy, server_step, update_sums
from simfed.algorithms.kit.models import flat_params, load_flat
from simfed.algorithms.kit.proximal import evaluate_personal, proximal_grads
from simfed.algorithms.registry import register


@dataclass(frozen=True)
class PFedMeConfig:
    lam: float = 15.0
    K: int = 3
    beta: float = 1.0
    lr: float = 0.005
    personal_lr: float = 0.01
    batch_size: int = 32
    local_steps: int = 20
    local_epochs: float = 0.0
    unseen_epochs: float = 20.0

    def __post_init__(self):
        if not self.lam >= 0:
            raise ValueError(f"lam must be >= 0 (weight of the Moreau term lam/2 ||theta - w||^2), got {self.lam}")
        if self.K < 1 or self.batch_size < 1 or self.local_steps < 1:
            raise ValueError("K, batch_size and local_steps must be >= 1")
        if self.lr <= 0 or self.personal_lr <= 0 or not self.beta > 0:
            raise ValueError("lr, personal_lr and beta must be > 0")
        if self.local_epochs < 0 or self.unseen_epochs < 0:
            raise ValueError("local_epochs and unseen_epochs must be >= 0")


def pfedme_local(model, w: torch.Tensor, lam: float, K: int, lr: float, personal_lr: float, x, y, *,
                 steps: int, batch_size: int, gen: torch.Generator, epochs: float = 0.0,
                 budget: int | None = None) -> tuple[torch.Tensor, int, float]:
    """pFedMe iterations from w_i = theta = w, one per batch of training.batches (epochs > 0: whole
    passes, else R = `steps` batches); returns (w_i, samples processed, mean f_i over the inner
    steps) and leaves theta in `model`."""
    wi = w.clone()
    load_flat(model, w)
    model.train()
    seen, loss_sum = 0, torch.zeros((), device=w.device)
    for idx in training.batches(int(y.shape[0]), batch_size, steps, gen, epochs, budget):
        for _ in range(K):
            loss = proximal_grads(model, wi, lam, x[idx], y[idx])
            loss_sum += loss * idx.numel()
            with torch.no_grad():
                for p in model.parameters():
                    p.sub_(p.grad, alpha=personal_lr)
        wi = wi - lr * lam * (wi - flat_params(model))
        seen += int(idx.numel()) * K
    return wi, seen, float(loss_sum) / max(seen, 1)


def local_rounds(cfg, model, w, data, steps_epochs: tuple[int, float], gen, budget: int | None = None):
    """`pfedme_local` on the client's train split with the config's settings (at most `budget`
    iterations)."""
    x, y = data.split("train")
    steps, epochs = steps_epochs
    return pfedme_local(model, w, cfg.lam, cfg.K, cfg.lr, cfg.personal_lr, x, y, steps=steps,
                        batch_size=cfg.batch_size, gen=gen, epochs=epochs, budget=budget)


@register
class PFedMe(GlobalModelMethod):
    name = "pfedme"
    Config = PFedMeConfig
    summary = "pFedMe: Moreau-envelope personal models, K-step inner solve (Dinh et al. 2020)"
    capabilities = Capabilities(client_state=True, asynchronous=True, partial="steps", privacy=global_privacy(
        "the global model w; the personal models theta_i never leave their clients, so they are not released"))

    def cost(self, cfg, n_train: int) -> float:
        return float(cfg.K) * super().cost(cfg, n_train)

    def work(self, phase, cfg, task, n_train) -> Work:
        full = super().work(phase, cfg, task, n_train)  # R iterations of one batch each, K passes over it
        return dataclasses.replace(full, samples=cfg.K * full.samples)

    def client(self, phase, cfg, bcast, payload, data, cstate, ctx) -> Reply:
        model = client_model(ctx)
        if ctx.mode == "eval":
            return evaluate_personal(model, bcast, cstate, data, cfg.unseen_epochs, lambda: local_rounds(
                cfg, model, bcast, data, (1, cfg.unseen_epochs), ctx.generator("unseen")))
        wi, seen, loss = local_rounds(cfg, model, bcast, data, (cfg.local_steps, cfg.local_epochs),
                                      ctx.generator("local"), ctx.budget)
        return Reply(sums=update_sums(bcast - wi, float(data.n("train")), ctx.staleness), state=flat_params(model),
                     n_train=seen, train_loss=loss)

    def finish(self, phase, cfg, state, sums, n_clients, info):
        # (1 - beta) w + beta * mean(w_i) = w - beta * mean(w - w_i): the FedAvg step at rate beta
        return server_step(state, sums, n_clients, cfg.beta)
