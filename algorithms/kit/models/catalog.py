"""Model names -> networks: the [model] table, the built-ins, user factories and entry points.

A `ModelSpec` (algorithms/base.py) names the network; this module resolves the name, in order:
1. a built-in: lenet, resnet18, mlp, charlstm. Each declares its keys as a frozen config
   dataclass, parsed with core.config.config_from_dict, so an unknown key lists the valid ones;
2. an entry point of the `simfed.models` group (name = "package.module:factory", in a package's
   pyproject), for networks a package ships;
3. "package.module:factory" itself: any importable callable.
A factory is called as factory(task, **keys) with the table's other keys (TOML lists arrive as
tuples) and must return a torch.nn.Module whose output is (batch, task.num_classes).

`build(task)` is a fresh module of the task's model, its parameters drawn from a fixed seed (a
caller loads its own values into it); `initial(task, seed)` the run's seeded initial model
(init.py says what is guaranteed). Neither touches torch's global generator.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import os
import sys
from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import Any, Callable, Mapping

from torch import nn

from simfed.algorithms.base import ModelSpec, Task
from simfed.algorithms.kit.models import nets
from simfed.algorithms.kit.models.init import constructed, init_model
from simfed.core.config import config_from_dict
from simfed.core.errors import SimfedError

GROUP = "simfed.models"
DEFAULT = ModelSpec()
BUILD_SEED = 0  # the construction seed of `build`: any fixed value (its parameters are overwritten)


@dataclass(frozen=True)
class LeNetKeys:
    width: tuple = (16, 32)  # channels of the two 5x5 convolutions
    hidden: tuple = (120, 84)  # units of the two hidden linear layers


@dataclass(frozen=True)
class ResNet18Keys:
    width: int = 64  # channels of the first stage (then x2, x4, x8); 64 is the real ResNet-18
    groups: int = 2  # GroupNorm groups in every normalization layer


@dataclass(frozen=True)
class MLPKeys:
    hidden: tuple = (200, 200)  # units of the hidden ReLU layers, in order
    embed_dim: int = 8  # token input only: the width of each token's embedding


@dataclass(frozen=True)
class CharLSTMKeys:
    embed_dim: int = 8  # LEAF: an 8-dimensional character embedding
    hidden: int = 256  # LEAF: 256 units per LSTM layer
    layers: int = 2  # LEAF: two stacked LSTM layers


def _lenet(task: Task, k: LeNetKeys) -> nn.Module:
    if len(k.width) != 2 or len(k.hidden) != 2:
        raise ValueError("lenet: width and hidden must each list two sizes")
    return nets.lenet_for(task.input_shape, task.num_classes, tuple(k.width), tuple(k.hidden))


def _mlp(task: Task, k: MLPKeys) -> nn.Module:
    vocab = len(task.vocab) if task.input == "tokens" else 0
    return nets.mlp_for(task.input_shape, task.num_classes, k.hidden, vocab, k.embed_dim)


# name -> (keys dataclass, factory(task, keys), one-line summary)
BUILTIN: dict[str, tuple[type, Callable[[Task, Any], nn.Module], str]] = {
    "lenet": (LeNetKeys, _lenet, "LeNet (PeFLL Table 3): two 5x5 conv + max-pool, 120 -> 84 -> classes; images"),
    "resnet18": (ResNet18Keys, lambda t, k: nets.resnet18_for(t.input_shape, t.num_classes, k.width, k.groups),
                 "ResNet-18 with GroupNorm and the CIFAR stem (3x3 first conv, no max-pool); images"),
    "mlp": (MLPKeys, _mlp, "MLP over the flattened input (tokens: an embedding first); any input"),
    "charlstm": (CharLSTMKeys, lambda t, k: nets.charlstm_for(t.input_shape, t.num_classes, len(t.vocab),
                                                              k.embed_dim, k.hidden, k.layers),
                 "LEAF's Shakespeare LSTM: 8-dim embedding, 2 x LSTM(256), linear; token sequences"),
}


def _plain(value: Any, where: str) -> Any:
    """A [model] value as a hashable plain value (lists -> tuples); tables are refused."""
    if isinstance(value, (list, tuple)):
        return tuple(_plain(v, where) for v in value)
    if isinstance(value, dict) or not isinstance(value, (str, int, float, bool)):
        raise SimfedError(f"{where} must be a number, string, boolean or list, got {value!r}")
    return value


def parse_spec(table: Mapping[str, Any], where: str = "[model]") -> ModelSpec:
    """The ModelSpec of a [model] table; a built-in's keys are checked here (an entry point's or a
    user factory's when the model is built, `check_task`)."""
    if not isinstance(table, Mapping):
        raise SimfedError(f"{where} must be a table")
    keys = dict(table)
    name = keys.pop("name", None)
    if not isinstance(name, str) or not name.strip():
        raise SimfedError(f"{where} name is missing or not a string; one of {', '.join(BUILTIN)}, an entry point "
                          f"of {GROUP}, or \"package.module:factory\" (see `simfed models`)")
    options = {k: _plain(v, f"{where} {k}") for k, v in keys.items()}
    if name in BUILTIN:
        config_from_dict(BUILTIN[name][0], options, f"{where} ({name})")
    elif ":" not in name and name not in _entry_points():
        raise SimfedError(f"{where} name = {name!r} is not a model; built-in: {', '.join(BUILTIN)}; entry points: "
                          f"{', '.join(sorted(_entry_points())) or 'none'}; or \"package.module:factory\"")
    return ModelSpec(name=name, options=tuple(sorted(options.items())))


