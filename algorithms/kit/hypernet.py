"""The hypernetwork pieces of pFedHN, PeFLL and FMLH; not a method itself.

- `HyperNetFields` (embed_dim, hidden, n_hidden, target_shapes, max_generated) and
  `GeneratedSGDFields` (local SGD from a generated model, pFedHN's and PeFLL's client step, and
  which parameters are generated: `generate`, `body_lr`, kit/partial.py): config field groups.
- `HyperNet`: the pFedHN/PeFLL fully connected hypernetwork (PeFLL Table 5, arXiv 2306.05515):
  Linear(d, 100), then `n_hidden` x [ReLU, Linear(100, 100)], then one linear head per target
  tensor of the client model. It maps a batch of inputs (B, d) to a batch of flat parameter
  vectors (B, D) in one forward pass, which is how a chunk of clients gets its models.
- `build`: a config's hypernetwork on a task (target shapes checked against the generated part of
  the client model, the embedding size, the seeded initialization); `HyperNetMethod` validates the
  target shapes and the generated-parameter budget before any work; `generate`: the models of a
  chunk of clients.
- `vjp_`: the server's backward pass at one client: accumulates J_h(x)^T g into the
  hypernetwork's `.grad` (streaming, O(model) memory) and returns the input gradient; `vjp_flat`
  returns the client's term instead (clipped per client under [privacy]); `load_grads_` sets
  `.grad` from a flat vector.
- `train_delta` / `train_payload`: k local SGD steps from a given flat model; returns
  theta - theta' (a gradient-like step: the server descends along it).
- `train_delta_chunk` / `train_payload_clients`: the same for a chunk of clients at once, each
  from its own theta (`vectorized.sgd_train_chunk`; pFedHN's and PeFLL's vectorized client step).
- `embedding_row`: a client's embedding, created on first use from derive_seed(run seed, tag,
  client id), so that it does not depend on when the client is first sampled.
- `sgd_rows_`: per-client embedding rows updated only for the clients that took part
  (an optimizer with momentum or weight decay on the whole table would keep moving absent rows).
- `spread` / `model_spread`: the collapse gauge every hypernetwork method logs each round
  (0 = all clients of the cohort get the same descriptor/embedding or model).
- `serial_phase`: a tiny in-process reference driver of the protocol (used by the tests; the
  engine's serial backend is the production path).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Mapping, Sequence

import torch
from torch import nn

from simfed.algorithms.base import Algorithm, Reply, RoundInfo, Task
from simfed.algorithms.kit import partial, training, vectorized
from simfed.algorithms.kit.models import flat_params, init_model, load_flat
from simfed.core.errors import SimfedError
from simfed.core.seeds import derive_seed


@dataclass(frozen=True)
class HyperNetFields:
    """The hypernetwork's shape. embed_dim 0 = int(1 + n/4) (`default_embed_dim`); target_shapes
    () = the client model's (a configured list is checked against it)."""

    embed_dim: int = 0
    hidden: int = 100
    n_hidden: int = 3
    target_shapes: tuple = ()
    max_generated: int = 2_000_000  # most client parameters the hypernetwork may generate (kit/partial.py)

    def __post_init__(self):
        object.__setattr__(self, "target_shapes", normalize_shapes(self.target_shapes))
        if self.embed_dim < 0 or self.hidden < 1 or self.n_hidden < 0:
            raise ValueError("embed_dim must be >= 0 (0 = 1 + n/4), hidden >= 1, n_hidden >= 0")
        if self.max_generated < 1:
            raise ValueError("max_generated must be >= 1")


@dataclass(frozen=True)
class GeneratedSGDFields(HyperNetFields):
    """Local SGD from a generated model (`train_payload`), with gradient-norm clipping. The defaults
    are pFedHN's code's; a method whose authors use others overrides them."""

    local_steps: int = 50
    batch_size: int = 64
    lr: float = 5e-3
    momentum: float = 0.9
    weight_decay: float = 5e-5
    clip: float = 50.0
    generate: str = "all"  # "all": every parameter (the papers); "head": the head, the body shared; pfedhn: "body"
    body_lr: float = 1.0  # generate = "head": server step of the shared body (1 = FedAvg's average)
    # the values of `generate` this method's config accepts (a method offering more overrides it)
    generate_choices: ClassVar[tuple[str, ...]] = ("all", "head")

    def __post_init__(self):
        super().__post_init__()
        if self.local_steps < 1 or self.batch_size < 1 or self.lr <= 0:
            raise ValueError("local_steps and batch_size must be >= 1, lr > 0")
        if self.generate not in self.generate_choices:
            raise ValueError(f"generate must be one of {', '.join(map(repr, self.generate_choices))}, "
                             f"got {self.generate!r}")
        if not self.body_lr > 0:
            raise ValueError("body_lr must be > 0")


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

    def forward(self, e: torch.Tensor) -> torch.Tensor:
        f = self.mlp(e)
        return torch.cat([head(f) for head in self.heads], dim=-1)


