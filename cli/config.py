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
from simfed.cli.validate import check
from simfed.engine import validate
from simfed.engine.config import DataConfig, EngineConfig, Experiment, RunConfig
from simfed.engine.errors import SimfedError
from simfed.partitions.safeio import read_bytes

SECTIONS = {"data": DataConfig, "run": RunConfig, "engine": EngineConfig}


def quickstart_text() -> str:
    return resources.files("simfed.cli").joinpath("quickstart.toml").read_text()


TOML_MAX_BYTES = 16 << 20  # an experiment file is a few hundred bytes


def load_toml(path: str | None) -> dict[str, Any]:
    if path is None:
        return tomllib.loads(quickstart_text())
    validate.text("experiment file", path)
    if not Path(path).exists():
        raise SimfedError(f"experiment file {path} not found; pass a TOML file (see examples/) or none for the quickstart")
    raw = read_bytes(path, TOML_MAX_BYTES, "experiment file")  # never opens a FIFO
    try:
        return tomllib.loads(raw.decode("utf-8"))
    except tomllib.TOMLDecodeError as exc:
        raise SimfedError(f"{path}: invalid TOML: {exc}") from None
    except UnicodeDecodeError:
        raise SimfedError(f"{path}: not a text file") from None
    except RecursionError:
        raise SimfedError(f"{path}: invalid TOML: nested too deeply") from None


def apply_overrides(doc: dict[str, Any], overrides: list[str], notes: list[str] | None = None) -> dict[str, Any]:
    """Apply `--set section.key=value` items in order. Switching the method (`--set algorithm.name=X`
    on a file written for another method) drops the file's [algorithm] keys, which were chosen for
    that other method, so X runs with its own defaults plus the keys given with --set; the dropped
    keys are reported in `notes` (one line)."""
    algo = doc.get("algorithm")
    before = algo.get("name") if isinstance(algo, dict) else None
    file_keys = sorted(k for k in algo if k != "name") if isinstance(algo, dict) else []
    set_keys: set[str] = set()
    for item in overrides:
        key, sep, raw = item.partition("=")
        section, dot, name = key.strip().partition(".")
        if not sep or not dot or not section or not name:
            raise SimfedError(f"--set {item!r}: expected section.key=value, e.g. --set run.rounds=5")
        try:
            value = tomllib.loads(f"v = {raw.strip()}")["v"]
        except tomllib.TOMLDecodeError:
            value = raw.strip()  # a bare string such as --set algorithm.name=fedavg
        except RecursionError:
            raise SimfedError(f"--set {key.strip()}: value nested too deeply") from None
        target = doc.setdefault(section, {})
        if not isinstance(target, dict):
            raise SimfedError(f"--set {item!r}: [{section}] in the experiment file is not a table")
        target[name] = value
        if section == "algorithm":
            set_keys.add(name)
    algo_after = doc.get("algorithm")
    after = algo_after.get("name") if isinstance(algo_after, dict) else None
    if before is not None and after != before and file_keys:
        dropped = [k for k in file_keys if k not in set_keys]
        for k in dropped:
            del doc["algorithm"][k]
        if dropped and notes is not None:
            notes.append(f"--set algorithm.name={after}: dropped the file's {before} settings "
                         f"({', '.join(dropped)}); {after} uses its own defaults (`simfed algorithms {after}`), "
                         "change one with --set algorithm.KEY=VALUE")
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
    if not isinstance(doc.get("algorithm", {}), dict):
        raise SimfedError(f"{where}: [algorithm] must be a table")
    algo_doc = dict(doc.get("algorithm", {}))
    name = algo_doc.pop("name", None)
    if not name:
        raise SimfedError(f"{where}: [algorithm] name is missing; one of: {', '.join(registry.names())}")
    if not isinstance(name, str):
        raise SimfedError(f"{where}: [algorithm] name must be a string, got {name!r}")
    algo = registry.get(validate.text("[algorithm] name", name, max_len=200))
    cfg = config_from_dict(algo.Config, algo_doc, f"[algorithm] ({name})")
    return check(Experiment(algorithm=name, algorithm_config=cfg, **parts))


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
