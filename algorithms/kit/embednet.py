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
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from simfed.algorithms.base import Task
from simfed.algorithms.kit.models import LeNet

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
