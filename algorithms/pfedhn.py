"""pFedHN: personalized federated hypernetworks (Shamsian, Navon, Fetaya, Chechik; ICML 2021,
arXiv 2103.04628), as specified in shared/ALGORITHMS.md.

The server holds a per-client embedding e_i and a hypernetwork h (Linear(d, 100), 3 x [ReLU,
Linear(100, 100)], one linear head per LeNet tensor). One phase per round: the server produces
theta_i = h(e_i) for a chunk of clients in one batched forward pass; the client runs k SGD steps
and returns delta_i = theta_i - theta_i'; the server accumulates the vector-Jacobian product
J_h(e_i)^T delta_i into h's gradient as each reply arrives (O(model) memory) and keeps the
(small) embedding gradient per client; `finish` averages h's gradient over the clients that
replied, clips it and takes an SGD step.

Reconstructed choices (config options, defaults in brackets):
- embed_dim [0 = 1 + n/4, n the number of clients if the task says, else 26 (n = 100)]: the
  server API does not hand the client list to init, so set it for other client counts.
- Embedding rows are created lazily, N(0, 1) seeded by (run seed, client id) as nn.Embedding's
  default; each row is updated only when its client replies, by plain SGD with embed_lr
  [1e-2], embed_weight_decay [1e-3] and its own gradient clipped at server_clip, not averaged
  over the cohort (only that client contributes to it; pFedHN's code takes one client per step).
- Unseen clients: h frozen, a fresh N(0, 1) embedding (seeded by client id) is fitted by
  `unseen_exchanges` [10] eval phases of the same exchange, each an SGD step of `unseen_lr`
  [5e-2] on that client's embedding only; a final phase evaluates h(e_new). The fitted
  embeddings are evaluation scratch (`_unseen`), never training state.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from simfed.algorithms import hypernet as hn
from simfed.algorithms import training
from simfed.algorithms.base import Algorithm, Reply, ServerState, Task
from simfed.algorithms.fedavg import client_model
from simfed.algorithms.models import init_model, load_flat
from simfed.algorithms.registry import register
from simfed.engine.errors import SimfedError


@dataclass(frozen=True)
class PFedHNConfig:
    embed_dim: int = 0
    hidden: int = 100
    n_hidden: int = 3
    local_steps: int = 50
    batch_size: int = 32
    lr: float = 5e-3
    momentum: float = 0.9
    weight_decay: float = 5e-5
    clip: float = 50.0
    server_lr: float = 1e-2
    server_momentum: float = 0.9
    server_weight_decay: float = 1e-3
    server_clip: float = 50.0
    embed_lr: float = 1e-2
    embed_weight_decay: float = 1e-3
    unseen_exchanges: int = 10
    unseen_lr: float = 5e-2
    target_shapes: tuple = ()

    def __post_init__(self):
        object.__setattr__(self, "target_shapes", hn.normalize_shapes(self.target_shapes))
        if self.embed_dim < 0 or self.hidden < 1 or self.n_hidden < 0:
            raise ValueError("embed_dim must be >= 0 (0 = 1 + n/4), hidden >= 1, n_hidden >= 0")
        if self.local_steps < 1 or self.batch_size < 1 or self.unseen_exchanges < 0:
            raise ValueError("local_steps and batch_size must be >= 1, unseen_exchanges >= 0")
        if min(self.lr, self.server_lr, self.embed_lr, self.unseen_lr) <= 0:
            raise ValueError("lr, server_lr, embed_lr and unseen_lr must be > 0")


class PFedHNState(ServerState):
    def __init__(self, hnet, opt, emb: dict, dim: int, seed: int):
        self.hnet, self.opt, self.emb, self.dim, self.seed = hnet, opt, emb, dim, seed
        self._egrad: dict = {}  # round scratch: client id -> d<h(e_i), delta_i>/de_i
        self._n = 0
        self._unseen: dict = {}  # eval scratch: fitted embeddings of unseen clients


def thetas(state, rows: list[torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        return state.hnet(torch.stack(rows))


@register
class PFedHN(Algorithm):
    name = "pfedhn"
    Config = PFedHNConfig
    summary = "pFedHN: server hypernetwork maps per-client embeddings to client models (Shamsian et al. 2021)"

    def validate(self, cfg, task: Task) -> None:
        hn.check_targets(cfg.target_shapes, task, self.name)

    def init(self, cfg, task: Task, seed: int) -> PFedHNState:
        shapes = hn.check_targets(cfg.target_shapes, task, self.name)
        dim = hn.default_embed_dim(task, cfg.embed_dim)
        hnet = init_model(hn.HyperNet(dim, shapes, cfg.hidden, cfg.n_hidden), seed)
        opt = torch.optim.SGD(hnet.parameters(), lr=cfg.server_lr, momentum=cfg.server_momentum,
                              weight_decay=cfg.server_weight_decay)
        return PFedHNState(hnet, opt, {}, dim, seed)

    def train_phases(self, cfg, state, round):
        return ("train",)

    def eval_phases(self, cfg, state, cohort):
        fits = tuple(f"fit{j}" for j in range(cfg.unseen_exchanges)) if cohort == "unseen" else ()
        return fits + ("evaluate",)

    def _row(self, state, cid, info) -> torch.Tensor:
        if info.mode == "eval" and info.cohort == "unseen":
            if cid not in state._unseen:
                state._unseen[cid] = hn.embedding_row({}, cid, state.dim, state.seed, "pfedhn-unseen")
            return state._unseen[cid]
        return hn.embedding_row(state.emb, cid, state.dim, state.seed, "pfedhn-embed",
                                store=info.mode == "train")

    def payloads(self, phase, cfg, state, client_ids, info):
        if phase == "fit0":  # a new evaluation of the unseen cohort starts from fresh embeddings
            for cid in client_ids:
                state._unseen.pop(int(cid), None)
        ids = [int(c) for c in client_ids]
        th = thetas(state, [self._row(state, c, info) for c in ids])
        # clone: a row view would pickle th's whole storage, i.e. every client of the chunk's
        # theta in each client's payload (chunk-size times the bytes through the object store)
        return {c: th[j].clone() for j, c in enumerate(ids)}

    def client(self, phase, cfg, bcast, payload, data, cstate, ctx) -> Reply:
        if payload is None:
            return Reply()
        model = client_model(ctx)
        if phase == "evaluate":
            load_flat(model, payload)
            return Reply(evals=training.evaluate_splits(model, data))
        if data.n("train") < 1:
            raise SimfedError(f"pfedhn: client {ctx.client_id} has no training samples; every client needs >= 1")
        x, y = data.split("train")
        delta, seen = hn.train_delta(model, payload, x, y, steps=cfg.local_steps, batch_size=cfg.batch_size,
                                     lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay,
                                     clip=cfg.clip, gen=ctx.generator("sgd"))
        return Reply(item=delta, n_train=seen if ctx.mode == "train" else 0)

    def absorb(self, phase, cfg, state, client_id, item, info):
        if item is None:
            return
        cid = int(client_id)
        if phase == "train":
            e = hn.embedding_row(state.emb, cid, state.dim, state.seed, "pfedhn-embed")
            state._egrad[cid] = hn.vjp_(state.hnet, e[None], item[None])[0]
            state._n += 1
        elif phase.startswith("fit"):
            # h is frozen for unseen clients: only the input gradient, no parameter gradients.
            g = hn.vjp_(state.hnet, state._unseen[cid][None], item[None], params=False)[0]
            hn.sgd_rows_(state._unseen, {cid: g}, cfg.unseen_lr, 0.0, cfg.server_clip)

    def finish(self, phase, cfg, state, sums, n_clients, info):
        if phase != "train":
            if phase == "evaluate":
                state._unseen.clear()
            return None
        n, state._n = state._n, 0
        params = list(state.hnet.parameters())
        if n == 0:
            state.opt.zero_grad(set_to_none=True)
            return {"clients": 0.0}
        for p in params:
            if p.grad is not None:
                p.grad.div_(n)
        norm = hn.grad_norm_clip_(params, cfg.server_clip)
        state.opt.step()
        state.opt.zero_grad(set_to_none=True)
        hn.sgd_rows_(state.emb, state._egrad, cfg.embed_lr, cfg.embed_weight_decay, cfg.server_clip)
        state._egrad = {}
        return {"clients": float(n), "hnet_grad_norm": norm}
