"""Client networks shared by several methods, and flat-parameter helpers.

LeNet follows PeFLL's Table 3 (arXiv 2306.05515), the client network of the personalized-FL
benchmarks we compare with: two 5x5 convolutions without padding (16 and 32 channels), ReLU and
2x2 max-pooling after each, then 120 -> 84 -> C.
For 28x28 inputs the flattened size is 32*4*4 = 512; for 32x32 it is 32*5*5 = 800.
"""

from __future__ import annotations

import math

import torch
from torch import nn


class LeNet(nn.Module):
    def __init__(self, in_channels: int = 1, num_classes: int = 62, image_size: int = 28,
                 width: tuple[int, int] = (16, 32), hidden: tuple[int, int] = (120, 84)):
        super().__init__()
        c1, c2 = width
        side = ((image_size - 4) // 2 - 4) // 2
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, c1, 5), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(c1, c2, 5), nn.ReLU(), nn.MaxPool2d(2),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(c2 * side * side, hidden[0]), nn.ReLU(),
            nn.Linear(hidden[0], hidden[1]), nn.ReLU(),
            nn.Linear(hidden[1], num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


def lenet_for(input_shape: tuple[int, int, int], num_classes: int) -> LeNet:
    c, h, w = input_shape
    if h != w or h < 16:
        raise ValueError(f"LeNet needs square images of side >= 16, got {h}x{w}")
    return LeNet(in_channels=c, num_classes=num_classes, image_size=h)


def init_model(model: nn.Module, seed: int) -> nn.Module:
    """Re-initialize every parameter from a seed, so the initial model never depends on global RNG."""
    gen = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            fan_in = m.weight[0].numel()
            bound = 1.0 / math.sqrt(fan_in)
            with torch.no_grad():
                # PyTorch's default (kaiming_uniform with a=sqrt(5)) reduces to U(-1/sqrt(fan_in), ...).
                m.weight.copy_(torch.empty_like(m.weight).uniform_(-bound, bound, generator=gen))
                if m.bias is not None:
                    m.bias.copy_(torch.empty_like(m.bias).uniform_(-bound, bound, generator=gen))
    return model


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
