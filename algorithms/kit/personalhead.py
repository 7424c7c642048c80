"""A client's own head under a generated body: pFedHN's generate = "body", the paper's pFedHN-PC.

The hypernetwork generates the body (every parameter before the head, kit/partial.py); the head
(the model's `head` submodule, else its last Linear layer) is the client's, kept as engine-held
client state {"head": flat head, "momentum": its SGD momentum buffer} and never sent anywhere.

- `seeded_head`: a head's first value, PyTorch's default rule per layer type
  (kit/models/init.py) drawn from derive_seed(run seed, "pfedhn-head", client id) alone, so a
  client's head does not depend on when it is first sampled, nor on any global generator.
- `train_with_head`: the client's local steps, body and head together on the same batches: the
  body from a fresh SGD (momentum, weight decay, its gradient clipped), the head from its own SGD
  with the same lr, momentum and weight decay whose momentum buffer lives on across rounds in the
  client state, and an unclipped gradient. Returns the body's change (what goes back through the
  hypernetwork) and the new head state.
- `fit_head`: a head trained alone, the body frozen (a new client's head; ours).
"""

from __future__ import annotations

import copy

import torch
from torch import nn
from torch.nn import functional as F

from simfed.algorithms.kit import models, training
from simfed.algorithms.kit.models import flat_params, load_flat
from simfed.algorithms.kit.sgd import SGD
from simfed.core.seeds import derive_seed


def head_count(model: nn.Module) -> int:
    """How many trailing parameter tensors form the head."""
    return sum(1 for m in models.head_modules(model) for _ in m.parameters())


def seeded_head(model: nn.Module, seed: int, client_id: int) -> torch.Tensor:
    """Client `client_id`'s initial head as a flat vector in the model's dtype; the model is left as it is."""
    gen = torch.Generator().manual_seed(derive_seed(seed, "pfedhn-head", int(client_id)))
    # drawn on the CPU in float32 whatever the model's device and dtype, as the client's other
    # random draws are: a GPU worker's head is the CPU one's
    head = [copy.deepcopy(m).to("cpu", torch.float32) for m in models.head_modules(model)]
    models.init_modules_((m for h in head for m in h.modules()), gen)
    p0 = next(model.parameters())
    return torch.cat([p.detach().reshape(-1) for h in head for p in h.parameters()]).to(p0.device, p0.dtype)


def head_state(cstate, model: nn.Module, seed: int, client_id: int) -> dict:
    """The client's head state; a client never trained starts from its seeded head, no momentum."""
    if cstate is not None:
        return cstate
    return {"head": seeded_head(model, seed, client_id)}


def _split_momentum(opt: SGD, params) -> torch.Tensor | None:
    bufs = [opt.state.get(p, {}).get("momentum_buffer") for p in params]
    if any(b is None for b in bufs):
        return None
    return torch.cat([b.detach().reshape(-1) for b in bufs]).clone()


def _load_momentum(opt: SGD, params, flat: torch.Tensor | None) -> None:
    if flat is None:
        return  # torch's SGD then starts the buffer from the first gradient, as a fresh optimizer
    offset = 0
    for p in params:
        k = p.numel()
        opt.state[p]["momentum_buffer"] = flat[offset:offset + k].view_as(p).to(p.dtype).clone()
        offset += k


def train_with_head(model: nn.Module, body: torch.Tensor, hstate: dict, x: torch.Tensor, y: torch.Tensor, cfg,
                    gen: torch.Generator, budget: int | None = None) -> tuple[torch.Tensor, dict, int, float]:
    """`cfg.local_steps` SGD steps (at most `budget`) on body and head together from (body, head);
    returns (body - body', the new head state, samples processed, mean training loss)."""
    p0 = next(model.parameters())
    load_flat(model, torch.cat([body.to(p0.dtype), hstate["head"].to(p0.dtype)]))
    params = list(model.parameters())
    cut = len(params) - head_count(model)
    body_ps, head_ps = params[:cut], params[cut:]
    sgd = dict(lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    body_opt, head_opt = SGD(body_ps, **sgd), SGD(head_ps, **sgd)
    _load_momentum(head_opt, head_ps, hstate.get("momentum"))
    model.train()
    seen, loss_sum = 0, torch.zeros((), dtype=p0.dtype, device=p0.device)
    for idx in training.batches(int(y.shape[0]), cfg.batch_size, cfg.local_steps, gen, budget=budget):
        body_opt.zero_grad()
        head_opt.zero_grad()
        loss = F.cross_entropy(model(x[idx]), y[idx])
        loss.backward()
        if cfg.clip > 0:  # the body's gradient only, as the authors' clip over the generated network
            nn.utils.clip_grad_norm_(body_ps, cfg.clip)
        body_opt.step()
        head_opt.step()
        seen += int(idx.numel())
        loss_sum += loss.detach() * idx.numel()
    flat = flat_params(model)
    n_body = flat.numel() - hstate["head"].numel()
    new = {"head": flat[n_body:].clone()}
    momentum = _split_momentum(head_opt, head_ps)
    if momentum is None:
        momentum = hstate.get("momentum")  # no step taken (a straggler's budget of 0): as it was
    if momentum is not None:
        new["momentum"] = momentum
    return body.to(p0.dtype) - flat[:n_body], new, seen, float(loss_sum) / max(seen, 1)


def fit_head(model: nn.Module, body: torch.Tensor, head: torch.Tensor, x: torch.Tensor, y: torch.Tensor, cfg,
             steps: int, gen: torch.Generator) -> torch.Tensor:
    """`steps` SGD steps on the head alone, the body frozen (the head's SGD settings, no clip);
    the model is left holding (body, new head), and the new head is returned."""
    p0 = next(model.parameters())
    load_flat(model, torch.cat([body.to(p0.dtype), head.to(p0.dtype)]))
    params = list(model.parameters())
    cut = len(params) - head_count(model)
    if steps > 0 and y.numel() > 0:
        for p in params[:cut]:
            p.requires_grad_(False)
        try:
            training.sgd_train(model, x, y, steps=steps, batch_size=cfg.batch_size, lr=cfg.lr, gen=gen,
                               momentum=cfg.momentum, weight_decay=cfg.weight_decay)
        finally:
            for p in params:  # the worker caches this module for other clients and methods
                p.requires_grad_(True)
    return flat_params(model)[-head.numel():].clone()
