"""PeFLL: personalized federated learning by learning to learn (Scott, Zakerinia, Lampert;
ICLR 2024, arXiv 2306.05515), Algorithms 1 and 2 of the paper, as in shared/ALGORITHMS.md.

Server: hypernetwork h (eta_h; Table 5) and embedding network phi (eta_v; Table 4: the client
LeNet with C + num_classes input channels, the one-hot label as constant planes, output l).
A training round is the three exchanges of Algorithm 2, one phase each:
  describe: broadcast eta_v; the client draws a seeded batch B of `descriptor_batch` samples and
            returns v_i = mean_{(x,y) in B} phi(x, y) (item).
  model:    the server sends theta_i = h(v_i) (one batched forward pass per chunk); the client
            runs k SGD steps and returns delta_i = theta_i - theta_i' (item); on arrival the
            server accumulates J_h(v_i)^T g_i into eta_h's gradient (g_i = delta_i +
            2 lambda_theta theta_i, the per-client objective's gradient proxy) and keeps dv_i =
            J_v^T g_i.
  embed:    the server sends dv_i; the client recomputes v on the SAME batch B (the batch seed
            depends on run seed, round and client, not on the phase) and returns the eta_v
            gradient d<v(B), dv_i>/d eta_v as a summable message.
finish(embed): average over the clients that replied, add the L2 terms of objective (1)
(2 lambda_h eta_h, 2 lambda_v eta_v), clip each gradient at server_clip, one Adam step.
Because delta_i is a descent step (old - new), the server descends along it; this equals
Algorithm 2's eta += mean(Delta eta) with Delta theta = new - old.

Evaluation (seen and unseen alike, zero-shot, Algorithm 1): describe then evaluate with
theta = h(v(S_train)). Options: `label_free` (phi sees x only; paper Table 2), `label_mask`
(classes absent from the client's train split cannot be predicted).

Reconstructed choices (config options, defaults in brackets):
- embed_dim [0 = 1 + n/4 with n the clients if the task says, else 26].
- eval_descriptor ["train"]: the evaluation descriptor averages phi over the whole train split
  (ALGORITHMS.md); "batch" uses one seeded batch as in Algorithm 1.
- short_clients ["all"]: a client with fewer train samples than descriptor_batch uses all of
  them (v is a mean, so any batch size is valid; no resampling with replacement, which would
  weight some samples twice); "error" raises a SimfedError instead. A client with no train
  samples is always an error.
- server_clip [50] applies to eta_h's and eta_v's averaged gradients separately.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from simfed.algorithms import hypernet as hn
from simfed.algorithms import training
from simfed.algorithms.base import Algorithm, Reply, ServerState, Task, derive_seed
from simfed.algorithms.fedavg import client_model
from simfed.algorithms.models import flat_params, init_model, load_flat
from simfed.algorithms.registry import register
from simfed.engine.errors import SimfedError


@dataclass(frozen=True)
class PeFLLConfig:
    embed_dim: int = 0
    hidden: int = 100
    n_hidden: int = 3
    descriptor_batch: int = 32
    local_steps: int = 50
    batch_size: int = 32
    lr: float = 2e-3
    momentum: float = 0.9
    weight_decay: float = 5e-5
    clip: float = 50.0
    server_lr: float = 2e-4
    lambda_h: float = 1e-3
    lambda_v: float = 1e-3
    lambda_theta: float = 0.0
    server_clip: float = 50.0
    label_free: bool = False
    label_mask: bool = False
    eval_descriptor: str = "train"
    short_clients: str = "all"
    target_shapes: tuple = ()

    def __post_init__(self):
        object.__setattr__(self, "target_shapes", hn.normalize_shapes(self.target_shapes))
        if self.embed_dim < 0 or self.hidden < 1 or self.n_hidden < 0:
            raise ValueError("embed_dim must be >= 0 (0 = 1 + n/4), hidden >= 1, n_hidden >= 0")
        if self.descriptor_batch < 1 or self.local_steps < 1 or self.batch_size < 1:
            raise ValueError("descriptor_batch, local_steps and batch_size must be >= 1")
        if self.lr <= 0 or self.server_lr <= 0 or min(self.lambda_h, self.lambda_v, self.lambda_theta) < 0:
            raise ValueError("lr and server_lr must be > 0, lambda_h, lambda_v, lambda_theta >= 0")
        if self.eval_descriptor not in ("train", "batch"):
            raise ValueError(f"eval_descriptor must be 'train' or 'batch', got {self.eval_descriptor!r}")
        if self.short_clients not in ("all", "error"):
            raise ValueError(f"short_clients must be 'all' or 'error', got {self.short_clients!r}")


class PeFLLState(ServerState):
    def __init__(self, hnet, embed, opt):
        self.hnet, self.embed, self.opt = hnet, embed, opt
        self._v: dict = {}    # round scratch: client id -> descriptor v_i
        self._dv: dict = {}   # client id -> d<h(v_i), g_i>/dv_i
        self._n_h = 0         # replies absorbed into eta_h's gradient this round
        self._v_eval: dict = {}


def embed_module(ctx, cfg, dim: int):
    c = ctx.task.input_shape[0] + (0 if cfg.label_free else ctx.task.num_classes)
    return ctx.module(("pefll-embed", c, dim),
                      lambda: hn.embed_net(ctx.task.input_shape, ctx.task.num_classes, dim, not cfg.label_free))


def descriptor_batch(cfg, data, ctx) -> torch.Tensor:
    """Indices of the client's descriptor batch B; identical in the describe and embed phases."""
    n = data.n("train")
    if n < 1:
        raise SimfedError(f"pefll: client {ctx.client_id} has no training samples; every client needs >= 1")
    if n < cfg.descriptor_batch and cfg.short_clients == "error":
        raise SimfedError(f"pefll: client {ctx.client_id} has {n} train samples, fewer than descriptor_batch="
                          f"{cfg.descriptor_batch}; lower descriptor_batch or set short_clients = \"all\"")
    gen = torch.Generator().manual_seed(derive_seed(ctx.seed, ctx.round, ctx.mode, ctx.client_id, "pefll-batch"))
    return torch.randperm(n, generator=gen)[:cfg.descriptor_batch]


