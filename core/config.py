"""Configuration files into typed values: the one place a dict becomes a frozen dataclass.

`config_from_dict` builds any frozen config dataclass (an experiment section, a method's config,
a sweep's settings) with the same checks: unknown keys list the valid ones, numbers are finite
and within int64, strings are strings. `load_toml` reads an experiment file safely,
`apply_overrides` applies `--set section.key=value` items, `to_toml` writes a resolved config back.
"""

from __future__ import annotations

import dataclasses
import json
import tomllib
from pathlib import Path
from typing import Any, Mapping

from simfed.core import validate
from simfed.core.errors import SimfedError
from simfed.core.safeio import read_bytes


def _quoted(v: Any, key: str) -> str:
    """How a wrong value reads in a message; a string that holds a number or a boolean was most
    likely quoted by mistake (rounds = "3"), so the message says to drop the quotes."""
    if isinstance(v, str):
        try:
            parsed = tomllib.loads(f"v = {v.strip()}")["v"]
        except (tomllib.TOMLDecodeError, RecursionError):
            parsed = None
        if isinstance(parsed, (int, float, bool)):
            return f"the string {json.dumps(v)} (in quotes); write it without the quotes: {key} = {v.strip()}"
    text = repr(v)
    return text if len(text) <= 60 else text[:57] + "..."


def config_from_dict(cls: type, values: Mapping[str, Any], where: str = "[algorithm]") -> Any:
    """Build a frozen config dataclass; unknown keys are an error that lists the valid ones."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        hint = validate.did_you_mean(unknown[0], fields) if len(unknown) == 1 else ""
        raise SimfedError(f"unknown key(s) {', '.join(unknown)} in {where}{hint}; valid keys: "
                          f"{', '.join(sorted(fields))}")
    out = {}
    for k, v in values.items():
        default = fields[k].default
        if isinstance(default, bool) and not isinstance(v, bool):
            raise SimfedError(f"{where} {k} must be true or false, got {_quoted(v, k)}")
        if isinstance(default, (int, float)) and not isinstance(default, bool):
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                raise SimfedError(f"{where} {k} must be a number, got {_quoted(v, k)}")
            if isinstance(default, float):
                # NaN, inf and absurd magnitudes (1e308 overflows at the first step) never pass.
                v = validate.number(f"{where} {k}", v)
            else:
                if isinstance(v, float) and v.is_integer() and abs(v) <= validate.INT64_MAX:
                    v = int(v)
                if isinstance(v, int) and abs(v) > validate.INT64_MAX:
                    raise SimfedError(f"{where} {k} = {v} does not fit in a 64-bit integer")
                v = validate.integer(f"{where} {k}", v, None, None)
        if isinstance(default, str) and not isinstance(v, str):
            raise SimfedError(f"{where} {k} must be a string (in quotes), got {v!r}")
        if isinstance(default, str):
            validate.text(f"{where} {k}", v)
        if isinstance(default, tuple):
            if not isinstance(v, (list, tuple)):
                raise SimfedError(f"{where} {k} must be a list, got {v!r}")
            v = tuple(v)
        out[k] = v
    try:
        return cls(**out)
    except (TypeError, ValueError) as exc:
        raise SimfedError(f"{where}: {exc}") from None


TOML_MAX_BYTES = 16 << 20  # an experiment file is a few hundred bytes


def load_toml(path: str) -> dict[str, Any]:
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


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    return json.dumps(str(v))


def to_toml(doc: Mapping[str, Any], order: tuple[str, ...] = ()) -> str:
    """A resolved config (tables of plain values) as TOML, the tables in `order` first; None values
    are left out."""
    lines = []
    for section in [*(s for s in order if s in doc), *(s for s in doc if s not in order)]:
        lines.append(f"[{section}]")
        lines += [f"{k} = {_toml_value(v)}" for k, v in doc[section].items() if v is not None]
        lines.append("")
    return "\n".join(lines)
