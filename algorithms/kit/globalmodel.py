"""The global model of the FedAvg family, as one piece that methods compose.

FedAvg, Ditto, kNN-Per, Meta-FL, Per-FedAvg and pFedMe keep one global model theta (the client
model's flat parameters; the task's [model], LeNet by default) on the server and move it by the sample-weighted mean change of the
clients; FedRep does the same with the body only, and Local starts every client from the same
seeded theta. What they share lives here, once:

- config field groups: `SGDFields` (the local optimizer), `LocalSGDFields` (+ how long a client
  trains), `GlobalSGDFields` (+ the server step); a method's config inherits the group it uses;
- `GlobalModelState` and `initial_model` (the task's client model, initialized from the run seed);
- the client side: `client_model`, `local_sgd` / `local_sgd_chunk`, `local_update`,
  `finetune_and_evaluate` / `finetune_reply`, and `update_sums`, the summable reply {delta_i * n_i, n_i}
  (an asynchronous update's change also weighted by FedBuff's 1/sqrt(1 + staleness));
- the server step `descend`: theta <- theta - rate * sum_i(delta_i n_i) / sum_i n_i;
- `GlobalModelMethod`: init, phases, broadcast and finish of such a method (the engine checks the
  model against the task before any work: kit/models/needs.py);
- `global_privacy`: what [privacy] protects in such a method (the "update" phase's delta).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from simfed.algorithms.base import (Algorithm, ClientContext, ClientData, PrivacySupport, Reply, RoundInfo, ServerState,
                                   Task)
from simfed.algorithms.kit import training, vectorized
from simfed.algorithms.kit import models
from simfed.algorithms.kit.models import flat_params, load_flat
from simfed.algorithms.kit.workload import staleness_weight


@dataclass(frozen=True)
class SGDFields:
    """The local optimizer: SGD with momentum and weight decay on batches of `batch_size`."""

    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 0.0
    batch_size: int = 32

    def __post_init__(self):
        if self.lr <= 0 or self.batch_size < 1:
            raise ValueError("lr must be > 0 and batch_size >= 1")


@dataclass(frozen=True)
class LocalSGDFields(SGDFields):
    """How long a sampled client trains."""

    local_steps: int = 20
    # > 0 overrides local_steps: that many passes over the client's train split, each sample once
    # per epoch (seeded shuffle, last batch partial, like a DataLoader without drop_last)
    local_epochs: float = 0.0

    def __post_init__(self):
        super().__post_init__()
        if self.local_steps < 1 or self.local_epochs < 0:
            raise ValueError("local_steps must be >= 1 and local_epochs >= 0")


@dataclass(frozen=True)
class GlobalSGDFields(LocalSGDFields):
    """Local SGD plus the server step theta -= server_lr * (sample-weighted mean change)."""

    server_lr: float = 1.0

    def __post_init__(self):
        super().__post_init__()
        if self.server_lr <= 0:
            raise ValueError("server_lr must be > 0")


class GlobalModelState(ServerState):
    def __init__(self, theta: torch.Tensor):
        self.theta = theta


def initial_model(task: Task, seed: int) -> torch.Tensor:
    """The client model's flat parameters, initialized from the run seed alone."""
    return flat_params(models.initial(task, seed))


def client_model(ctx: ClientContext) -> torch.nn.Module:
    """The worker's one instance of the task's client model (each client loads its parameters)."""
    return ctx.module(models.cache_key(ctx.task), lambda: models.build(ctx.task))


def local_sgd(model, data: ClientData, cfg, gen, budget: int | None = None) -> tuple[int, float]:
    """Local SGD in place (at most `budget` steps); returns (samples processed, mean training loss)."""
    x, y = data.split("train")
    return training.sgd_train(model, x, y, steps=cfg.local_steps, batch_size=cfg.batch_size, lr=cfg.lr,
                              momentum=cfg.momentum, weight_decay=cfg.weight_decay, gen=gen,
                              epochs=cfg.local_epochs, budget=budget)


def local_sgd_chunk(model, thetas: torch.Tensor, datas, cfg, gens, budgets=None
                    ) -> tuple[torch.Tensor, list[int], list[float]]:
    """`local_sgd` for a chunk of clients at once (rows of `thetas`), equal to it to rounding."""
    splits = [d.split("train") for d in datas]
    return vectorized.sgd_train_chunk(model, thetas, [x for x, _ in splits], [y for _, y in splits],
                                      steps=cfg.local_steps, batch_size=cfg.batch_size, lr=cfg.lr, gens=gens,
                                      momentum=cfg.momentum, weight_decay=cfg.weight_decay, epochs=cfg.local_epochs,
                                      budgets=budgets)


