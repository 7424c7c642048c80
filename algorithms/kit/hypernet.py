"""Shared pieces of the hypernetwork methods (pFedHN, PeFLL, FMLH); not a method itself.

- `HyperNet`: the pFedHN/PeFLL fully connected hypernetwork (PeFLL Table 5, arXiv 2306.05515):
  Linear(d, 100), then `n_hidden` x [ReLU, Linear(100, 100)], then one linear head per target
  tensor of the client model. It maps a batch of inputs (B, d) to a batch of flat parameter
  vectors (B, D) in one forward pass, which is how a chunk of clients gets its models.
- `vjp_`: the server's backward pass at one client: accumulates J_h(x)^T g into the
  hypernetwork's `.grad` (streaming, O(model) memory) and returns the input gradient.
- `embed_net` / `embed_input`: PeFLL's embedding network (Table 4): the client LeNet with
  C + num_classes input channels (the one-hot label broadcast as constant planes) and output l.
- `train_delta`: k local SGD steps from a given flat model; returns theta - theta' (a gradient-like
  step: the server descends along it).
- `train_delta_chunk`: `train_delta` for a chunk of clients at once, each from its own theta
  (`vectorized.sgd_train_chunk`; pFedHN's and PeFLL's vectorized client step).
- `sgd_rows_`: per-client embedding rows updated only for the clients that took part
  (an optimizer with momentum or weight decay on the whole table would keep moving absent rows).
- `spread` / `model_spread`: the collapse gauge every hypernetwork method logs each round
  (0 = all clients of the cohort get the same descriptor/embedding or model).
- `serial_phase`: a tiny in-process reference driver of the protocol (used by the tests and
  the benches; the engine's serial backend is the production path).
"""

from __future__ import annotations

import math
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from simfed.algorithms.kit import training, vectorized
from simfed.algorithms.base import Reply, RoundInfo
from simfed.core.seeds import derive_seed
from simfed.algorithms.kit.models import LeNet, flat_params, lenet_for, load_flat, param_shapes
from simfed.core.errors import SimfedError


class HyperNet(nn.Module):
    def __init__(self, in_dim: int, shapes: Sequence[tuple[str, Sequence[int]]], hidden: int = 100,
                 n_hidden: int = 3):
        super().__init__()
        layers: list[nn.Module] = [nn.Linear(in_dim, hidden)]
        for _ in range(n_hidden):
            layers += [nn.ReLU(), nn.Linear(hidden, hidden)]
        self.mlp = nn.Sequential(*layers)
        self.shapes = [(str(n), tuple(int(v) for v in s)) for n, s in shapes]
        self.heads = nn.ModuleList(nn.Linear(hidden, math.prod(s)) for _, s in self.shapes)

    @property
    def out_dim(self) -> int:
        return sum(math.prod(s) for _, s in self.shapes)

    def forward(self, e: torch.Tensor) -> torch.Tensor:
        f = self.mlp(e)
        return torch.cat([head(f) for head in self.heads], dim=-1)


def client_shapes(input_shape, num_classes) -> list[tuple[str, tuple[int, ...]]]:
    return [(n, tuple(s)) for n, s in param_shapes(lenet_for(tuple(input_shape), num_classes))]


def normalize_shapes(value) -> tuple:
    """Config helper: TOML lists of lists -> a tuple of int tuples (frozen dataclasses need hashables)."""
    try:
        return tuple(tuple(int(v) for v in s) for s in value)
    except (TypeError, ValueError):
        raise ValueError(f"target_shapes must be a list of integer lists, got {value!r}") from None


def check_targets(target_shapes: tuple, task, method: str) -> list[tuple[str, tuple[int, ...]]]:
    """The hypernetwork's head shapes: the client LeNet's, or the configured ones if they match it."""
    want = client_shapes(task.input_shape, task.num_classes)
    if target_shapes:
        got = [tuple(s) for s in target_shapes]
        if got != [s for _, s in want]:
            raise SimfedError(
                f"[algorithm] target_shapes of {method} = {got} do not match the client model for input "
                f"{tuple(task.input_shape)} and {task.num_classes} classes, which needs "
                f"{[s for _, s in want]}; remove target_shapes to derive them from the model")
    return want


def vjp_(module: nn.Module, x: torch.Tensor, grad_out, *, params: bool = True) -> torch.Tensor:
    """Accumulate J(x)^T g into module's .grad (if `params`) and return d<module(x), g>/dx.

    `grad_out` is a tensor, or a function of the (detached) output when g depends on it
    (PeFLL's lambda_theta term, FMLH's least-squares residual).
    """
    x = x.detach().clone().requires_grad_(True)
    out = module(x)
    if callable(grad_out):
        grad_out = grad_out(out.detach())
    targets = [x] + ([p for p in module.parameters()] if params else [])
    grads = torch.autograd.grad(out, targets, grad_outputs=grad_out.to(out.dtype))
    if params:
        for p, g in zip(module.parameters(), grads[1:]):
            p.grad = g if p.grad is None else p.grad.add_(g)
    return grads[0].detach()


