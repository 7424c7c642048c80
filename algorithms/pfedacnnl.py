"""pFedACnnL (Gu, You, Guo, Qu, Ren, Xie, Luo, 2025, "Analytic Personalized Federated
Meta-Learning", arXiv 2502.06915): FedACnnL's global layer-wise solve (kit/acnnl.py), then a
closed-form personal head per client.

Client i with head inputs H_i (its train split through the solved hidden layers, plus the bias
column) and one-hot labels Y_i solves
    W_i = argmin ||H_i W - Y_i||^2 + lambda ||W - W_ref||^2 = (H_i^T H_i + lambda I)^{-1}(H_i^T Y_i + lambda W_ref)
with W_ref the global head. It is a function of the global model and the client's own data only.
From the paper: the personal model as the analytic solution of a local objective that pulls the
global model toward the client's data, and grouping clients with similar data distributions.

[reconstructed] choices (config options, default first), on top of FedACnnL's (fedacnnl.py):
- `lambdas = (1, 10, 100, 1000, 10000, 100000)`: lambda is picked per client by accuracy on its
  validation split (ties go to the larger lambda, i.e. closer to the global head);
  `include_global = true` also lets the client keep W_ref itself (lambda -> infinity), so a client
  whose validation data say personalization does not help is not forced to use it. A client with
  no validation samples uses the largest lambda of the grid.
- the personal head is computed at evaluation, for seen and unseen clients alike, from the
  client's train split and the current global model; nothing is stored per client, so it can
  never be stale after a later round re-solves the global model.
- `groups = 0` (off). groups = G > 0 clusters clients by the label histogram of their train
  split with federated k-means before the layer phases: phase "cluster0" assigns each client to
  group (dominant class * G // num_classes) (deterministic), and each of `cluster_iters` phases
  sends only summable statistics (per-group sums of histograms and counts, G x C) so that the
  server recomputes the centroids (an empty group keeps its centroid). Hidden layers stay
  shared; the head is solved once per group (per-group Gram sums, G x d x d), and W_ref of a
  client is the head of its nearest centroid (ties to the lower index; unseen clients too).
  A group without data uses the global head.
[privacy] is refused, as for FedACnnL: its Gram (and group) statistics would need per-client
clipping and noise, which is not implemented.

- [system] clock: as FedACnnL's, partial work is refused and `fedbuff` too; the cluster phases
  are exchanges of the round like the layer phases.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from simfed.algorithms.base import Capabilities, ClientData, Eval, ModelNeeds, NoPrivacy, Reply, Task, Work
from simfed.algorithms.kit import analytic
from simfed.algorithms.kit.acnnl import (AnalyticFields, LayerwiseMethod, geometry, layer_statistics, outputs_eval,
                                         selected, tokens)
from simfed.algorithms.kit.workload import FLOAT64, tensor_bytes
from simfed.algorithms.registry import register
from simfed.core.errors import SimfedError


@dataclass(frozen=True)
class PFedACnnLConfig(AnalyticFields):
    lambdas: tuple[float, ...] = (1.0, 10.0, 100.0, 1000.0, 10000.0, 100000.0)
    include_global: bool = True
    groups: int = 0
    cluster_iters: int = 10

    def __post_init__(self):
        super().__post_init__()
        if isinstance(self.lambdas, list):
            object.__setattr__(self, "lambdas", tuple(self.lambdas))
        if not self.lambdas or any(not (float(v) > 0) for v in self.lambdas):
            raise ValueError(f"lambdas must be a non-empty list of numbers > 0, got {self.lambdas!r}")
        if self.groups < 0 or self.cluster_iters < 0:
            raise ValueError("groups and cluster_iters must be >= 0")


def histogram(y: torch.Tensor, num_classes: int) -> torch.Tensor:
    counts = torch.bincount(y, minlength=num_classes).to(device="cpu", dtype=torch.float64)
    return counts / counts.sum().clamp_min(1.0)  # on the CPU, like the centroids it is compared with


def nearest(hist: torch.Tensor, centroids: torch.Tensor) -> int:
    return int(((centroids - hist) ** 2).sum(1).argmin())


@register
class PFedACnnL(LayerwiseMethod):
    name = "pfedacnnl"
    Config = PFedACnnLConfig
    summary = "pFedACnnL: FedACnnL + per-client closed-form head toward the global one (Gu et al. 2025)"
    # the shared layers; group and head phases per client; the network: a chain of solvable layers
    capabilities = Capabilities(chunk_sums=True, partial="refuse", model=ModelNeeds(chain=True, own_network=True),
                                privacy=NoPrivacy(
        "its layers are least-squares solves from summed Gram matrices (and per-group sums with groups > 0); "
        "clipping and noising those statistics is not implemented, so no guarantee is offered"))

    def work(self, phase, cfg, task, n_train) -> Work:
        """The cluster phases: the centroids down, per-group histogram sums up; the head phase with
        groups adds the centroids and group heads down and per-group Gram sums up."""
        n, g, k = int(n_train), cfg.groups, task.num_classes
        if phase.startswith("cluster"):
            down = 0 if phase == "cluster0" else tensor_bytes(g * k, itemsize=FLOAT64)
            up = tensor_bytes(g * k, g, itemsize=FLOAT64) if n > 0 else 0
            return Work(samples=n, steps=1 if n > 0 else 0, bytes_down=down, bytes_up=up)
        base = super().work(phase, cfg, task, n_train)
        if not self._head_phase(cfg, task, phase):
            return base
        head = geometry(cfg, task)[-1]
        down = base.bytes_down + tensor_bytes(g * k, g * head.d * head.width, itemsize=FLOAT64)
        up = tensor_bytes(g * head.d * head.d, g * head.d * head.width, 1, itemsize=FLOAT64) if n > 0 else 0
        return Work(samples=base.samples, steps=base.steps, bytes_down=down, bytes_up=up)

    def init(self, cfg, task: Task, seed: int):
        state = super().init(cfg, task, seed)
        g = max(cfg.groups, 1)
        state.centroids = torch.zeros(g, task.num_classes, dtype=torch.float64)
        head = geometry(cfg, task)[-1]
        state.group_heads = torch.zeros(g, head.d, head.width, dtype=torch.float64)
        return state

    def train_phases(self, cfg, state, round):
        layers = super().train_phases(cfg, state, round)
        if cfg.groups == 0:
            return layers
        return tuple(f"cluster{j}" for j in range(cfg.cluster_iters + 1)) + tuple(layers)

    def _head_phase(self, cfg, task, phase) -> bool:
        return cfg.groups > 0 and phase == f"layer{len(tokens(cfg, task)) - 1}"

    def broadcast(self, phase, cfg, state, info):
        if phase.startswith("cluster"):
            return {"centroids": None if phase == "cluster0" else state.centroids}
        out = dict(super().broadcast(phase, cfg, state, info))
        if info.mode == "eval" or self._head_phase(cfg, state._task, phase):
            out["centroids"] = state.centroids if cfg.groups > 0 else None
            out["group_heads"] = state.group_heads if cfg.groups > 0 else None
        return out

    def client(self, phase, cfg, bcast, payload, data: ClientData, cstate, ctx) -> Reply:
        k = ctx.task.num_classes
        if ctx.mode == "train" and (phase.startswith("cluster") or self._head_phase(cfg, ctx.task, phase)):
            if not selected(cfg, ctx.seed, ctx.round, ctx.client_id):
                return Reply()  # outside this round's client_fraction
            x, y = data.split("train")
            n = int(y.shape[0])
            if n == 0:
                return Reply()
            hist = histogram(y, k)
            if phase == "cluster0":
                g = int(hist.argmax()) * cfg.groups // k
            else:
                g = nearest(hist, bcast["centroids"])
            onehot = torch.zeros(cfg.groups, dtype=torch.float64)
            onehot[g] = 1.0
            if phase.startswith("cluster"):
                return Reply(sums={"S": onehot[:, None] * hist[None, :], "cnt": onehot}, n_train=n)
            layers = geometry(cfg, ctx.task)
            a, b = layer_statistics(cfg, layers, len(layers) - 1, bcast, x, y, ctx)
            # One-hot over groups: summing these gives every group's Gram sums at O(G d^2).
            return Reply(sums={"Ag": onehot[:, None, None] * a, "bg": onehot[:, None, None] * b,
                               "n": torch.tensor(float(n), dtype=torch.float64)}, n_train=n)
        return super().client(phase, cfg, bcast, payload, data, cstate, ctx)

    def chunk_sums(self, phase, cfg, bcast, clients):
        if clients and self._head_phase(cfg, clients[0][1].task, phase):
            return None  # per-group sums need each client's group: one client at a time
        return super().chunk_sums(phase, cfg, bcast, clients)

    def finish(self, phase, cfg, state, sums, n_clients, info):
        if info.mode == "eval":
            return None  # evaluation never changes the model
        if phase.startswith("cluster"):
            if n_clients == 0 or "cnt" not in sums:
                raise SimfedError(f"{self.name} {phase}: no client sent a label histogram (empty cohort or all "
                                  "replies dropped); cannot group clients")
            has = sums["cnt"] > 0
            state.centroids[has] = sums["S"][has] / sums["cnt"][has, None]
            return {"groups_nonempty": float(has.sum())}
        if not self._head_phase(cfg, state._task, phase):
            return super().finish(phase, cfg, state, sums, n_clients, info)
        i = len(state.weights) - 1
        if n_clients == 0 or "Ag" not in sums:
            return super().finish(phase, cfg, state, {}, 0, info)  # the clear zero-clients error
        where = f"{self.name} layer {i} ({tokens(cfg, state._task)[i]})"
        out = super().finish(phase, cfg, state, {"A": sums["Ag"].sum(0), "b": sums["bg"].sum(0), "n": sums["n"]},
                             n_clients, info)
        heads = state.weights[i].expand(cfg.groups, -1, -1).clone()
        for g in range(cfg.groups):
            if float(sums["Ag"][g, -1, -1]) > 0:  # the bias entry counts the group's samples
                heads[g] = analytic.solve(sums["Ag"][g], sums["bg"][g], cfg.gamma, f"{where}, group {g}")
        state.group_heads = heads
        return out

    def evaluate(self, cfg, layers, bcast, data: ClientData, ctx) -> dict[str, Eval]:
        weights = [w.to(ctx.device) for w in bcast["weights"]]  # the client's samples live on its device
        w_ref = weights[-1]
        xtr, ytr = data.split("train")
        if cfg.groups > 0 and ytr.shape[0] > 0:
            g = nearest(histogram(ytr, ctx.task.num_classes), bcast["centroids"])
            w_ref = bcast["group_heads"][g].to(ctx.device)
        head = personal_head(cfg, layers, weights, w_ref, data, ctx.task.num_classes)
        out = {}
        for split in ("val", "test"):
            if data.n(split) > 0:
                x, y = data.split(split)
                out[split] = outputs_eval(head_outputs(cfg, layers, weights, head, x), y)
        return out


def features(cfg, layers, weights, x: torch.Tensor) -> torch.Tensor:
    """The head's inputs (float64) with the bias column."""
    h = analytic.forward(layers, weights, x.to(torch.float64), cfg.activation, cfg.pool, upto=len(layers) - 1)
    return analytic.with_bias(h.reshape(h.shape[0], -1))


