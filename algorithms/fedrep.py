"""FedRep (Collins, Hassani, Mokhtari, Shakkottai, ICML 2021, arXiv 2102.07078): shared body, local heads.

The client model is split into a body (feature extractor, global) and a head (the last
`head_layers` linear layers, per client). A sampled client trains its head for `head_epochs` with
the body frozen, then the body for `body_epochs` with its new head frozen, and returns its body
change; the server averages body changes as FedAvg does (sample-weighted mean, `server_lr`). The
head is engine-held client state and never leaves the client.

From the paper: the head/body alternation and that only bodies are averaged (Algorithm 1). From
the authors' code (lgcollins/FedRep; FL-bench's FedRepClient, which PeFLL used): heads train
first, then the body, with the same SGD optimizer settings; 5 head epochs and 1 body epoch are
PeFLL's settings (after the FedRep paper). From PeFLL's appendix: a new client gets a randomly
initialized head trained for 20 epochs with the body frozen (`unseen_head_epochs`). Ours:
- A seen client's first head is the server's initial head (the authors start every head from the
  same initial model); a seen client that was never sampled is evaluated like a new client.
- The random head of a new client uses PyTorch's default Linear initialization, drawn from
  `ClientContext.generator("head")` (run seed, round, mode, client, phase).
- The split is by parameter order: LeNet's parameters end with its classifier, so the head is a
  suffix of the flat vector. A model whose trailing parameterized layers are not `head_layers`
  linear layers, or whose body would be empty, has no separable head: a config error.
- The reported training loss (`Reply.train_loss`, the train rows' `loss`) is the mean cross-entropy
  over every sample of the round's local training, head steps AND body steps together, weighted
  by samples: (head samples x head mean loss + body samples x body mean loss) / all samples. Each
  value is the minibatch loss before its step, as for FedAvg; with 5 head epochs and 1 body epoch
  the head pass weighs five times the body pass.
The body's server state and step are the kit's global model (kit/globalmodel.py). [privacy]
(docs/privacy.md) protects the shared body, the only release; the heads never leave the clients.

The body's server state and step are the kit's global model (kit/globalmodel.py).

[system] clock: a straggler's partial work would be mostly head epochs (the head trains first), so
its body change says little: under stragglers = "partial" a FedRep straggler is dropped, as under
"drop". FedBuff weights the body update by 1/sqrt(1 + staleness); the head trains on the (stale)
body the client received.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
from torch import nn

from simfed.algorithms.base import Capabilities, Reply, Task, Work
from simfed.algorithms.kit import training
from simfed.algorithms.kit.globalmodel import (GlobalModelMethod, GlobalModelState, SGDFields, client_model,
                                               global_privacy, update_sums)
from simfed.algorithms.kit.models import flat_params, init_model, lenet_for, load_flat
from simfed.algorithms.kit.workload import epoch_steps, lenet_values, tensor_bytes
from simfed.algorithms.registry import register
from simfed.core.errors import SimfedError


@dataclass(frozen=True)
class FedRepConfig(SGDFields):
    head_epochs: float = 5.0
    body_epochs: float = 1.0
    head_layers: int = 1
    server_lr: float = 1.0
    unseen_head_epochs: float = 20.0

    def __post_init__(self):
        super().__post_init__()
        if self.server_lr <= 0:
            raise ValueError("server_lr must be > 0")
        if self.head_epochs < 0 or self.body_epochs <= 0 or self.unseen_head_epochs < 0:
            raise ValueError("body_epochs must be > 0, head_epochs and unseen_head_epochs >= 0")
        if self.head_layers < 1:
            raise ValueError(f"head_layers must be >= 1, got {self.head_layers}")


def head_params(model: nn.Module, head_layers: int) -> int:
    """How many trailing parameter tensors form the head; ValueError if the model has no such head."""
    layers = [m for m in model.modules() if any(True for _ in m.parameters(recurse=False))]
    head = layers[-head_layers:]
    if len(layers) <= head_layers or not all(isinstance(m, nn.Linear) for m in head):
        kinds = ", ".join(type(m).__name__ for m in layers)
        raise ValueError(f"the model ({kinds}) has no separable head of {head_layers} linear layer(s) after a "
                         "non-empty body; lower head_layers")
    own = [p for m in head for p in m.parameters(recurse=False)]
    if any(p is not q for p, q in zip(own, list(model.parameters())[-len(own):])):
        raise ValueError("the model's head parameters are not the last in its parameter order")
    return len(own)


def head_size(model: nn.Module, head_layers: int) -> int:
    """Number of trailing flat values that form the head."""
    return sum(p.numel() for p in list(model.parameters())[-head_params(model, head_layers):])


@functools.lru_cache(maxsize=16)
def _head_values(input_shape: tuple, num_classes: int, head_layers: int) -> int:
    return head_size(lenet_for(input_shape, num_classes), head_layers)


def random_head(model: nn.Module, head_layers: int, gen: torch.Generator) -> torch.Tensor:
    """A freshly initialized head (PyTorch's default Linear init), as a flat vector."""
    layers = [m for m in model.modules() if isinstance(m, nn.Linear)][-head_layers:]
    parts = []
    for m in layers:
        bound = 1.0 / math.sqrt(m.in_features)
        parts.append(torch.empty(m.weight.numel()).uniform_(-bound, bound, generator=gen))
        if m.bias is not None:
            parts.append(torch.empty(m.bias.numel()).uniform_(-bound, bound, generator=gen))
    return torch.cat(parts)


def train_part(model: nn.Module, head_layers: int, part: str, x, y, *, epochs: float, cfg, gen) -> tuple[int, float]:
    """SGD on the head or the body only (the other part frozen); returns (samples processed, mean loss)."""
    params = list(model.parameters())
    cut = len(params) - head_params(model, head_layers)
    trainable = params[cut:] if part == "head" else params[:cut]
    for p in params:
        p.requires_grad_(False)
    for p in trainable:
        p.requires_grad_(True)
    try:
        return training.sgd_train(model, x, y, steps=0, epochs=epochs, batch_size=cfg.batch_size, lr=cfg.lr,
                                  momentum=cfg.momentum, weight_decay=cfg.weight_decay, gen=gen)
    finally:
        for p in params:  # the worker caches this module for other methods' clients too
            p.requires_grad_(True)


def combined_loss(parts: list[tuple[int, float]]) -> float:
    """The sample-weighted mean loss over several training passes, each given as (samples, mean loss)."""
    seen = sum(s for s, _ in parts)
    return sum(s * loss for s, loss in parts) / max(seen, 1)


class FedRepState(GlobalModelState):
    def __init__(self, body: torch.Tensor, head0: torch.Tensor):
        super().__init__(body)  # theta = the global body
        self.head0 = head0


@register
class FedRep(GlobalModelMethod):
    """The kit's global model, phases and server step, on the body alone."""

    name = "fedrep"
    Config = FedRepConfig
    summary = "FedRep: global body, per-client heads trained first (Collins et al. 2021)"
    capabilities = Capabilities(client_state=True, asynchronous=True, partial="drop", privacy=global_privacy(
        "the shared body; the heads never leave their clients, so they are not released"))

    def work(self, phase, cfg, task, n_train) -> Work:
        """Head epochs then body epochs; the body and the initial head down, the body change up."""
        passes = [epoch_steps(n_train, cfg.batch_size, e) for e in (cfg.head_epochs, cfg.body_epochs)]
        total = lenet_values(task.input_shape, task.num_classes)
        body = total - _head_values(tuple(task.input_shape), task.num_classes, cfg.head_layers)
        return Work(samples=sum(s for _, s in passes), steps=sum(k for k, _ in passes),
                    bytes_down=tensor_bytes(total), bytes_up=tensor_bytes(body) + 8)

    def init(self, cfg, task: Task, seed: int) -> FedRepState:
        model = init_model(lenet_for(task.input_shape, task.num_classes), seed)
        flat, n_head = flat_params(model), head_size(model, cfg.head_layers)
        return FedRepState(flat[:-n_head].clone(), flat[-n_head:].clone())

    def validate(self, cfg, task: Task) -> None:
        try:
            head_size(lenet_for(task.input_shape, task.num_classes), cfg.head_layers)
        except ValueError as exc:
            raise SimfedError(f"[algorithm] {self.name}: {exc}") from None

    def cost(self, cfg, n_train: int) -> float:
        return float((cfg.head_epochs + cfg.body_epochs) * n_train / cfg.batch_size)

    def broadcast(self, phase, cfg, state, info):
        return state.theta, state.head0

    def client(self, phase, cfg, bcast, payload, data, cstate, ctx) -> Reply:
        body, head0 = bcast
        model = client_model(ctx)
        n_head = head_size(model, cfg.head_layers)
        x, y = data.split("train")
        if ctx.mode == "eval":
            if cstate is None:
                head = random_head(model, cfg.head_layers, ctx.generator("head"))
                load_flat(model, torch.cat([body, head.to(body.dtype)]))
                if cfg.unseen_head_epochs > 0 and y.numel() > 0:
                    train_part(model, cfg.head_layers, "head", x, y, epochs=cfg.unseen_head_epochs, cfg=cfg,
                               gen=ctx.generator("unseen"))
            else:
                load_flat(model, torch.cat([body, cstate]))
            return Reply(evals=training.evaluate_splits(model, data))
        load_flat(model, torch.cat([body, head0 if cstate is None else cstate]))
        parts = []  # (samples, mean loss) of the head pass, then of the body pass
        if cfg.head_epochs > 0:
            parts.append(train_part(model, cfg.head_layers, "head", x, y, epochs=cfg.head_epochs, cfg=cfg,
                                    gen=ctx.generator("head")))
        parts.append(train_part(model, cfg.head_layers, "body", x, y, epochs=cfg.body_epochs, cfg=cfg,
                                gen=ctx.generator("body")))
        seen = sum(s for s, _ in parts)
        flat = flat_params(model)
        return Reply(sums=update_sums(body - flat[:-n_head], float(data.n("train")), ctx.staleness),
                     state=flat[-n_head:].clone(),
                     n_train=seen, train_loss=combined_loss(parts))
