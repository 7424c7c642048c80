"""Seeded initialization for any module, without touching torch's global generator.

What is guaranteed (docs/models.md, "Initialization"): the same run seed gives the same initial
parameters, bit for bit, on every machine and in every process, and nothing draws from or changes
torch's global CPU generator. Two steps:

1. `constructed` builds the module inside `torch.random.fork_rng` with the global CPU generator
   seeded from derive_seed(seed, "model-construct"), and restores the generator's state after, so
   whatever a constructor draws (any module type, a user's own parameters included) is a function
   of the seed and the caller's global state is untouched.
2. `init_model` re-initializes the layer types it knows with an explicit torch.Generator seeded by
   the given seed, visiting `model.modules()` in order, each by torch's own default rule for that
   type: Linear and every ConvNd U(-1/sqrt(fan_in), 1/sqrt(fan_in)) for weight and bias (what
   kaiming_uniform(a=sqrt(5)) reduces to; the LeNet draws exactly as before this module existed),
   Embedding N(0, 1) (the padding row zero), RNN/LSTM/GRU U(-1/sqrt(hidden), 1/sqrt(hidden)) for
   every weight and bias, and the affine parameters of GroupNorm, LayerNorm, BatchNorm and
   InstanceNorm ones and zeros. Parameters of any other type keep their value from step 1.
"""

from __future__ import annotations

import math
from typing import Callable, Iterable, TypeVar

import torch
from torch import nn
from torch.nn.modules.batchnorm import _NormBase
from torch.nn.modules.conv import _ConvNd

from simfed.core.seeds import derive_seed

M = TypeVar("M", bound=nn.Module)
NORMS = (nn.GroupNorm, nn.LayerNorm, _NormBase)
KNOWN = (nn.Linear, _ConvNd, nn.Embedding, nn.RNNBase) + NORMS


def constructed(make: Callable[[], M], seed: int) -> M:
    """make() with the global CPU generator seeded from `seed`, its previous state restored after."""
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(derive_seed(seed, "model-construct"))
        return make()


def _uniform_(t: torch.Tensor, bound: float, gen: torch.Generator) -> None:
    # drawn on the CPU (the generator's device) and copied: a GPU worker's tensor gets the CPU draws
    t.copy_(torch.empty(t.shape, dtype=t.dtype).uniform_(-bound, bound, generator=gen))


@torch.no_grad()
def init_module_(m: nn.Module, gen: torch.Generator) -> None:
    """Re-initialize one module's own parameters by its type's default rule (unknown types: unchanged)."""
    if isinstance(m, (nn.Linear, _ConvNd)):
        # PyTorch's default (kaiming_uniform with a=sqrt(5)) reduces to U(-1/sqrt(fan_in), ...).
        bound = 1.0 / math.sqrt(m.weight[0].numel())
        _uniform_(m.weight, bound, gen)
        if m.bias is not None:
            _uniform_(m.bias, bound, gen)
    elif isinstance(m, nn.Embedding):
        m.weight.copy_(torch.randn(m.weight.shape, generator=gen, dtype=m.weight.dtype))
        if m.padding_idx is not None:
            m.weight[m.padding_idx].zero_()
    elif isinstance(m, nn.RNNBase):
        bound = 1.0 / math.sqrt(m.hidden_size)
        for p in m.parameters(recurse=False):
            _uniform_(p, bound, gen)
    elif isinstance(m, NORMS):
        if getattr(m, "weight", None) is not None:
            m.weight.fill_(1.0)
        if getattr(m, "bias", None) is not None:
            m.bias.zero_()


def init_modules_(modules: Iterable[nn.Module], gen: torch.Generator) -> None:
    for m in modules:
        init_module_(m, gen)


def init_model(model: M, seed: int) -> M:
    """Re-initialize every parameter of a known layer type from a seed (see the module docstring)."""
    init_modules_(model.modules(), torch.Generator().manual_seed(seed))
    return model
