"""Experiment files: TOML -> typed `Experiment`. The only place config is parsed.

Sections: [data], [run], [engine] map onto the dataclasses in simfed.engine.config; [algorithm]
holds `name` plus the method's own keys (its frozen Config dataclass). Unknown sections or keys are
errors that list the valid ones. `--set section.key=value` overrides take TOML values (strings
may be bare). Relative data paths are taken from the current directory.
"""

from __future__ import annotations

import dataclasses
import json
import tomllib
from importlib import resources
from pathlib import Path
from typing import Any

from simfed.algorithms import registry
from simfed.algorithms.base import config_from_dict
from simfed.engine.config import DataConfig, EngineConfig, Experiment, RunConfig
from simfed.engine.errors import SimfedError

SECTIONS = {"data": DataConfig, "run": RunConfig, "engine": EngineConfig}


def quickstart_text() -> str:
    return resources.files("simfed.cli").joinpath("quickstart.toml").read_text()


def load_toml(path: str | None) -> dict[str, Any]:
    if path is None:
        return tomllib.loads(quickstart_text())
    p = Path(path)
    if not p.is_file():
        raise SimfedError(f"experiment file {path} not found; pass a TOML file (see examples/) or none for the quickstart")
    try:
        return tomllib.loads(p.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise SimfedError(f"{path}: invalid TOML: {exc}") from None
    except UnicodeDecodeError:
        raise SimfedError(f"{path}: not a text file") from None


def apply_overrides(doc: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    for item in overrides:
        key, sep, raw = item.partition("=")
        section, dot, name = key.strip().partition(".")
        if not sep or not dot or not section or not name:
            raise SimfedError(f"--set {item!r}: expected section.key=value, e.g. --set run.rounds=5")
        try:
            value = tomllib.loads(f"v = {raw.strip()}")["v"]
        except tomllib.TOMLDecodeError:
            value = raw.strip()  # a bare string such as --set algorithm.name=fedavg
        doc.setdefault(section, {})[name] = value
    return doc


def parse(doc: dict[str, Any], where: str = "experiment") -> Experiment:
    unknown = sorted(set(doc) - set(SECTIONS) - {"algorithm"})
    if unknown:
        raise SimfedError(f"{where}: unknown section(s) [{'], ['.join(unknown)}]; valid: [algorithm], [data], [engine], [run]")
    parts = {}
    for name, cls in SECTIONS.items():
        section = doc.get(name, {})
        if not isinstance(section, dict):
            raise SimfedError(f"{where}: [{name}] must be a table")
        parts[name] = config_from_dict(cls, section, f"[{name}]")
    algo_doc = dict(doc.get("algorithm", {}))
    name = algo_doc.pop("name", None)
    if not name:
        raise SimfedError(f"{where}: [algorithm] name is missing; one of: {', '.join(registry.names())}")
    algo = registry.get(str(name))
    cfg = config_from_dict(algo.Config, algo_doc, f"[algorithm] ({name})")
    eng = parts["engine"]
    if eng.backend not in ("ray", "serial"):
        raise SimfedError(f"[engine] backend = {eng.backend!r}; use \"ray\" or \"serial\"")
    if eng.vectorize not in ("auto", "on", "off"):
        raise SimfedError(f"[engine] vectorize = {eng.vectorize!r}; use \"auto\", \"on\" or \"off\"")
    if eng.cpus_per_worker < 0 or eng.gpus_per_worker < 0 or eng.workers < 0:
        raise SimfedError("[engine] workers, cpus_per_worker and gpus_per_worker must be >= 0")
    return Experiment(algorithm=str(name), algorithm_config=cfg, **parts)


def to_dict(exp: Experiment) -> dict[str, Any]:
    out = {"algorithm": {"name": exp.algorithm, **dataclasses.asdict(exp.algorithm_config)}}
    for name in SECTIONS:
        out[name] = dataclasses.asdict(getattr(exp, name))
    return out


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    return json.dumps(str(v))


def to_toml(doc: dict[str, Any]) -> str:
    lines = []
    for section in ("data", "run", "algorithm", "engine"):
        lines.append(f"[{section}]")
        lines += [f"{k} = {_toml_value(v)}" for k, v in doc[section].items() if v is not None]
        lines.append("")
    return "\n".join(lines)