def descriptor(net, cfg, x, y, num_classes) -> torch.Tensor:
    """v = mean phi(x, y) over the rows given (differentiable w.r.t. the net's parameters)."""
    return net(hn.embed_input(x, None if cfg.label_free else y, num_classes)).mean(0)


@register
class PeFLL(Algorithm):
    name = "pefll"
    Config = PeFLLConfig
    summary = "PeFLL: embedding net + hypernetwork learn to produce client models (Scott et al. 2024)"

    def validate(self, cfg, task: Task) -> None:
        hn.check_targets(cfg.target_shapes, task, self.name)

    def init(self, cfg, task: Task, seed: int) -> PeFLLState:
        shapes = hn.check_targets(cfg.target_shapes, task, self.name)
        dim = hn.default_embed_dim(task, cfg.embed_dim)
        hnet = init_model(hn.HyperNet(dim, shapes, cfg.hidden, cfg.n_hidden), seed)
        embed = init_model(hn.embed_net(task.input_shape, task.num_classes, dim, not cfg.label_free),
                           derive_seed(seed, "pefll-embed"))
        opt = torch.optim.Adam(list(hnet.parameters()) + list(embed.parameters()), lr=cfg.server_lr)
        return PeFLLState(hnet, embed, opt)

    def train_phases(self, cfg, state, round):
        return ("describe", "model", "embed")

    def eval_phases(self, cfg, state, cohort):
        return ("describe", "evaluate")

    # --- server --------------------------------------------------------------------------
    def broadcast(self, phase, cfg, state, info):
        if phase in ("describe", "embed"):
            return {"eta_v": flat_params(state.embed), "dim": state.hnet.mlp[0].in_features}
        return None

    def payloads(self, phase, cfg, state, client_ids, info):
        if phase in ("model", "evaluate"):
            store = state._v if info.mode == "train" else state._v_eval
            ids = [int(c) for c in client_ids if int(c) in store]
            if not ids:
                return {}
            with torch.no_grad():
                th = state.hnet(torch.stack([store[c] for c in ids]))
            # clone: a row view would pickle th's whole storage, i.e. every client of the chunk's
            # theta in each client's payload (chunk-size times the bytes through the object store)
            return {c: th[j].clone() for j, c in enumerate(ids)}
        if phase == "embed":
            return {int(c): state._dv[int(c)] for c in client_ids if int(c) in state._dv}
        return None

    def absorb(self, phase, cfg, state, client_id, item, info):
        if item is None:
            return
        cid = int(client_id)
        if phase == "describe":
            (state._v if info.mode == "train" else state._v_eval)[cid] = item.detach().float()
        elif phase == "model":
            lam = cfg.lambda_theta
            grad = (lambda out: item[None] + 2 * lam * out) if lam > 0 else item[None]
            state._dv[cid] = hn.vjp_(state.hnet, state._v[cid][None], grad)[0]
            state._n_h += 1

    def finish(self, phase, cfg, state, sums, n_clients, info):
        if info.mode == "eval":
            if phase == "evaluate":
                state._v_eval = {}
            return None
        if phase != "embed":
            return None
        n_h, n_v = state._n_h, int(float(sums.get("n", 0.0))) if sums else 0
        hparams, vparams = list(state.hnet.parameters()), list(state.embed.parameters())
        out = {"clients_h": float(n_h), "clients_v": float(n_v)}
        if n_h > 0:
            for p in hparams:
                p.grad = p.grad / n_h + 2 * cfg.lambda_h * p.detach()
            out["eta_h_grad_norm"] = hn.grad_norm_clip_(hparams, cfg.server_clip)
        else:
            for p in hparams:
                p.grad = None
        if n_v > 0:
            g = sums["grad_v"].to(torch.float32) / n_v
            offset = 0
            for p in vparams:
                k = p.numel()
                p.grad = g[offset:offset + k].view_as(p) + 2 * cfg.lambda_v * p.detach()
                offset += k
            out["eta_v_grad_norm"] = hn.grad_norm_clip_(vparams, cfg.server_clip)
        else:
            for p in vparams:
                p.grad = None
        if n_h or n_v:
            state.opt.step()  # Adam skips parameters whose grad is None
        state.opt.zero_grad(set_to_none=True)
        state._v, state._dv, state._n_h = {}, {}, 0
        return out

    # --- client --------------------------------------------------------------------------
    def client(self, phase, cfg, bcast, payload, data, cstate, ctx) -> Reply:
        K = ctx.task.num_classes
        if phase == "describe":
            net = embed_module(ctx, cfg, bcast["dim"])
            load_flat(net, bcast["eta_v"])
            net.eval()
            with torch.no_grad():
                x, y = data.split("train")
                if ctx.mode == "eval" and cfg.eval_descriptor == "train":
                    if len(y) < 1:
                        raise SimfedError(f"pefll: client {ctx.client_id} has no training samples")
                    parts = [descriptor(net, cfg, x[s:s + 256], y[s:s + 256], K) * len(y[s:s + 256])
                             for s in range(0, len(y), 256)]
                    v = torch.stack(parts).sum(0) / len(y)
                else:
                    idx = descriptor_batch(cfg, data, ctx)
                    v = descriptor(net, cfg, x[idx], y[idx], K)
            return Reply(item=v)
        if payload is None:  # this client's earlier message was dropped: nothing to do
            return Reply()
        if phase == "embed":
            net = embed_module(ctx, cfg, bcast["dim"])
            load_flat(net, bcast["eta_v"])
            net.eval()
            x, y = data.split("train")
            idx = descriptor_batch(cfg, data, ctx)
            v = descriptor(net, cfg, x[idx], y[idx], K)
            grads = torch.autograd.grad(v, list(net.parameters()), grad_outputs=payload.to(v.dtype))
            flat = torch.cat([g.reshape(-1) for g in grads])
            return Reply(sums={"grad_v": flat, "n": torch.tensor(1.0, dtype=torch.float64)})
        model = client_model(ctx)
        if phase == "evaluate":
            load_flat(model, payload)
            mask = None
            if cfg.label_mask:
                mask = torch.bincount(data.split("train")[1], minlength=K)[:K] > 0
            return Reply(evals=training.evaluate_splits(model, data, class_mask=mask))
        x, y = data.split("train")
        delta, seen = hn.train_delta(model, payload, x, y, steps=cfg.local_steps, batch_size=cfg.batch_size,
                                     lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay,
                                     clip=cfg.clip, gen=ctx.generator("sgd"))
        return Reply(item=delta, n_train=seen)
