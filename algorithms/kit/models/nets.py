"""The built-in client networks: LeNet, ResNet-18 (GroupNorm, CIFAR stem), an MLP and LEAF's
character LSTM. Each takes what the data look like (input shape, classes, vocabulary) and its own
keys; `catalog.py` maps the [model] table's names to them.

- LeNet follows PeFLL's Table 3 (arXiv 2306.05515), the client network of the personalized-FL
  benchmarks we compare with: two 5x5 convolutions without padding (16 and 32 channels), ReLU and
  2x2 max-pooling after each, then 120 -> 84 -> C. For 28x28 inputs the flattened size is
  32*4*4 = 512; for 32x32 it is 32*5*5 = 800.
- ResNet-18 (He, Zhang, Ren, Sun, arXiv 1512.03385) in the form federated papers train on CIFAR:
  a 3x3 first convolution with stride 1 and no max-pool (the CIFAR stem), four stages of two
  basic blocks (64, 128, 256, 512 channels; stride 2 from the second stage), global average
  pooling and one linear layer. BatchNorm is replaced by GroupNorm (Hsieh, Phanishayee, Mutlu,
  Gibbons, arXiv 1910.00189, use 2 groups), because simfed exchanges parameters only and batch
  statistics of non-IID clients do not average. Ours: the `width` key scales every stage
  (64 = the real network, 11.2M parameters for 10 classes).
- The MLP is ours: flatten, `hidden` fully connected ReLU layers, a linear output. On token input
  an `embed_dim`-wide embedding of every token comes first (then flattened): token ids are
  categories, and an embedding is the standard and far smaller choice than a one-hot input of
  length x vocabulary.
- The character LSTM is LEAF's Shakespeare model (Caldas et al., arXiv 1812.01097; their
  models/shakespeare/stacked_lstm.py): an 8-dimensional character embedding, two LSTM layers of
  256 units, and a linear layer from the last step's output to the vocabulary (the next
  character).
"""

from __future__ import annotations

from typing import Sequence

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


def image_shape(input_shape: Sequence[int], model: str) -> tuple[int, int, int]:
    """(C, H, W) of an image task; ValueError naming the model for any other input."""
    if len(input_shape) != 3:
        raise ValueError(f"{model} needs (C, H, W) images, the store's samples have shape {tuple(input_shape)}")
    c, h, w = (int(v) for v in input_shape)
    return c, h, w


def lenet_for(input_shape: Sequence[int], num_classes: int, width: tuple[int, int] = (16, 32),
              hidden: tuple[int, int] = (120, 84)) -> LeNet:
    c, h, w = image_shape(input_shape, "LeNet")
    if h != w or h < 16:
        raise ValueError(f"LeNet needs square images of side >= 16, got {h}x{w}")
    return LeNet(in_channels=c, num_classes=num_classes, image_size=h, width=tuple(width), hidden=tuple(hidden))


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with GroupNorm, and a 1x1 projection shortcut where the shape changes."""

    def __init__(self, cin: int, cout: int, stride: int, groups: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.norm1 = nn.GroupNorm(groups, cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.norm2 = nn.GroupNorm(groups, cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.GroupNorm(groups, cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.norm1(self.conv1(x)))
        return torch.relu(self.norm2(self.conv2(out)) + self.shortcut(x))


class ResNet18(nn.Module):
    def __init__(self, in_channels: int, num_classes: int, width: int = 64, groups: int = 2):
        super().__init__()
        widths = [width, 2 * width, 4 * width, 8 * width]
        self.stem = nn.Sequential(nn.Conv2d(in_channels, width, 3, padding=1, bias=False),
                                  nn.GroupNorm(groups, width), nn.ReLU())
        blocks, cin = [], width
        for i, cout in enumerate(widths):
            for j in range(2):
                blocks.append(BasicBlock(cin, cout, 2 if i > 0 and j == 0 else 1, groups))
                cin = cout
        self.blocks = nn.Sequential(*blocks)
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.pool(self.blocks(self.stem(x))))


def resnet18_for(input_shape: Sequence[int], num_classes: int, width: int = 64, groups: int = 2) -> ResNet18:
    c, _, _ = image_shape(input_shape, "resnet18")
    if width < 1 or groups < 1 or width % groups:
        raise ValueError(f"resnet18: width ({width}) must be a positive multiple of groups ({groups})")
    return ResNet18(c, num_classes, width, groups)


def mlp_for(input_shape: Sequence[int], num_classes: int, hidden: Sequence[int], vocab: int = 0,
            embed_dim: int = 8) -> nn.Sequential:
    """Flatten (after a token embedding when `vocab` > 0), ReLU layers of `hidden` units, a linear output."""
    if any(int(h) < 1 for h in hidden) or embed_dim < 1:
        raise ValueError(f"mlp: hidden sizes and embed_dim must be >= 1, got {list(hidden)} and {embed_dim}")
    size = 1
    for v in input_shape:
        size *= int(v)
    layers: list[nn.Module] = []
    if vocab:
        layers.append(nn.Embedding(vocab, embed_dim))
        size *= embed_dim
    layers.append(nn.Flatten())
    for h in hidden:
        layers += [nn.Linear(size, int(h)), nn.ReLU()]
        size = int(h)
    layers.append(nn.Linear(size, num_classes))
    return nn.Sequential(*layers)


class CharLSTM(nn.Module):
    def __init__(self, vocab: int, num_classes: int, embed_dim: int = 8, hidden: int = 256, layers: int = 2):
        super().__init__()
        self.embed = nn.Embedding(vocab, embed_dim)
        self.lstm = nn.LSTM(embed_dim, hidden, num_layers=layers, batch_first=True)
        self.head = nn.Linear(hidden, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.lstm(self.embed(x))
        return self.head(out[:, -1])


def charlstm_for(input_shape: Sequence[int], num_classes: int, vocab: int, embed_dim: int = 8, hidden: int = 256,
                 layers: int = 2) -> CharLSTM:
    if not vocab or len(input_shape) != 1:
        raise ValueError(f"charlstm needs a sequence of token ids (a store with input \"tokens\"), the store's "
                         f"samples have shape {tuple(input_shape)}" + ("" if vocab else " and no vocabulary"))
    if min(embed_dim, hidden, layers) < 1:
        raise ValueError("charlstm: embed_dim, hidden and layers must be >= 1")
    return CharLSTM(vocab, num_classes, embed_dim, hidden, layers)