def local_update(model, theta: torch.Tensor, data: ClientData, cfg, gen,
                 budget: int | None = None) -> tuple[torch.Tensor, int, float]:
    """Local SGD from theta: (theta - theta', samples processed, mean training loss); theta' stays in
    the model."""
    load_flat(model, theta)
    seen, loss = local_sgd(model, data, cfg, gen, budget)
    return theta - flat_params(model), seen, loss


def update_sums(delta: torch.Tensor, n: float, staleness: int = 0) -> dict[str, torch.Tensor]:
    """A client's summable reply: its change weighted by its train samples, and the weight (float64,
    so that the server's total count is exact). An asynchronous (FedBuff) update whose start model
    is `staleness` server updates old has its change weighted by 1/sqrt(1 + staleness) too, but not
    its count: the server's step shrinks, as in FedBuff's buffer mean."""
    scale = n if staleness == 0 else n * staleness_weight(staleness)
    return {"delta": delta * scale, "n": torch.tensor(n, dtype=torch.float64)}


def sgd_reply(cfg, bcast: torch.Tensor, data: ClientData, ctx: ClientContext) -> Reply:
    """FedAvg's client step: local SGD from the global model (at most the straggler budget's steps),
    answered with `update_sums`."""
    delta, seen, loss = local_update(client_model(ctx), bcast, data, cfg, ctx.generator("sgd"), ctx.budget)
    return Reply(sums=update_sums(delta, float(data.n("train")), ctx.staleness), n_train=seen, train_loss=loss)


def finetune_and_evaluate(model, data: ClientData, steps: int, lr: float, batch_size: int, gen) -> dict:
    """`steps` plain SGD steps on the client's train split (none without one), then val/test."""
    if steps > 0 and data.n("train") > 0:
        x, y = data.split("train")
        training.sgd_train(model, x, y, steps=steps, batch_size=batch_size, lr=lr, gen=gen)
    return training.evaluate_splits(model, data)


def finetune_reply(theta: torch.Tensor, data: ClientData, ctx: ClientContext, steps: int, lr: float,
                   batch_size: int) -> Reply:
    """The evaluation reply of the client model loaded with theta after `finetune_and_evaluate`'s
    steps, their batches from `ctx.generator("finetune")`."""
    model = client_model(ctx)
    load_flat(model, theta)
    return Reply(evals=finetune_and_evaluate(model, data, steps, lr, batch_size, ctx.generator("finetune")))


def descend(theta: torch.Tensor, total: torch.Tensor, n, rate: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(theta - rate * step, step) with step = total / n, the clients' mean change; the step is
    divided in the sums' dtype and only then cast to theta's."""
    step = total / n
    return theta - rate * step.to(theta.dtype), step


def server_step(state: GlobalModelState, sums, n_clients: int, rate: float) -> dict[str, float]:
    """The FedAvg server step on `state.theta` from `update_sums` added over the clients. Under
    [privacy] the sums are the noised release and "n" the fixed denominator, even with no client."""
    if "n" not in sums or float(sums["n"]) <= 0:
        return {"clients": 0.0}
    state.theta, step = descend(state.theta, sums["delta"], float(sums["n"]), rate)
    return {"update_norm": float(step.norm())}


def global_privacy(covers: str) -> PrivacySupport:
    """[privacy] of a method whose only release is the kit's global-model update: the "update"
    phase's `update_sums` (delta weighted by n) form it."""
    return PrivacySupport(released=(("update", ("delta",)),), covers=covers)


class GlobalModelMethod(Algorithm):
    """The server side of a method with one global model: one "update" phase per round, one
    "evaluate" phase, theta broadcast to every client, the server step at `cfg.server_lr`.
    A method adds its client step (`client`) and whatever else it needs."""

    def init(self, cfg, task: Task, seed: int) -> GlobalModelState:
        return GlobalModelState(initial_model(task, seed))

    def train_phases(self, cfg, state, round):
        return ("update",)

    def eval_phases(self, cfg, state, cohort):
        return ("evaluate",)

    def broadcast(self, phase, cfg, state, info: RoundInfo):
        return state.theta

    def finish(self, phase, cfg, state, sums, n_clients, info):
        return server_step(state, sums, n_clients, cfg.server_lr)

    def privacy_zeros(self, phase, cfg, state):
        return {"delta": torch.zeros_like(state.theta)}