def grad_norm_clip_(params: Sequence[torch.Tensor], max_norm: float) -> float:
    ps = [p for p in params if p.grad is not None]
    if not ps:
        return 0.0
    if max_norm > 0:
        return float(nn.utils.clip_grad_norm_(ps, max_norm))
    return float(torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in ps])))


def embed_net(input_shape, num_classes: int, dim: int, use_labels: bool) -> LeNet:
    c, h, _ = input_shape
    return LeNet(in_channels=c + (num_classes if use_labels else 0), num_classes=dim, image_size=h)


def embed_input(x: torch.Tensor, y: torch.Tensor | None, num_classes: int) -> torch.Tensor:
    """x (N, C, H, W) and labels -> (N, C + K, H, W) with the one-hot label as K constant planes."""
    if y is None:
        return x
    onehot = F.one_hot(y, num_classes).to(x.dtype)
    planes = onehot[:, :, None, None].expand(-1, -1, x.shape[2], x.shape[3])
    return torch.cat([x, planes], dim=1)


def train_delta(model: nn.Module, theta: torch.Tensor, x: torch.Tensor, y: torch.Tensor, *, steps: int,
                batch_size: int, lr: float, momentum: float, weight_decay: float, clip: float,
                gen: torch.Generator) -> tuple[torch.Tensor, int, float]:
    """(theta - theta', samples processed, mean training loss)."""
    load_flat(model, theta)
    seen, loss = training.sgd_train(model, x, y, steps=steps, batch_size=batch_size, lr=lr, gen=gen,
                                    momentum=momentum, weight_decay=weight_decay, clip=clip)
    return theta - flat_params(model), seen, loss


def train_delta_chunk(model: nn.Module, thetas: Sequence[torch.Tensor], xs: Sequence[torch.Tensor],
                      ys: Sequence[torch.Tensor], *, steps: int, batch_size: int, lr: float, momentum: float,
                      weight_decay: float, clip: float, gens: Sequence[torch.Generator],
                      ) -> tuple[list[torch.Tensor], list[int], list[float]]:
    """`train_delta` for C clients, client j from its own thetas[j] (the rows of the stacked [C, P]
    differ: each client's model was generated for it). Equal to C `train_delta` calls to rounding."""
    p = next(model.parameters())
    start = torch.stack([t.to(p.device, p.dtype) for t in thetas])
    new, seen, losses = vectorized.sgd_train_chunk(model, start, xs, ys, steps=steps, batch_size=batch_size,
                                                   lr=lr, gens=gens, momentum=momentum,
                                                   weight_decay=weight_decay, clip=clip)
    # theta - theta' as `train_delta` forms it, handed back where theta came from (the server's
    # device): one copy per client and chunk, none per step.
    deltas = [(t.to(p.device) - row).to(t.device) for t, row in zip(thetas, new)]
    return deltas, seen, losses


def train_payload_clients(model: nn.Module, cfg, payloads: Sequence, datas: Sequence, ctxs: Sequence,
                          ) -> dict[int, tuple[torch.Tensor, int, float]]:
    """The client step of pFedHN and PeFLL for a chunk: {j: (delta, samples, loss)} for every
    client j that has a generated model (payloads[j] is None when its earlier reply was dropped),
    trained in one `train_delta_chunk` with the method's local SGD settings."""
    todo = [j for j, p in enumerate(payloads) if p is not None]
    if not todo:
        return {}
    splits = [datas[j].split("train") for j in todo]
    deltas, seen, losses = train_delta_chunk(
        model, [payloads[j] for j in todo], [x for x, _ in splits], [y for _, y in splits],
        steps=cfg.local_steps, batch_size=cfg.batch_size, lr=cfg.lr, momentum=cfg.momentum,
        weight_decay=cfg.weight_decay, clip=cfg.clip, gens=[ctxs[j].generator("sgd") for j in todo])
    return {j: out for j, out in zip(todo, zip(deltas, seen, losses))}


def sgd_rows_(table: dict, grads: Mapping[int, torch.Tensor], lr: float, weight_decay: float,
              clip: float = 0.0) -> None:
    """Plain SGD (weight decay, per-row clip) on the embedding rows of the clients that took part."""
    for cid, g in grads.items():
        if clip > 0 and float(g.norm()) > clip:
            g = g * (clip / float(g.norm()))
        e = table[cid]
        table[cid] = e - lr * (g + weight_decay * e)


def embedding_row(table: dict, cid: int, dim: int, seed: int, tag: str, scale: float = 1.0,
                  store: bool = True) -> torch.Tensor:
    """Client cid's embedding, created on first use as N(0, scale^2) from (run seed, tag, cid).

    The server does not know the client list at init, so rows are created lazily; seeding by
    client id (not by round) makes a row the same whenever its client is first sampled.
    `store=False` (evaluation) returns the initial row without adding it to the state.
    """
    cid = int(cid)
    if cid in table:
        return table[cid]
    gen = torch.Generator().manual_seed(derive_seed(seed, tag, cid))
    row = torch.randn(dim, generator=gen) * scale
    if store:
        table[cid] = row
    return row