def head_outputs(cfg, layers, weights, head: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return features(cfg, layers, weights, x) @ head


def personal_head(cfg, layers, weights, w_ref: torch.Tensor, data: ClientData, num_classes: int) -> torch.Tensor:
    """W_i = (H^T H + lambda I)^{-1}(H^T Y + lambda W_ref), lambda picked on the validation split."""
    if data.n("train") == 0:
        return w_ref
    x, y = data.split("train")
    h = features(cfg, layers, weights, x)
    a, b = h.T @ h, h.T @ torch.nn.functional.one_hot(y, num_classes).to(torch.float64)
    grid = sorted((float(v) for v in cfg.lambdas), reverse=True)  # larger lambda first: ties stay closer to W_ref
    where = f"pfedacnnl personal head of client {data.client_id}"
    if data.n("val") == 0:
        return analytic.ridge_toward(a, b, grid[0], w_ref, where)
    xv, yv = data.split("val")
    hv = features(cfg, layers, weights, xv)
    best, best_acc = (w_ref, int(((hv @ w_ref).argmax(1) == yv).sum())) if cfg.include_global else (None, -1)
    for lam in grid:
        w = analytic.ridge_toward(a, b, lam, w_ref, where)
        acc = int(((hv @ w).argmax(1) == yv).sum())
        if acc > best_acc:
            best, best_acc = w, acc
    return best