def normalize_shapes(value) -> tuple:
    """Config helper: TOML lists of lists -> a tuple of int tuples (frozen dataclasses need hashables)."""
    try:
        return tuple(tuple(int(v) for v in s) for s in value)
    except (TypeError, ValueError):
        raise ValueError(f"target_shapes must be a list of integer lists, got {value!r}") from None


def check_targets(cfg, task, method: str) -> list[tuple[str, tuple[int, ...]]]:
    """The hypernetwork's head shapes: the generated part of the client model's (`generate`), or the
    configured `target_shapes` if they match it."""
    want, _ = partial.split(task, getattr(cfg, "generate", "all"))
    if cfg.target_shapes:
        got = [tuple(s) for s in cfg.target_shapes]
        if got != [s for _, s in want]:
            raise SimfedError(
                f"[algorithm] target_shapes of {method} = {got} do not match the client model for input "
                f"{tuple(task.input_shape)} and {task.num_classes} classes, which needs "
                f"{[s for _, s in want]}; remove target_shapes to derive them from the model")
    return want


def build(cfg, task: Task, seed: int, method: str) -> tuple[HyperNet, int]:
    """The hypernetwork of a config (`HyperNetFields`) on a task, initialized from `seed`, and its
    input dimension."""
    shapes = check_targets(cfg, task, method)
    dim = default_embed_dim(task, cfg.embed_dim)
    return init_model(HyperNet(dim, shapes, cfg.hidden, cfg.n_hidden), seed), dim


class HyperNetMethod(Algorithm):
    """A method whose config has `HyperNetFields`: its target shapes and generated-parameter budget
    are checked before any work. `over_budget` says what would work instead (one line)."""

    over_budget: ClassVar[str] = 'set generate = "head" (the body shared, kit/partial.py) or raise max_generated'

    def validate(self, cfg, task: Task) -> None:
        check_targets(cfg, task, self.name)
        partial.check_budget(cfg, task, self.name, self.over_budget)


def generate(hnet: nn.Module, ids: Sequence[int], rows: Sequence[torch.Tensor]) -> dict[int, torch.Tensor]:
    """{client id: h(row)} for a chunk of clients, in one batched forward pass."""
    with torch.no_grad():
        th = hnet(torch.stack(list(rows)))
    # clone: a row view would pickle th's whole storage, i.e. every client of the chunk's
    # theta in each client's payload (chunk-size times the bytes through the object store)
    return {c: th[j].clone() for j, c in enumerate(ids)}


def _vjp(module: nn.Module, x: torch.Tensor, grad_out, params: bool) -> tuple[torch.Tensor, tuple]:
    """(d<module(x), g>/dx, the parameters' J(x)^T g if `params`)."""
    x = x.detach().clone().requires_grad_(True)
    out = module(x)
    if callable(grad_out):
        grad_out = grad_out(out.detach())
    targets = [x] + ([p for p in module.parameters()] if params else [])
    grads = torch.autograd.grad(out, targets, grad_outputs=grad_out.to(out.dtype))
    return grads[0].detach(), grads[1:]


def vjp_(module: nn.Module, x: torch.Tensor, grad_out, *, params: bool = True) -> torch.Tensor:
    """Accumulate J(x)^T g into module's .grad (if `params`) and return d<module(x), g>/dx.

    `grad_out` is a tensor, or a function of the (detached) output when g depends on it
    (PeFLL's lambda_theta term, FMLH's least-squares residual).
    """
    dx, grads = _vjp(module, x, grad_out, params)
    for p, g in zip(module.parameters(), grads):
        p.grad = g if p.grad is None else p.grad.add_(g)
    return dx


def vjp_flat(module: nn.Module, x: torch.Tensor, grad_out) -> tuple[torch.Tensor, torch.Tensor]:
    """`vjp_` without accumulating: (input gradient, J(x)^T g as one flat vector), a per-client
    term the engine clips under [privacy] before it joins the sum."""
    dx, grads = _vjp(module, x, grad_out, True)
    return dx, torch.cat([g.reshape(-1) for g in grads])


