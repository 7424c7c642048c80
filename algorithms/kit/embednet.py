"""PeFLL's embedding network phi(x, y): a client's descriptor is the mean of phi over its samples.

- Images LeNet can take (square, side >= 16): PeFLL's Table 4 (arXiv 2306.05515), the client
  LeNet with C + num_classes input channels, the one-hot label broadcast as constant planes, and
  `dim` outputs. Exactly the network PeFLL used before other models existed.
- Any other input (ours; the paper only has images): `DescriptorMLP`, the input flattened (token
  ids first through an embedding of `TOKEN_DIM` per token, mean-pooled over the sequence, so the
  descriptor of a text client does not depend on where in its lines a character sits), the one-hot
  label appended, then ReLU layers of 120 and 84 units (LeNet's classifier widths) and `dim`
  outputs.
With `use_labels` false (PeFLL's label-free variant) phi sees x only.

Also here: the descriptor (mean phi), the (m, s) normalization of h's input, and the public
normalization of `descriptor_norm = "public"` (ours: seeded noise inputs no client's data enters).
"""

from __future__ import annotations

import functools
import math

import torch
from torch import nn
from torch.nn import functional as F

from simfed.algorithms.base import Task
from simfed.algorithms.kit.models import LeNet, cache_key, constructed, count
from simfed.core.errors import SimfedError
from simfed.core.seeds import derive_seed

TOKEN_DIM = 16
HIDDEN = (120, 84)


class DescriptorMLP(nn.Module):
    def __init__(self, features: int, num_classes: int, dim: int, vocab: int = 0):
        super().__init__()
        self.embed = nn.Embedding(vocab, TOKEN_DIM) if vocab else None
        width = (TOKEN_DIM if vocab else features) + num_classes
        self.mlp = nn.Sequential(nn.Linear(width, HIDDEN[0]), nn.ReLU(), nn.Linear(HIDDEN[0], HIDDEN[1]), nn.ReLU(),
                                 nn.Linear(HIDDEN[1], dim))

    def forward(self, x: torch.Tensor, onehot: torch.Tensor | None = None) -> torch.Tensor:
        h = self.embed(x).mean(1) if self.embed is not None else x.flatten(1)
        if onehot is not None:
            h = torch.cat([h, onehot.to(h.dtype)], dim=1)
        return self.mlp(h)


def lenet_fits(task: Task) -> bool:
    shape = tuple(task.input_shape)
    return task.input != "tokens" and len(shape) == 3 and shape[1] == shape[2] and shape[1] >= 16


def embed_net(task: Task, dim: int, use_labels: bool) -> nn.Module:
    """phi for this task (module docstring), with `dim` outputs."""
    k = task.num_classes if use_labels else 0
    if lenet_fits(task):
        c, h, _ = task.input_shape
        return LeNet(in_channels=c + k, num_classes=dim, image_size=h)
    vocab = len(task.vocab) if task.input == "tokens" else 0
    return DescriptorMLP(math.prod(task.input_shape), k, dim, vocab)


def phi(net: nn.Module, x: torch.Tensor, y: torch.Tensor | None, num_classes: int) -> torch.Tensor:
    """phi(x, y) per sample, (N, dim); y None: label-free."""
    if isinstance(net, DescriptorMLP):
        return net(x, None if y is None else F.one_hot(y, num_classes))
    return net(embed_input(x, y, num_classes))


def embed_input(x: torch.Tensor, y: torch.Tensor | None, num_classes: int) -> torch.Tensor:
    """x (N, C, H, W) and labels -> (N, C + K, H, W) with the one-hot label as K constant planes."""
    if y is None:
        return x
    onehot = F.one_hot(y, num_classes).to(x.dtype)
    planes = onehot[:, :, None, None].expand(-1, -1, x.shape[2], x.shape[3])
    return torch.cat([x, planes], dim=1)


def descriptor(net, cfg, x, y, num_classes) -> torch.Tensor:
    """v = mean phi(x, y) over the rows given (differentiable w.r.t. the net's parameters)."""
    return phi(net, x, None if cfg.label_free else y, num_classes).mean(0)


def norm_of(u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(m, s): the mean and standard deviation over a descriptor's components."""
    m, s = u.mean(), (u.std() if u.numel() > 1 else torch.ones(()))
    if not torch.isfinite(s) or float(s) <= 0:  # a constant descriptor: centre only
        s = torch.ones(())
    return m.detach().clone(), s.detach().clone()


def public_norm(embed, cfg, task: Task, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(m, s) of phi's descriptor of a seeded batch of uniform-noise inputs with uniform labels:
    `descriptor_norm = "public"`, a normalization no client's data enters (what [privacy] needs)."""
    gen = torch.Generator().manual_seed(derive_seed(seed, "pefll-public"))
    if task.input == "tokens":  # ids, as the embedding network takes them
        x = torch.randint(max(len(task.vocab), 1), (cfg.descriptor_batch, *task.input_shape), generator=gen)
    else:
        x = torch.rand((cfg.descriptor_batch, *task.input_shape), generator=gen)
    y = torch.randint(task.num_classes, (cfg.descriptor_batch,), generator=gen)
    with torch.no_grad():
        return norm_of(descriptor(embed, cfg, x, y, task.num_classes))


@functools.lru_cache(maxsize=16)
def embed_values(task: Task, dim: int, use_labels: bool) -> int:
    """Parameters of phi for this task (what a describe or embed exchange moves)."""
    return count(constructed(lambda: embed_net(task, dim, use_labels), 0))


def embed_module(ctx, cfg, dim: int):
    return ctx.module(("pefll-embed", cache_key(ctx.task), dim, cfg.label_free),
                      lambda: embed_net(ctx.task, dim, not cfg.label_free))


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
