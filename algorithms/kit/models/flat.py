"""A model's parameters as one flat vector: how every method stores, sends and loads a model.

The order is `model.parameters()`' order; `param_shapes` names it, `unflatten` cuts a vector (or a
batch of them) back into named tensors for `torch.func.functional_call`.
"""

from __future__ import annotations

import math

import torch
from torch import nn


def flat_params(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def load_flat(model: nn.Module, flat: torch.Tensor) -> None:
    """Copy a flat vector into the model's parameters in place (no reallocation per client)."""
    offset = 0
    with torch.no_grad():
        for p in model.parameters():
            n = p.numel()
            p.copy_(flat[offset:offset + n].view_as(p))
            offset += n
    if offset != flat.numel():
        raise ValueError(f"flat vector has {flat.numel()} values, model has {offset}")


def param_shapes(model: nn.Module) -> list[tuple[str, torch.Size]]:
    return [(name, p.shape) for name, p in model.named_parameters()]


def unflatten(flat: torch.Tensor, shapes: list[tuple[str, torch.Size]]) -> dict[str, torch.Tensor]:
    """Split a flat vector (or a batch of them, leading dims kept) into named tensors; differentiable."""
    out, offset = {}, 0
    lead = flat.shape[:-1]
    for name, shape in shapes:
        n = math.prod(shape)
        out[name] = flat[..., offset:offset + n].reshape(*lead, *shape)
        offset += n
    return out


def count(model: nn.Module) -> int:
    """Number of parameters (the length of the flat vector)."""
    return sum(p.numel() for p in model.parameters())
