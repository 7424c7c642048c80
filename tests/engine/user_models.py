"""Networks loaded by module path in the tests ([model] name = "tests.engine.user_models:FACTORY").

`small_cnn` is a well-formed user model (a plain Conv2d/ReLU/MaxPool2d/Flatten/Linear chain, so
every method can use it); the others are the bad cases the engine must refuse in one line.
"""

from __future__ import annotations

import math

from torch import nn


def small_cnn(task, channels: int = 8, hidden: int = 32) -> nn.Module:
    c, h, w = task.input_shape
    side = (h - 2) // 2
    return nn.Sequential(nn.Conv2d(c, channels, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                         nn.Linear(channels * side * ((w - 2) // 2), hidden), nn.ReLU(),
                         nn.Linear(hidden, task.num_classes))


def raises(task):
    raise RuntimeError("this factory always fails")


def not_a_module(task):
    return "a string"


def wrong_classes(task):
    return nn.Sequential(nn.Flatten(), nn.Linear(math.prod(task.input_shape), task.num_classes + 1))


def with_batchnorm(task):
    c, h, w = task.input_shape
    return nn.Sequential(nn.Conv2d(c, 4, 3), nn.BatchNorm2d(4), nn.Flatten(),
                         nn.Linear(4 * (h - 2) * (w - 2), task.num_classes))


def with_dropout(task):
    return nn.Sequential(nn.Flatten(), nn.Dropout(0.5), nn.Linear(math.prod(task.input_shape), task.num_classes))


def stateless_batchnorm(task):
    c, h, w = task.input_shape
    return nn.Sequential(nn.Conv2d(c, 4, 3), nn.BatchNorm2d(4, track_running_stats=False), nn.Flatten(),
                         nn.Linear(4 * (h - 2) * (w - 2), task.num_classes))


SEEN_KEYS: dict = {}


def record_keys(task, **keys):
    """Records the keys it was called with (the tests read SEEN_KEYS)."""
    SEEN_KEYS.clear()
    SEEN_KEYS.update(keys)
    return nn.Sequential(nn.Flatten(), nn.Linear(math.prod(task.input_shape), task.num_classes))


class Shuffled(nn.Module):
    """Chain-typed layers whose forward does not run them in registration order."""

    def __init__(self, task):
        super().__init__()
        c, h, w = task.input_shape
        self.first = nn.Linear(c * h * w, 16)
        self.act = nn.ReLU()
        self.second = nn.Linear(16, 16)
        self.act2 = nn.ReLU()
        self.out = nn.Linear(16, task.num_classes)

    def forward(self, x):
        h = self.act(self.first(x.flatten(1)))
        return self.out(h + self.act2(self.second(h)))  # a residual: not a chain
