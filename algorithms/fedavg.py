"""FedAvg (McMahan et al., 2017, arXiv 1602.05629) on the shared client model.

Broadcast theta; each client runs k SGD steps (momentum 0.9 by default) and returns its
sample-weighted change; the server moves theta by server_lr times the weighted mean change.
`finetune_steps > 0` evaluates after that many local SGD steps from theta (the "FedAvg + FT"
baseline the meta-learning papers compare with); 0 evaluates the global model as is.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from simfed.algorithms.kit import training, vectorized
from simfed.algorithms.base import Algorithm, Capabilities, ClientContext, ClientData, Reply, RoundInfo, ServerState, Task
from simfed.algorithms.kit.models import flat_params, init_model, lenet_for, load_flat
from simfed.algorithms.registry import register
from simfed.core.errors import SimfedError


@dataclass(frozen=True)
class FedAvgConfig:
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 0.0
    batch_size: int = 32
    local_steps: int = 20
    # > 0 overrides local_steps: that many passes over the client's train split, each sample once
    # per epoch (seeded shuffle, last batch partial, like a DataLoader without drop_last)
    local_epochs: float = 0.0
    server_lr: float = 1.0
    finetune_steps: int = 0
    finetune_lr: float = 0.01

    def __post_init__(self):
        if self.lr <= 0 or self.batch_size < 1 or self.local_steps < 1 or self.server_lr <= 0:
            raise ValueError("lr and server_lr must be > 0, batch_size and local_steps >= 1")
        if self.finetune_steps < 0 or self.local_epochs < 0:
            raise ValueError("finetune_steps and local_epochs must be >= 0")


class GlobalModelState(ServerState):
    def __init__(self, theta: torch.Tensor):
        self.theta = theta


def client_model(ctx: ClientContext) -> torch.nn.Module:
    return ctx.module("lenet", lambda: lenet_for(ctx.task.input_shape, ctx.task.num_classes))


def local_sgd(model, data: ClientData, cfg, gen) -> tuple[int, float]:
    """Local SGD in place; returns (samples processed, mean training loss)."""
    x, y = data.split("train")
    return training.sgd_train(model, x, y, steps=cfg.local_steps, batch_size=cfg.batch_size, lr=cfg.lr,
                              momentum=cfg.momentum, weight_decay=cfg.weight_decay, gen=gen,
                              epochs=cfg.local_epochs)


def local_sgd_chunk(model, thetas: torch.Tensor, datas, cfg, gens) -> tuple[torch.Tensor, list[int], list[float]]:
    """`local_sgd` for a chunk of clients at once (rows of `thetas`), equal to it to rounding."""
    splits = [d.split("train") for d in datas]
    return vectorized.sgd_train_chunk(model, thetas, [x for x, _ in splits], [y for _, y in splits],
                                      steps=cfg.local_steps, batch_size=cfg.batch_size, lr=cfg.lr, gens=gens,
                                      momentum=cfg.momentum, weight_decay=cfg.weight_decay, epochs=cfg.local_epochs)


def finetune_and_evaluate(model, data: ClientData, steps: int, lr: float, batch_size: int, gen) -> dict:
    if steps > 0 and data.n("train") > 0:
        x, y = data.split("train")
        training.sgd_train(model, x, y, steps=steps, batch_size=batch_size, lr=lr, gen=gen)
    return training.evaluate_splits(model, data)


@register
class FedAvg(Algorithm):
    name = "fedavg"
    Config = FedAvgConfig
    summary = "FedAvg: weighted average of local SGD updates (McMahan et al. 2017)"
    capabilities = Capabilities(chunk_replies=frozenset({"update"}))

    def init(self, cfg, task: Task, seed: int) -> GlobalModelState:
        model = init_model(lenet_for(task.input_shape, task.num_classes), seed)
        return GlobalModelState(flat_params(model))

    def validate(self, cfg, task: Task) -> None:
        try:
            lenet_for(task.input_shape, task.num_classes)
        except ValueError as exc:
            raise SimfedError(f"[algorithm] {self.name}: {exc}") from None

    def train_phases(self, cfg, state, round):
        return ("update",)

    def eval_phases(self, cfg, state, cohort):
        return ("evaluate",)

    def broadcast(self, phase, cfg, state, info: RoundInfo):
        return state.theta

    def client(self, phase, cfg, bcast, payload, data, cstate, ctx) -> Reply:
        model = client_model(ctx)
        load_flat(model, bcast)
        if ctx.mode == "eval":
            evals = finetune_and_evaluate(model, data, cfg.finetune_steps, cfg.finetune_lr, cfg.batch_size,
                                          ctx.generator("finetune"))
            return Reply(evals=evals)
        seen, loss = local_sgd(model, data, cfg, ctx.generator("sgd"))
        n = float(data.n("train"))
        delta = bcast - flat_params(model)
        return Reply(sums={"delta": delta * n, "n": torch.tensor(n, dtype=torch.float64)}, n_train=seen,
                     train_loss=loss)

    def chunk_replies(self, phase, cfg, bcast, payloads, datas, cstates, ctxs) -> list[Reply]:
        model = client_model(ctxs[0])
        start = bcast.to(ctxs[0].device)
        new, seen, losses = local_sgd_chunk(model, start.expand(len(datas), -1), datas, cfg,
                                            [c.generator("sgd") for c in ctxs])
        replies = []
        for d, row, s, loss in zip(datas, new, seen, losses):
            n = float(d.n("train"))
            replies.append(Reply(sums={"delta": (start - row) * n, "n": torch.tensor(n, dtype=torch.float64)},
                                 n_train=s, train_loss=loss))
        return replies

    def finish(self, phase, cfg, state, sums, n_clients, info):
        if n_clients == 0 or "n" not in sums or float(sums["n"]) <= 0:
            return {"clients": 0.0}
        step = sums["delta"] / float(sums["n"])
        state.theta = state.theta - cfg.server_lr * step.to(state.theta.dtype)
        return {"update_norm": float(step.norm())}
