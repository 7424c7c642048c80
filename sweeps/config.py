"""Sweep files: an experiment file plus a `[sweep]` table -> the list of typed trials.

```toml
[sweep]
scheduler = "fifo"          # or "asha": stop trials whose seen-client validation accuracy lags
grace_period = 1            # asha: rounds before a trial may be stopped
reduction_factor = 3        # asha
samples = 0                 # random draws over [sweep.random] per grid point (0: none)
seed = 0                    # of those draws

[sweep.grid]                # every combination; keys are section.key of the experiment file
"algorithm.name" = ["fedavg", "pefll"]
"run.seed" = [0, 1, 2]

[sweep.method.fedavg]       # only for trials of that method: a list is a grid, a scalar a fixed value
"algorithm.lr" = [0.01, 0.03, 0.1]

[sweep.random]              # with samples = N: N draws per grid point, the same for every run.seed
"algorithm.lr" = { loguniform = [1e-4, 1e-1] }   # or uniform = [lo, hi], choice = [a, b, ...]
```

Everything is checked here, before Ray starts: every key exists (for every method it applies to),
every grid value has the key's type, no grid is empty, and every trial parses into an
`Experiment`. Keys of the base [algorithm] table apply to every method of the sweep. A sweep
without engine.workers runs one worker per trial. The engine only sees the typed trials.
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from simfed.algorithms import registry
from simfed.core.config import config_from_dict
from simfed.core.seeds import derive_seed
from simfed.engine import config as expcfg
from simfed.engine.config import Experiment
from simfed.core.errors import SimfedError
from simfed.sweeps.sweep import SchedulerConfig

SWEEP_KEYS = {"scheduler", "grace_period", "reduction_factor", "samples", "seed", "grid", "method", "random"}
SCHEDULERS = ("fifo", "asha")
DISTRIBUTIONS = ("uniform", "loguniform", "choice")
FIXED = {"run.name": "trial directories are named by the sweep", "engine.address": "use simfed sweep --address"}


@dataclass(frozen=True)
class Trial:
    id: str
    overrides: dict  # section.key -> value: what the sweep set for this trial
    doc: dict  # the resolved experiment (expcfg.to_dict), as saved in the trial's config.json
    experiment: Experiment


@dataclass(frozen=True)
class Sweep:
    trials: list
    scheduler: SchedulerConfig


def _flatten(table: Any, where: str) -> dict[str, Any]:
    """{"algorithm": {"lr": [..]}} (TOML dotted keys) and {"algorithm.lr": [..]} both -> "algorithm.lr"."""
    if not isinstance(table, dict):
        raise SimfedError(f"{where} must be a table of section.key = values, e.g. \"algorithm.lr\" = [0.01, 0.1]")
    out = {}
    for key, value in table.items():
        if "." not in key and isinstance(value, dict):
            for sub, v in value.items():
                out[f"{key}.{sub}"] = v
        else:
            out[key] = value
    return out


def _field(key: str, methods: list[str], where: str):
    """The dataclass fields `key` names, one per config class it applies to; unknown keys are errors."""
    section, _, name = key.partition(".")
    if section == "algorithm":
        if name == "name":
            return []
        out = []
        for m in methods:
            fields = {f.name: f for f in dataclasses.fields(registry.get(m).Config)}
            if name not in fields:
                raise SimfedError(f"{where}: unknown key {key!r} for method {m}; its keys: {', '.join(sorted(fields))}"
                                  " (put method-specific keys under [sweep.method.NAME])")
            out.append((registry.get(m).Config, fields[name]))
        return out
    tables = {**expcfg.SECTIONS, **expcfg.OPTIONAL}
    if section not in tables or "." in name or not name:
        raise SimfedError(f"{where}: unknown key {key!r}; keys are section.key with section one of "
                          "algorithm, data, engine, privacy, run")
    fields = {f.name: f for f in dataclasses.fields(tables[section])}
    if name not in fields:
        raise SimfedError(f"{where}: unknown key {key!r}; valid [{section}] keys: {', '.join(sorted(fields))}")
    if key in FIXED:
        raise SimfedError(f"{where}: {key} cannot be swept ({FIXED[key]})")
    return [(tables[section], fields[name])]


def _check_value(key: str, value: Any, fields, where: str) -> None:
    if key == "algorithm.name":
        if not isinstance(value, str):
            raise SimfedError(f"{where}: algorithm.name value {value!r} is not a method name (a string)")
        registry.get(value)  # unknown names list the registered ones
        return
    for cls, field in fields:
        if isinstance(field.default, str) and not isinstance(value, str):
            raise SimfedError(f"{where}: {key} = {value!r} has the wrong type; it takes a string")
        try:
            config_from_dict(cls, {field.name: value}, where)
        except SimfedError as exc:
            raise SimfedError(f"{where}: {key} = {value!r} has the wrong type ({exc})") from None


def _grid(table: dict, where: str, methods_of, list_only: bool) -> dict[str, list]:
    out = {}
    for key, values in _flatten(table, where).items():
        if not isinstance(values, list):
            if list_only:
                raise SimfedError(f"{where}: {key} must be a list of values, e.g. [{values!r}]")
            values = [values]
        if not values:
            raise SimfedError(f"{where}: {key} is an empty list; give at least one value")
        fields = _field(key, methods_of(key), where)
        for v in values:
            _check_value(key, v, fields, where)
        out[key] = values
    return out


def _draw(spec: Any, key: str, rng: np.random.Generator, where: str):
    if not isinstance(spec, dict) or len(spec) != 1 or next(iter(spec)) not in DISTRIBUTIONS:
        raise SimfedError(f"{where}: {key} must be one of {{uniform = [lo, hi]}}, {{loguniform = [lo, hi]}}, "
                          "{choice = [a, b, ...]}")
    kind, arg = next(iter(spec.items()))
    if kind == "choice":
        if not isinstance(arg, list) or not arg:
            raise SimfedError(f"{where}: {key} choice needs a non-empty list")
        return arg[int(rng.integers(len(arg)))]
    ok = (isinstance(arg, list) and len(arg) == 2 and all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                                           for v in arg) and arg[0] < arg[1])
    if not ok or (kind == "loguniform" and arg[0] <= 0):
        raise SimfedError(f"{where}: {key} {kind} needs [lo, hi] with lo < hi" + (" and lo > 0" if kind == "loguniform"
                                                                                  else ""))
    u = float(rng.random())
    if kind == "uniform":
        return arg[0] + u * (arg[1] - arg[0])
    return float(math.exp(math.log(arg[0]) + u * (math.log(arg[1]) - math.log(arg[0]))))


def _label(value: Any) -> str:
    text = f"{value:g}" if isinstance(value, float) else str(value)
    return "".join(c if c.isalnum() or c in "._-" else "_" for c in text)


def parse_sweep(doc: dict[str, Any], where: str) -> Sweep:
    """A sweep file's trials: every point of the grid (and of each method's own grid, and the random
    draws), each a fully parsed experiment; every mistake is one SimfedError line before any run."""
    doc = copy.deepcopy(doc)
    table = doc.pop("sweep", None)
    if not isinstance(table, dict):
        raise SimfedError(f"{where}: no [sweep] table; add [sweep.grid] with e.g. \"run.seed\" = [0, 1, 2] "
                          "(see examples/table1_fmnist.toml)")
    sched = _scheduler(table, where)
    names, grid, method_grids = _grids(doc, table, where)
    random, samples = _random(table, names, where)
    if not grid and not method_grids and not random:
        raise SimfedError(f"{where}: the sweep is empty; add [sweep.grid] with e.g. \"run.seed\" = [0, 1, 2]")
    # Base [algorithm] keys apply to every method: check them for each now, with a clear message.
    for key in (doc.get("algorithm") or {}):
        if key != "name":
            _field(f"algorithm.{key}", names, "[algorithm] (applies to every method of the sweep)")
    points = _points(names, grid, method_grids, random, samples, table.get("seed", 0))
    return Sweep(trials=[_trial(doc, i, point, where) for i, point in enumerate(points)], scheduler=sched)


def _scheduler(table: dict, where: str) -> SchedulerConfig:
    unknown = sorted(set(table) - SWEEP_KEYS)
    if unknown:
        raise SimfedError(f"{where}: unknown key(s) {', '.join(unknown)} in [sweep]; valid: {', '.join(sorted(SWEEP_KEYS))}")
    name = str(table.get("scheduler", "fifo"))
    if name not in SCHEDULERS:
        raise SimfedError(f"{where}: [sweep] scheduler = {name!r}; use one of {', '.join(SCHEDULERS)}")
    for key in ("grace_period", "reduction_factor", "samples", "seed"):
        v = table.get(key, 0)
        if not isinstance(v, int) or isinstance(v, bool) or v < 0:
            raise SimfedError(f"{where}: [sweep] {key} must be a whole number >= 0, got {v!r}")
    return SchedulerConfig(name=name, grace_period=max(1, table.get("grace_period", 1)),
                           reduction_factor=max(2, table.get("reduction_factor", 3)))


def _grids(doc: dict, table: dict, where: str) -> tuple[list[str], dict, dict]:
    """(methods, the common grid, each method's own grid)."""
    base_method = doc.get("algorithm", {}).get("name") if isinstance(doc.get("algorithm"), dict) else None
    raw_grid = table.get("grid", {})
    names = _flatten(raw_grid, "[sweep.grid]").get("algorithm.name", [base_method] if base_method else [])
    if not isinstance(names, list) or not names:
        raise SimfedError(f"{where}: no method: set [algorithm] name or [sweep.grid] \"algorithm.name\" = [...]")
    names = [str(n) for n in names]
    grid = _grid(raw_grid, "[sweep.grid]", lambda key: names, list_only=True)
    per_method = table.get("method", {})
    if not isinstance(per_method, dict) or not all(isinstance(v, dict) for v in per_method.values()):
        raise SimfedError(f"{where}: [sweep.method] must hold one table per method, e.g. [sweep.method.fedavg]")
    method_grids = {}
    for m, t in per_method.items():
        if m not in names:
            raise SimfedError(f"{where}: [sweep.method.{m}]: {m!r} is not a method of this sweep "
                              f"({', '.join(names)}); add it to \"algorithm.name\" or remove the table")
        method_grids[m] = _grid(t, f"[sweep.method.{m}]", lambda key, m=m: [m], list_only=False)
        clash = sorted(set(method_grids[m]) & set(grid))
        if clash:
            raise SimfedError(f"{where}: {', '.join(clash)} in both [sweep.grid] and [sweep.method.{m}]; keep one")
    return names, grid, method_grids


def _random(table: dict, names: list[str], where: str) -> tuple[dict, int]:
    random = _flatten(table.get("random", {}), "[sweep.random]")
    for key in random:
        _field(key, names, "[sweep.random]")
    samples = int(table.get("samples", 0))
    if random and samples == 0:
        raise SimfedError(f"{where}: [sweep.random] is set but [sweep] samples = 0; set samples = N draws per grid point")
    return random, samples


def _points(names: list[str], grid: dict, method_grids: dict, random: dict, samples: int, seed: int) -> list[dict]:
    points = []
    grid_items = [(k, v) for k, v in grid.items() if k != "algorithm.name"]
    for m in names:
        extra = list(method_grids.get(m, {}).items())
        keys = [k for k, _ in grid_items + extra]
        for combo in itertools.product(*[v for _, v in grid_items + extra]):
            point = {"algorithm.name": m, **dict(zip(keys, combo))}
            if not random:
                points.append(point)
                continue
            for s in range(samples):
                # The same draws for every run.seed, so that a configuration is one group over seeds.
                tag = sorted((k, repr(v)) for k, v in point.items() if k != "run.seed")
                rng = np.random.default_rng(derive_seed(seed, "sweep", tag, s))
                drawn = {k: _draw(spec, k, rng, "[sweep.random]") for k, spec in random.items()}
                for k, v in drawn.items():
                    _check_value(k, v, _field(k, [m], "[sweep.random]"), "[sweep.random]")
                points.append({**point, **drawn})
    return points


def _trial(doc: dict, i: int, point: dict, where: str) -> Trial:
    tid = f"{i:03d}-{point['algorithm.name']}"
    trial_doc = copy.deepcopy(doc)
    for key, value in point.items():
        section, _, name = key.partition(".")
        trial_doc.setdefault(section, {})[name] = value
    trial_doc.setdefault("run", {})["name"] = tid
    eng = trial_doc.setdefault("engine", {})
    if not eng.get("workers"):
        eng["workers"] = 1  # "as many as fit" means one trial takes the cluster: a sweep shares it
    data = trial_doc.setdefault("data", {})
    if data.get("path") and "://" not in str(data["path"]):
        data["path"] = str(Path(str(data["path"])).absolute())  # trials run in Ray Tune's own directories
    exp = expcfg.parse(trial_doc, f"{where} trial {tid} ({_describe(point)})")
    return Trial(id=tid, overrides=point, doc=expcfg.to_dict(exp), experiment=exp)


def _describe(point: dict) -> str:
    return " ".join(f"{k.split('.', 1)[1]}={_label(v)}" for k, v in point.items())


def describe(trial: Trial) -> str:
    return _describe(trial.overrides)