def default_embed_dim(task, configured: int) -> int:
    """int(1 + n/4) as the pFedHN and PeFLL code compute it, with n ALL the clients (seen and unseen:
    their `num_nodes`, 100 for 90 training nodes), else the seen clients, else 100."""
    if configured > 0:
        return configured
    n = getattr(task, "total_clients", 0) or getattr(task, "num_clients", 0) or 100
    return int(1 + int(n) / 4)


def spread(rows: Sequence[torch.Tensor]) -> float:
    """Collapse gauge: sqrt(mean_i ||x_i - mean x||^2) / sqrt(mean_i ||x_i||^2), in [0, 1].

    0 means every row is the same vector (all clients get one model); it is scale-free, so one
    threshold serves descriptors, embeddings and models. Accumulated in float64 in the order given
    (callers pass rows sorted by client id, so serial and Ray runs log the same figure).
    """
    if len(rows) < 2:
        return float("nan")
    x = torch.stack([r.detach().reshape(-1).double() for r in rows])
    centred = float((x - x.mean(0)).pow(2).sum(1).mean())
    total = float(x.pow(2).sum(1).mean())
    return math.sqrt(centred / total) if total > 0 else 0.0


def model_spread(module: nn.Module, inputs: Sequence[torch.Tensor], chunk: int = 64) -> float:
    """`spread` of module(x) over the given inputs, computed chunk by chunk (O(chunk x model) memory)."""
    if len(inputs) < 2:
        return float("nan")
    n, s1, s2 = 0, None, 0.0
    with torch.no_grad():
        for start in range(0, len(inputs), chunk):
            out = module(torch.stack(list(inputs[start:start + chunk]))).double()
            s1 = out.sum(0) if s1 is None else s1 + out.sum(0)
            s2 += float(out.pow(2).sum())
            n += out.shape[0]
    mean = s1 / n
    # mean ||x - m||^2 = mean ||x||^2 - ||m||^2; float64 keeps a collapse-sized spread (1e-4) exact enough
    centred = max(s2 / n - float(mean.pow(2).sum()), 0.0)
    return math.sqrt(centred / (s2 / n)) if s2 > 0 else 0.0


def summary(accs: Sequence[float]) -> dict[str, float]:
    """Client-mean accuracy, 10th percentile and mean of the worst 10% (at least one client)."""
    a = np.sort(np.asarray(accs, dtype=np.float64))
    if a.size == 0:
        return {"clients": 0, "mean": float("nan"), "p10": float("nan"), "worst10": float("nan")}
    k = max(1, int(math.ceil(0.1 * a.size)))
    return {"clients": int(a.size), "mean": float(a.mean()), "p10": float(np.percentile(a, 10)),
            "worst10": float(a[:k].mean())}


def _finite(r: Reply) -> bool:
    tensors = list((r.sums or {}).values())
    if isinstance(r.item, torch.Tensor):
        tensors.append(r.item)
    return all(torch.isfinite(torch.as_tensor(t)).all() for t in tensors)


def serial_phase(algo, phase: str, cfg, state, client_ids: Sequence[int], info: RoundInfo,
                 make: Callable[[int, str], tuple[Any, Any]], chunk: int = 64,
                 cstates: dict | None = None) -> tuple[dict, dict]:
    """Run one phase in process like the engine: payloads per chunk, client, absorb, finish.

    `make(cid, phase)` -> (ClientData, ClientContext). Returns (finish() output, {cid: evals}).
    Replies with non-finite tensors are dropped, as the engine does.
    """
    bcast = algo.broadcast(phase, cfg, state, info)
    sums: dict[str, torch.Tensor] = {}
    n, evals = 0, {}
    ids = list(client_ids)
    for start in range(0, len(ids), chunk):
        part = ids[start:start + chunk]
        per = algo.payloads(phase, cfg, state, part, info) or {}
        for cid in part:
            data, ctx = make(cid, phase)
            cs = None if cstates is None else cstates.get(cid)
            r = algo.client(phase, cfg, bcast, per.get(cid), data, cs, ctx)
            if not _finite(r):
                continue
            n += 1
            for k, v in (r.sums or {}).items():
                sums[k] = v.clone() if k not in sums else sums[k] + v
            if r.item is not None:
                algo.absorb(phase, cfg, state, cid, r.item, info)
            if r.evals:
                evals[cid] = r.evals
            if cstates is not None and info.mode == "train" and not (isinstance(r.state, str)):
                cstates[cid] = r.state
    out = algo.finish(phase, cfg, state, sums, n, info) or {}
    return out, evals
