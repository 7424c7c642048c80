"""Local: every client trains only its own model; nothing is communicated after the start.

Each seen client keeps its model as engine-held client state, starting from the same seeded
initial model, and runs k SGD steps whenever it is sampled. [reconstructed] An unseen client has
no state: at evaluation it trains from the initial model for `unseen_steps` steps on its own train
split, which is what "Local" means for a newcomer.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from simfed.algorithms.base import Algorithm, Capabilities, Reply
from simfed.algorithms.fedavg import FedAvg, client_model, finetune_and_evaluate, local_sgd, local_sgd_chunk
from simfed.algorithms.kit.models import flat_params, load_flat
from simfed.algorithms.registry import register


@dataclass(frozen=True)
class LocalConfig:
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 0.0
    batch_size: int = 32
    local_steps: int = 20
    local_epochs: float = 0.0  # > 0 overrides local_steps: passes over the train split, as in FedAvg
    unseen_steps: int = 200

    def __post_init__(self):
        if self.lr <= 0 or self.batch_size < 1 or self.local_steps < 1 or self.unseen_steps < 0:
            raise ValueError("lr must be > 0, batch_size and local_steps >= 1, unseen_steps >= 0")


@register
class Local(Algorithm):
    name = "local"
    Config = LocalConfig
    summary = "Local: each client trains its own model, no federation"
    capabilities = Capabilities(client_state=True, chunk_replies=frozenset({"train"}))

    init = FedAvg.init  # the shared, seeded initial model; it never changes

    def train_phases(self, cfg, state, round):
        return ("train",)

    def eval_phases(self, cfg, state, cohort):
        return ("evaluate",)

    def broadcast(self, phase, cfg, state, info):
        return state.theta

    def client(self, phase, cfg, bcast, payload, data, cstate, ctx) -> Reply:
        model = client_model(ctx)
        load_flat(model, bcast if cstate is None else cstate)
        if ctx.mode == "eval":
            steps = cfg.unseen_steps if cstate is None else 0
            return Reply(evals=finetune_and_evaluate(model, data, steps, cfg.lr, cfg.batch_size,
                                                     ctx.generator("unseen")))
        seen, loss = local_sgd(model, data, cfg, ctx.generator("sgd"))
        return Reply(state=flat_params(model), n_train=seen, train_loss=loss)

    def chunk_replies(self, phase, cfg, bcast, payloads, datas, cstates, ctxs) -> list[Reply]:
        device = ctxs[0].device
        starts = torch.stack([(bcast if s is None else s).to(device) for s in cstates])
        new, seen, losses = local_sgd_chunk(client_model(ctxs[0]), starts, datas, cfg,
                                            [c.generator("sgd") for c in ctxs])
        return [Reply(state=row.clone(), n_train=s, train_loss=loss) for row, s, loss in zip(new, seen, losses)]
