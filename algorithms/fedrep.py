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
- The random head of a new client uses PyTorch's default initialization per layer type
  (kit/models/init.py), drawn from
  `ClientContext.generator("head")` (run seed, round, mode, client, phase).
- The split is by parameter order: the head (the model's `head` submodule, else its last
  `head_layers` linear layers; LeNet's classifier ends its parameters) is a suffix of the flat
  vector. A model without such a head, or whose body would be empty, is refused before any work.
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

import copy
import functools
from dataclasses import dataclass

import torch
from torch import nn

from simfed.algorithms.base import Capabilities, ModelNeeds, Reply, Task, Work
from simfed.algorithms.kit import models, training
from simfed.algorithms.kit.globalmodel import (GlobalModelMethod, GlobalModelState, SGDFields, client_model,
                                               global_privacy, update_sums)
from simfed.algorithms.kit.models import flat_params, load_flat
from simfed.algorithms.kit.workload import epoch_steps, model_values, tensor_bytes
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
    return sum(1 for m in models.head_modules(model, head_layers) for _ in m.parameters())


def head_size(model: nn.Module, head_layers: int) -> int:
    """Number of trailing flat values that form the head."""
    return models.head_size(model, head_layers)


@functools.lru_cache(maxsize=16)
def _head_values(task: Task, head_layers: int) -> int:
    return head_size(models.build(task), head_layers)


def random_head(model: nn.Module, head_layers: int, gen: torch.Generator) -> torch.Tensor:
    """A freshly initialized head (PyTorch's default rule per layer type, kit/models/init.py), as a
    flat vector; the model itself is left as it is."""
    # drawn in float32 whatever the model's dtype, as the client's other random draws are
    head = [h.float() for h in copy.deepcopy(models.head_modules(model, head_layers))]
    models.init_modules_((m for h in head for m in h.modules()), gen)
    return torch.cat([p.detach().reshape(-1) for h in head for p in h.parameters()])


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
    capabilities = Capabilities(client_state=True, asynchronous=True, partial="drop", model=ModelNeeds(head=True),
                                privacy=global_privacy(
        "the shared body; the heads never leave their clients, so they are not released"))

    def work(self, phase, cfg, task, n_train) -> Work:
        """Head epochs then body epochs; the body and the initial head down, the body change up."""
        passes = [epoch_steps(n_train, cfg.batch_size, e) for e in (cfg.head_epochs, cfg.body_epochs)]
        total = model_values(task)
        body = total - _head_values(task, cfg.head_layers)
        return Work(samples=sum(s for _, s in passes), steps=sum(k for k, _ in passes),
                    bytes_down=tensor_bytes(total), bytes_up=tensor_bytes(body) + 8)

    def init(self, cfg, task: Task, seed: int) -> FedRepState:
        model = models.initial(task, seed)
        flat, n_head = flat_params(model), head_size(model, cfg.head_layers)
        return FedRepState(flat[:-n_head].clone(), flat[-n_head:].clone())

    def validate(self, cfg, task: Task) -> None:
        try:
            head_size(models.build(task), cfg.head_layers)
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
