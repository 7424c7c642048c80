"""Name -> method registry. The engine looks methods up here and never imports one by name.

Built-in methods are the modules listed in BUILTIN, each of which calls `register`; third-party
packages add theirs through the `simfed.algorithms` entry-point group (name = "package.module").
"""

from __future__ import annotations

import importlib
from importlib.metadata import entry_points

from typing import TYPE_CHECKING

from simfed.core.errors import SimfedError
from simfed.core.validate import did_you_mean

if TYPE_CHECKING:  # importing this module stays free of torch: `simfed algorithms` lists methods from source
    from simfed.algorithms.base import Algorithm

_REGISTRY: dict[str, Algorithm] = {}
BUILTIN = ("fedavg", "local", "ditto", "fedrep", "pfedme", "knnper", "metafl", "pfedhn", "pefll", "fmlh",
           "fedacnnl", "pfedacnnl")
# Registered name -> module of the built-in methods whose name differs from their module's.
BUILTIN_NAMES = {**{m: m for m in BUILTIN}, "perfedavg": "metafl"}
_loaded = False


def register(cls: type[Algorithm]) -> type[Algorithm]:
    """Class decorator: make a method available under `cls.name`."""
    if not cls.name:
        raise TypeError(f"{cls.__qualname__} has no name")
    _REGISTRY[cls.name] = cls()
    return cls


def _load_all() -> None:
    global _loaded
    if _loaded:
        return
    _loaded = True
    for name in BUILTIN:
        importlib.import_module(f"simfed.algorithms.{name}")
    for ep in entry_points(group="simfed.algorithms"):
        importlib.import_module(ep.value)


def get(name: str) -> Algorithm:
    """The method registered as `name`. A built-in one imports only its own module: a worker or
    server process then pays for one method's imports, not thirteen."""
    if name not in _REGISTRY and name in BUILTIN_NAMES:
        importlib.import_module(f"simfed.algorithms.{BUILTIN_NAMES[name]}")
    if name not in _REGISTRY:
        _load_all()
    if name not in _REGISTRY:
        raise SimfedError(f"unknown algorithm {name!r}{did_you_mean(name, _REGISTRY)}; available: "
                          f"{', '.join(sorted(_REGISTRY))} (see `simfed algorithms`)")
    return _REGISTRY[name]


def names() -> list[str]:
    _load_all()
    return sorted(_REGISTRY)
