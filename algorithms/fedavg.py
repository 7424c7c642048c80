"""FedAvg (McMahan, Moore, Ramage, Hampson, Aguera y Arcas, AISTATS 2017, arXiv 1602.05629).

Broadcast theta; each client runs k SGD steps (momentum 0.9 by default) from it and returns its
sample-weighted change; the server moves theta by server_lr times the weighted mean change.

From the paper: the client step (local SGD from the global model) and the sample-weighted
average of the client models, i.e. the mean change applied with server_lr = 1. No code of the
authors is involved. Ours (config keys, defaults in brackets):
- `local_steps` [20] batches of `batch_size` [32] drawn without replacement, or `local_epochs`
  [0; > 0 overrides] whole passes; `momentum` [0.9] and `weight_decay` [0] (the paper's client SGD
  has neither).
- `server_lr` [1.0] scales the server step (1 = the paper's average).
- `finetune_steps` [0] > 0 evaluates after that many local SGD steps of `finetune_lr` [0.01] from
  theta (the "FedAvg + FT" baseline the meta-learning papers compare with); 0 evaluates the global
  model as is.
- Batches come from `ClientContext.generator` ("sgd" in training, "finetune" at evaluation).
- Vectorized client step (`engine.vectorize`): `chunk_replies` trains a whole chunk of clients at
  once (kit/vectorized.py), equal to the per-client loop to rounding.
- [system] clock: a straggler under stragglers = "partial" takes the local steps it finishes by
  the deadline (`ClientContext.budget`) and its update counts (weighted by its samples as any);
  FedBuff (`[run] aggregation = "fedbuff"`): the update is weighted by 1/sqrt(1 + staleness).
The global model, the client step and the server step are the shared kit/globalmodel.py.
[privacy] (DP-FedAvg, docs/privacy.md) protects the global model: the engine clips each client's
update and noises their sum.
"""

from __future__ import annotations

from dataclasses import dataclass

from simfed.algorithms.base import Capabilities, Reply
from simfed.algorithms.kit.globalmodel import (GlobalModelMethod, GlobalSGDFields, client_model, finetune_reply,
                                               global_privacy, local_sgd_chunk, sgd_reply, update_sums)
from simfed.algorithms.registry import register


@dataclass(frozen=True)
class FedAvgConfig(GlobalSGDFields):
    finetune_steps: int = 0
    finetune_lr: float = 0.01

    def __post_init__(self):
        super().__post_init__()
        if self.finetune_steps < 0:
            raise ValueError("finetune_steps must be >= 0")


@register
class FedAvg(GlobalModelMethod):
    name = "fedavg"
    Config = FedAvgConfig
    summary = "FedAvg: weighted average of local SGD updates (McMahan et al. 2017)"
    capabilities = Capabilities(chunk_replies=frozenset({"update"}), asynchronous=True, partial="steps",
                                privacy=global_privacy("the global model (every round's noised mean update)"))

    def client(self, phase, cfg, bcast, payload, data, cstate, ctx) -> Reply:
        if ctx.mode == "eval":
            return finetune_reply(bcast, data, ctx, cfg.finetune_steps, cfg.finetune_lr, cfg.batch_size)
        return sgd_reply(cfg, bcast, data, ctx)

    def chunk_replies(self, phase, cfg, bcast, payloads, datas, cstates, ctxs) -> list[Reply]:
        start = bcast.to(ctxs[0].device)
        new, seen, losses = local_sgd_chunk(client_model(ctxs[0]), start.expand(len(datas), -1), datas, cfg,
                                            [c.generator("sgd") for c in ctxs], [c.budget for c in ctxs])
        return [Reply(sums=update_sums(start - row, float(d.n("train")), c.staleness), n_train=s, train_loss=loss)
                for d, c, row, s, loss in zip(datas, ctxs, new, seen, losses)]
