"""kNN-Per (Marfoq, Neglia, Vidal, Kameni, ICML 2022, arXiv 2111.09360): FedAvg model + local kNN.

Training is FedAvg (the kit's global model: the same client and server steps). At evaluation every client, seen or new,
embeds its own train split with the global model (the features are the input of the model's head:
its `head` submodule, else its last linear layer) and predicts
    p(y | x) = lam * p_kNN(y | x) + (1 - lam) * softmax(model(x)),
    p_kNN(c | x) = sum_{j in N_k(x)} w_j [y_j = c] / sum_{j in N_k(x)} w_j,  w_j = exp(-d_j / (D * scale)),
with N_k(x) the k train samples nearest to x in squared Euclidean distance d_j and D the feature
dimension. k and lam are chosen per client on its validation split from `ks` x `lambdas`; the test
split is then scored with the chosen pair. New clients need no training, only this.

From the paper: the interpolation of probabilities and the Gaussian-kernel kNN over the client's
own datastore. From the authors' code (omarfoq/knn-per; FL-bench's kNNPerClient, which PeFLL
used): the kernel exp(-d / (D * scale)) on squared L2 distances (faiss IndexFlatL2); the kNN
weights normalized over the k neighbours. From PeFLL's appendix: scale = 100 (best of
{0.1, 1, 10, 100}), k in {5, 10} and lam in {0, 0.1, ..., 1} chosen per client. Ours:
- The kNN weights are computed as a softmax of -d / (D * scale) over the k neighbours, which equals
  the authors' ratio and cannot divide 0 by 0 when every exp underflows.
- Selection: the (k, lam) with the highest validation accuracy, ties broken by the lower
  validation loss, then by the order of `ks` and `lambdas`. A client without validation samples uses
  k = ks[0] and lam = `fallback_lambda` [0.5].
- The loss reported is -log p(y | x) of the interpolated probabilities (clamped at 1e-12).
- k larger than a client's train split is an error by default (`strict_k` = true); with
  `strict_k` = false it falls back to k = n_train (all of the client's samples are neighbours).
  Every client's size is checked before the run starts (Algorithm.check_clients).
- [privacy] (docs/privacy.md) protects the global model (FedAvg's release); the kNN datastore is
  the client's own data and never leaves it.

- [system] clock: training is FedAvg's, so a straggler under stragglers = "partial" takes the
  steps it finishes by the deadline, and FedBuff weights an update by 1/sqrt(1 + staleness).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.nn import functional as F

from simfed.algorithms.base import Capabilities, Eval, ModelNeeds, Reply
from simfed.algorithms.kit import models
from simfed.algorithms.kit.globalmodel import GlobalModelMethod, GlobalSGDFields, client_model, global_privacy, sgd_reply
from simfed.algorithms.kit.models import load_flat
from simfed.algorithms.registry import register
from simfed.core.errors import SimfedError

LAMBDAS = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)  # a literal: `simfed algorithms` reads it from source


@dataclass(frozen=True)
class KNNPerConfig(GlobalSGDFields):
    ks: tuple[int, ...] = (5, 10)
    lambdas: tuple[float, ...] = LAMBDAS
    scale: float = 100.0
    strict_k: bool = True
    fallback_lambda: float = 0.5

    def __post_init__(self):
        super().__post_init__()
        if not self.ks or any(not isinstance(k, int) or isinstance(k, bool) or k < 1 for k in self.ks):
            raise ValueError(f"ks must be a non-empty list of integers >= 1, got {list(self.ks)}")
        lambdas = list(self.lambdas) + [self.fallback_lambda]
        if not self.lambdas or any(isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v <= 1
                                for v in lambdas):
            raise ValueError(f"lambdas and fallback_lambda must be numbers in [0, 1] (lam < 0 is not a mixture weight), "
                             f"got {list(self.lambdas)} and {self.fallback_lambda}")
        if not self.scale > 0:
            raise ValueError(f"scale must be > 0, got {self.scale}")


@torch.no_grad()
def features_and_probs(model, x: torch.Tensor, batch_size: int = 2048) -> tuple[torch.Tensor, torch.Tensor]:
    """(input of the head, softmax of the output) for every row of x; features flattened per row."""
    last = models.head_modules(model)[0]
    feats, probs = [], []
    hook = last.register_forward_hook(lambda m, inp, out: feats.append(inp[0].detach().flatten(1)))
    model.eval()
    try:
        for s in range(0, int(x.shape[0]), batch_size):
            probs.append(F.softmax(model(x[s:s + batch_size]), dim=1))
    finally:
        hook.remove()
    return torch.cat(feats), torch.cat(probs)


def knn_probs(query: torch.Tensor, keys: torch.Tensor, labels: torch.Tensor, k: int, scale: float,
              num_classes: int) -> torch.Tensor:
    """p_kNN(c | query) with the Gaussian kernel exp(-d / (D * scale)) over the k nearest keys."""
    q, kk = query.double(), keys.double()
    d = (q.square().sum(1, keepdim=True) - 2.0 * q @ kk.T + kk.square().sum(1)).clamp_min(0.0)
    dist, idx = torch.topk(d, k, dim=1, largest=False, sorted=True)
    w = torch.softmax(-dist / (query.shape[1] * scale), dim=1)
    out = torch.zeros(q.shape[0], num_classes, dtype=torch.float64, device=q.device)
    return out.scatter_add_(1, labels[idx], w)


def mixture_eval(p: torch.Tensor, y: torch.Tensor) -> tuple[float, int]:
    """(summed -log p(y), correct count) of a probability table."""
    loss = -p.gather(1, y.view(-1, 1)).clamp_min(1e-12).log().sum()
    return float(loss), int((p.argmax(1) == y).sum())


@register
class KNNPer(GlobalModelMethod):
    name = "knnper"
    Config = KNNPerConfig
    summary = "kNN-Per: FedAvg model interpolated with a local kNN on its features (Marfoq et al. 2022)"
    # features: the head's input
    capabilities = Capabilities(asynchronous=True, partial="steps", model=ModelNeeds(head=True), privacy=global_privacy(
        "the global model; the kNN datastore is each client's own data and is never sent"))

    def check_clients(self, cfg, n_train) -> None:
        if cfg.strict_k and n_train:
            cid = min(n_train, key=lambda c: (n_train[c], c))
            if max(cfg.ks) > n_train[cid]:
                raise SimfedError(f"[algorithm] {self.name}: k = {max(cfg.ks)} (ks) exceeds the {n_train[cid]} train "
                                  f"samples of client {cid}, the smallest; lower ks, or set strict_k = false to use "
                                  "k = n_train for such clients")

    def _check_k(self, cfg, data, n: int) -> list[int]:
        if cfg.strict_k and max(cfg.ks) > n:
            raise SimfedError(f"[algorithm] {self.name}: k = {max(cfg.ks)} (ks) exceeds the {n} train samples of "
                              f"client {data.client_id} ({data.cohort}); lower ks, or set strict_k = false to use "
                              "k = n_train for such clients")
        return list(dict.fromkeys(min(k, n) for k in cfg.ks))

    def client(self, phase, cfg, bcast, payload, data, cstate, ctx) -> Reply:
        n = data.n("train")
        if n < 1:
            raise SimfedError(f"[algorithm] {self.name}: client {data.client_id} has no train samples for its "
                              "kNN datastore (re-partition with a minimum client size)")
        ks = self._check_k(cfg, data, n)
        if ctx.mode != "eval":
            return sgd_reply(cfg, bcast, data, ctx)
        model = client_model(ctx)
        load_flat(model, bcast)
        return Reply(evals=self.evaluate(cfg, model, data, ks, ctx.task.num_classes))

    def evaluate(self, cfg, model, data, ks, num_classes) -> dict:
        _, _, probs = personalized_probs(cfg, model, data, ks, num_classes)
        out = {}
        for split, p in probs.items():
            y = data.split(split)[1]
            loss, correct = mixture_eval(p, y)
            out[split] = Eval(n=int(y.shape[0]), loss_sum=loss, correct=correct)
        return out


def personalized_probs(cfg, model, data, ks, num_classes) -> tuple[int, float, dict[str, torch.Tensor]]:
    """(chosen k, chosen lam, {split: interpolated probabilities}) for the val and test splits."""
    xt, yt = data.split("train")
    keys, _ = features_and_probs(model, xt)
    parts = {}
    for split in ("val", "test"):
        if data.n(split) > 0:
            f, p = features_and_probs(model, data.split(split)[0])
            parts[split] = (f, p.double(), {k: knn_probs(f, keys, yt, k, cfg.scale, num_classes) for k in ks})
    k, lam = ks[0], cfg.fallback_lambda
    if "val" in parts:
        _, pv, knn = parts["val"]
        yv, best = data.split("val")[1], None
        for kk in ks:
            for lm in cfg.lambdas:
                loss, correct = mixture_eval(lm * knn[kk] + (1.0 - lm) * pv, yv)
                if best is None or (correct, -loss) > best[0]:
                    best = ((correct, -loss), kk, lm)
        k, lam = best[1], best[2]
    return k, lam, {s: lam * knn[k] + (1.0 - lam) * p for s, (_, p, knn) in parts.items()}
