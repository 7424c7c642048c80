"""The [system] table: clients as they really are (availability, dropout, device speeds, deadlines).

Ours, after what FedScale (Lai et al., ICML 2022, arXiv 2105.11367) and FLGo model. Absent, the
experiment's `system` is None and nothing of this runs: today's ideal clients, today's numbers.
The keys (the virtual clock that uses them is engine/clock.py; docs/system.md has the details):
- `availability`: "always", a probability in [0, 1] (each client, each round), "diurnal"
  (probability from `diurnal_low` at virtual midnight to `diurnal_high` at noon, period
  `diurnal_period`) or the path of an availability trace (engine/traces.py). Only available
  clients are sampled; a trace client whose online interval ends before it finishes drops out.
- `dropout`: probability that a sampled client fails during the round, at a uniformly drawn
  fraction of its duration (its update is lost; its time is spent).
- `speed`: "lognormal" (medians `compute` samples/s, `down` and `up` bytes/s, log-spreads
  `*_spread`) or the path of a speed trace.
- `deadline` (virtual seconds, 0 = none) with `stragglers` = "drop" | "partial" (a straggler of a
  method declaring partial = "steps" trains the local steps it finishes in time) and `overcommit`
  (sample ceil(overcommit x K), keep the first K to finish).
- `idle_wait`: virtual seconds the server waits when no client is available; `start`: the virtual
  time the run starts at (0: midnight of the diurnal pattern, the trace's time 0).

This module stays light (no torch, numpy or pyarrow): the CLI parses configs without them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from simfed.core import validate as v
from simfed.core.config import config_from_dict
from simfed.core.errors import SimfedError

STRAGGLERS = ("drop", "partial")


@dataclass(frozen=True)
class SystemConfig:
    availability: Any = "always"  # "always" | probability in [0, 1] | "diurnal" | availability trace path
    diurnal_period: float = 86400.0
    diurnal_low: float = 0.2
    diurnal_high: float = 0.9
    dropout: float = 0.0
    speed: str = "lognormal"  # "lognormal" | speed trace path
    compute: float = 100.0  # median training samples per second
    compute_spread: float = 0.5  # standard deviation of log(compute)
    down: float = 1.25e6  # median download bytes per second
    down_spread: float = 0.5
    up: float = 2.5e5  # median upload bytes per second
    up_spread: float = 0.5
    deadline: float = 0.0  # virtual seconds per sync round; 0: none
    stragglers: str = "drop"  # "drop" | "partial"
    overcommit: float = 1.0  # sample ceil(overcommit x K), keep the first K to finish
    idle_wait: float = 60.0  # virtual seconds to wait when no client is available
    start: float = 0.0  # virtual time of the first round (0 = midnight of a diurnal pattern or a trace)


def parse(section: Any, where: str = "[system]") -> SystemConfig:
    """The [system] table; `availability` may be a number or a string, so it is taken apart."""
    if not isinstance(section, dict):
        raise SimfedError(f"{where} must be a table")
    rest = dict(section)
    avail = rest.pop("availability", "always")
    cfg = config_from_dict(SystemConfig, rest, where)
    if isinstance(avail, bool) or not isinstance(avail, (int, float, str)):
        raise SimfedError(f"{where} availability must be \"always\", a probability, \"diurnal\" or a trace path, "
                          f"got {avail!r}")
    if isinstance(avail, str):
        v.text(f"{where} availability", avail)
    else:
        avail = v.number(f"{where} availability", avail, 0.0, 1.0)
    return check(SystemConfig(**{**cfg.__dict__, "availability": avail}), where)


def check(cfg: SystemConfig, where: str = "[system]") -> SystemConfig:
    """Ranges of every key (one line each); the traces are read when the run is checked."""
    if isinstance(cfg.availability, str) and not cfg.availability:
        raise SimfedError(f"{where} availability is empty; use \"always\", a probability, \"diurnal\" or a trace path")
    for key in ("dropout", "diurnal_low", "diurnal_high"):
        v.number(f"{where} {key}", getattr(cfg, key), 0.0, 1.0)
    if cfg.diurnal_low > cfg.diurnal_high:
        raise SimfedError(f"{where} diurnal_low = {cfg.diurnal_low:g} exceeds diurnal_high = {cfg.diurnal_high:g}")
    if not cfg.speed:
        raise SimfedError(f"{where} speed is empty; use \"lognormal\" or a speed trace path")
    for key in ("compute", "down", "up", "diurnal_period", "idle_wait"):
        v.number(f"{where} {key}", getattr(cfg, key), 0.0, v.FLOAT_ABS_MAX, lo_open=True)
    for key in ("compute_spread", "down_spread", "up_spread"):
        v.number(f"{where} {key}", getattr(cfg, key), 0.0, 10.0)
    v.number(f"{where} deadline", cfg.deadline, 0.0, v.FLOAT_ABS_MAX)
    v.number(f"{where} start", cfg.start, 0.0, v.FLOAT_ABS_MAX)
    v.choice(f"{where} stragglers", cfg.stragglers, STRAGGLERS)
    v.number(f"{where} overcommit", cfg.overcommit, 1.0, 100.0)
    return cfg
