"""Local: every client trains only its own model; nothing is communicated after the start.

The usual lower baseline of the personalized-FL papers (no single paper). Each seen client keeps
its model as engine-held client state, starting from the same seeded initial model (the kit's
`initial_model`, from the run seed), and runs k SGD steps whenever it is sampled, with FedAvg's
local optimizer keys. Ours: an unseen client has no state, so at evaluation it trains from the
initial model for `unseen_steps` [200] steps on its own train split, which is what "Local" means
for a newcomer. Batches come from `ClientContext.generator` (tags "sgd" and "unseen").
[privacy] is refused: nothing leaves a client, so there is nothing to protect.

[system] clock: a straggler under stragglers = "partial" trains the steps it finishes by the
deadline; FedBuff is trivial (nothing reaches the server, clients train whenever they are free).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from simfed.algorithms.base import Capabilities, NoPrivacy, Reply, Work
from simfed.algorithms.kit.globalmodel import (GlobalModelMethod, LocalSGDFields, client_model, finetune_and_evaluate,
                                               local_sgd, local_sgd_chunk)
from simfed.algorithms.kit.models import flat_params, load_flat
from simfed.algorithms.registry import register


@dataclass(frozen=True)
class LocalConfig(LocalSGDFields):
    unseen_steps: int = 200

    def __post_init__(self):
        super().__post_init__()
        if self.unseen_steps < 0:
            raise ValueError("unseen_steps must be >= 0")


@register
class Local(GlobalModelMethod):
    """The kit's global model is every client's start; it never moves."""

    name = "local"
    Config = LocalConfig
    summary = "Local: each client trains its own model, no federation"
    capabilities = Capabilities(client_state=True, chunk_replies=frozenset({"train"}), asynchronous=True,
                                partial="steps", privacy=NoPrivacy(
        "local sends nothing to the server, so there is no release to protect (nothing leaves a client); "
        "run it without [privacy]"))

    def train_phases(self, cfg, state, round):
        return ("train",)

    def work(self, phase, cfg, task, n_train) -> Work:
        full = super().work(phase, cfg, task, n_train)
        return dataclasses.replace(full, bytes_up=0)  # the (unused) start model comes down; nothing goes up

    def finish(self, phase, cfg, state, sums, n_clients, info):
        return None  # clients send nothing back: no server step

    def client(self, phase, cfg, bcast, payload, data, cstate, ctx) -> Reply:
        model = client_model(ctx)
        load_flat(model, bcast if cstate is None else cstate)
        if ctx.mode == "eval":
            steps = cfg.unseen_steps if cstate is None else 0
            return Reply(evals=finetune_and_evaluate(model, data, steps, cfg.lr, cfg.batch_size,
                                                     ctx.generator("unseen")))
        seen, loss = local_sgd(model, data, cfg, ctx.generator("sgd"), ctx.budget)
        return Reply(state=flat_params(model), n_train=seen, train_loss=loss)

    def chunk_replies(self, phase, cfg, bcast, payloads, datas, cstates, ctxs) -> list[Reply]:
        device = ctxs[0].device
        starts = torch.stack([(bcast if s is None else s).to(device) for s in cstates])
        new, seen, losses = local_sgd_chunk(client_model(ctxs[0]), starts, datas, cfg,
                                            [c.generator("sgd") for c in ctxs], [c.budget for c in ctxs])
        return [Reply(state=row.clone(), n_train=s, train_loss=loss) for row, s, loss in zip(new, seen, losses)]