def load_grads_(params: Sequence[torch.Tensor], flat: torch.Tensor) -> None:
    """Set the parameters' .grad from one flat vector (their order, float32)."""
    g, offset = flat.to(torch.float32), 0
    for p in params:
        k = p.numel()
        p.grad = g[offset:offset + k].view_as(p).clone()
        offset += k


def grad_norm_clip_(params: Sequence[torch.Tensor], max_norm: float) -> float:
    ps = [p for p in params if p.grad is not None]
    if not ps:
        return 0.0
    if max_norm > 0:
        return float(nn.utils.clip_grad_norm_(ps, max_norm))
    return float(torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in ps])))


def train_delta(model: nn.Module, theta: torch.Tensor, x: torch.Tensor, y: torch.Tensor, *, steps: int,
                batch_size: int, lr: float, momentum: float, weight_decay: float, clip: float,
                gen: torch.Generator, budget: int | None = None) -> tuple[torch.Tensor, int, float]:
    """(theta - theta', samples processed, mean training loss); at most `budget` steps."""
    load_flat(model, theta)
    seen, loss = training.sgd_train(model, x, y, steps=steps, batch_size=batch_size, lr=lr, gen=gen,
                                    momentum=momentum, weight_decay=weight_decay, clip=clip, budget=budget)
    return theta - flat_params(model), seen, loss


def train_payload(model: nn.Module, cfg, payload: torch.Tensor, data, ctx) -> tuple[torch.Tensor, int, float]:
    """`train_delta` from a client's generated model with the config's `GeneratedSGDFields`, its
    batches from `ctx.generator("sgd")`, at most the straggler budget `ctx.budget` of them."""
    x, y = data.split("train")
    return train_delta(model, payload, x, y, steps=cfg.local_steps, batch_size=cfg.batch_size, lr=cfg.lr,
                       momentum=cfg.momentum, weight_decay=cfg.weight_decay, clip=cfg.clip, gen=ctx.generator("sgd"),
                       budget=ctx.budget)


def train_delta_chunk(model: nn.Module, thetas: Sequence[torch.Tensor], xs: Sequence[torch.Tensor],
                      ys: Sequence[torch.Tensor], *, steps: int, batch_size: int, lr: float, momentum: float,
                      weight_decay: float, clip: float, gens: Sequence[torch.Generator],
                      budgets: Sequence[int | None] | None = None) -> tuple[list[torch.Tensor], list[int], list[float]]:
    """`train_delta` for C clients, client j from its own thetas[j] (the rows of the stacked [C, P]
    differ: each client's model was generated for it). Equal to C `train_delta` calls to rounding."""
    p = next(model.parameters())
    start = torch.stack([t.to(p.device, p.dtype) for t in thetas])
    new, seen, losses = vectorized.sgd_train_chunk(model, start, xs, ys, steps=steps, batch_size=batch_size,
                                                   lr=lr, gens=gens, momentum=momentum,
                                                   weight_decay=weight_decay, clip=clip, budgets=budgets)
    # theta - theta' as `train_delta` forms it, handed back where theta came from (the server's
    # device): one copy per client and chunk, none per step.
    deltas = [(t.to(p.device) - row).to(t.device) for t, row in zip(thetas, new)]
    return deltas, seen, losses


def train_payload_clients(model: nn.Module, cfg, payloads: Sequence, datas: Sequence, ctxs: Sequence,
                          ) -> dict[int, tuple[torch.Tensor, int, float]]:
    """`train_payload` for a chunk: {j: (delta, samples, loss)} for every client j that has a
    generated model (payloads[j] is None when its earlier reply was dropped), trained in one
    `train_delta_chunk`."""
    todo = [j for j, p in enumerate(payloads) if p is not None]
    if not todo:
        return {}
    splits = [datas[j].split("train") for j in todo]
    deltas, seen, losses = train_delta_chunk(
        model, [payloads[j] for j in todo], [x for x, _ in splits], [y for _, y in splits],
        steps=cfg.local_steps, batch_size=cfg.batch_size, lr=cfg.lr, momentum=cfg.momentum,
        weight_decay=cfg.weight_decay, clip=cfg.clip, gens=[ctxs[j].generator("sgd") for j in todo],
        budgets=[ctxs[j].budget for j in todo])
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
