"""Name -> method registry. The engine looks methods up here and never imports one by name.

Built-in methods are the modules of this package that call `register`; third-party packages add
theirs through the `simfed.algorithms` entry-point group (name = "package.module").
"""

from __future__ import annotations

import importlib
import pkgutil
from importlib.metadata import entry_points

from simfed.algorithms.base import Algorithm
from simfed.engine.errors import SimfedError

_REGISTRY: dict[str, Algorithm] = {}
_NOT_METHODS = {"base", "registry", "models", "training", "hypernet", "functional", "analytic"}
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
    import simfed.algorithms as pkg

    for mod in pkgutil.iter_modules(pkg.__path__):
        if mod.name not in _NOT_METHODS and not mod.name.startswith("_"):
            importlib.import_module(f"simfed.algorithms.{mod.name}")
    for ep in entry_points(group="simfed.algorithms"):
        importlib.import_module(ep.value)


def get(name: str) -> Algorithm:
    _load_all()
    if name not in _REGISTRY:
        raise SimfedError(f"unknown algorithm {name!r}; available: {', '.join(sorted(_REGISTRY))} (see `simfed algorithms`)")
    return _REGISTRY[name]


def names() -> list[str]:
    _load_all()
    return sorted(_REGISTRY)