def to_table(spec: ModelSpec) -> dict[str, Any]:
    """The [model] table of a spec (lists as lists), what a run directory's config holds."""
    def plain(v):
        return [plain(x) for x in v] if isinstance(v, tuple) else v
    return {"name": spec.name, **{k: plain(v) for k, v in spec.options}}


@functools.lru_cache(maxsize=1)
def _entry_points() -> dict[str, str]:
    return {ep.name: ep.value for ep in entry_points(group=GROUP)}


def _load(path: str, where: str) -> Callable:
    """The callable at "package.module:attr.attr"; one-line SimfedError when it does not import."""
    module, _, attr = path.partition(":")
    if not module or not attr:
        raise SimfedError(f"{where}: {path!r} is not \"package.module:factory\"")
    if os.getcwd() not in sys.path:
        # the current directory, as Ray's local workers (started with the driver's directory) see it
        sys.path.append(os.getcwd())
    try:
        obj = importlib.import_module(module)
    except Exception as exc:  # any failure of the user's import is reported, never a traceback
        raise SimfedError(f"{where}: module {module!r} does not import ({type(exc).__name__}: {exc}); install it, "
                          "run from the folder that holds it, or put that folder on PYTHONPATH") from None
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise SimfedError(f"{where}: module {module!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise SimfedError(f"{where}: {path!r} is a {type(obj).__name__}, not a callable factory(task, **keys)")
    return obj


@functools.lru_cache(maxsize=64)
def factory(name: str) -> Callable[..., nn.Module]:
    """The factory(task, **keys) of a model name (built-ins adapted to that form)."""
    where = f"[model] name = {name!r}"
    if name in BUILTIN:
        keys, make, _ = BUILTIN[name]
        return lambda task, **kw: make(task, config_from_dict(keys, kw, f"[model] ({name})"))
    if name in _entry_points():
        return _load(_entry_points()[name], f"{where} (entry point of {GROUP})")
    if ":" in name:
        return _load(name, where)
    raise SimfedError(f"{where} is not a model; built-in: {', '.join(BUILTIN)}, or \"package.module:factory\"")


def _make(task: Task) -> nn.Module:
    spec = task.model
    make = factory(spec.name)
    try:
        model = make(task, **spec.kwargs)
    except SimfedError:
        raise
    except Exception as exc:  # the factory's own failure, reported in one line
        raise SimfedError(f"[model] {spec.name}: building the model for input {tuple(task.input_shape)} "
                          f"({task.input}) and {task.num_classes} classes failed: "
                          f"{type(exc).__name__}: {' '.join(str(exc).split())}") from None
    if not isinstance(model, nn.Module):
        raise SimfedError(f"[model] {spec.name}: the factory returned a {type(model).__name__}, not a "
                          "torch.nn.Module")
    return model


def build(task: Task) -> nn.Module:
    """A fresh module of the task's model (float32, CPU), parameters from a fixed construction seed."""
    return constructed(lambda: _make(task), BUILD_SEED)


def initial(task: Task, seed: int) -> nn.Module:
    """The run's initial model: constructed under a seed derived from `seed`, then the known layer
    types re-initialized from `seed` itself (the LeNet's numbers are those of before models existed)."""
    return init_model(constructed(lambda: _make(task), seed), seed)


def cache_key(task: Task) -> tuple:
    """The key of a worker's cached client module (`ClientContext.module`)."""
    return ("model", task.model, tuple(task.input_shape), task.num_classes, task.input, len(task.vocab))


def describe_builtin(name: str) -> dict[str, Any]:
    """{summary, keys: {key: default}} of a built-in model."""
    keys, _, summary = BUILTIN[name]
    return {"summary": summary, "keys": {f.name: f.default for f in dataclasses.fields(keys)}}


def entry_point_names() -> list[str]:
    return sorted(_entry_points())
