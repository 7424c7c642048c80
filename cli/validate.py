"""Ranges and cross-field limits of an experiment, checked after parsing and before any work.

config_from_dict already guarantees types (numbers are finite and within int64, strings are
strings); this module adds what each key means: ranges, names that must be one path component,
addresses simfed can reach, and the method's keys by naming convention (every `*lr` is a step
size in [0, MAX_LR], `momentum` in [0, 1), ...). Machine-dependent limits (workers vs CPUs and
GPUs) live in engine.resources; they need the cluster, not just the file.
"""

from __future__ import annotations

import dataclasses

from simfed.engine import validate as v
from simfed.engine.config import Experiment

MAX_ROUNDS = 10_000_000
MAX_WORKERS = 100_000
MAX_RETRIES = 1_000
MAX_LR = 1e3  # a step size beyond this only ever produces inf/NaN updates (then all dropped)
GENERATORS = ("", "synthetic-femnist")


def _check_algorithm(exp: Experiment) -> None:
    where = f"[algorithm] ({exp.algorithm})"
    for f in dataclasses.fields(exp.algorithm_config):
        value = getattr(exp.algorithm_config, f.name)
        key = f"{where} {f.name}"
        if isinstance(value, bool):
            continue
        if isinstance(value, float):
            if f.name.endswith("lr"):
                v.number(key, value, 0.0, MAX_LR)
            elif f.name.endswith("momentum"):
                v.number(key, value, 0.0, 1.0, hi_open=True)
            elif f.name.endswith(("weight_decay", "clip")) or f.name.startswith("lambda"):
                v.number(key, value, 0.0)
        elif isinstance(value, int):
            # A negative default marks a sentinel (-1 = "same as training"); otherwise counts.
            default = f.default if isinstance(f.default, int) else 0
            v.integer(key, value, min(default, 0), v.INT64_MAX)


def check(exp: Experiment) -> Experiment:
    """Raise SimfedError (one line) for any value no run can use; returns exp unchanged."""
    d, r, e = exp.data, exp.run, exp.engine
    v.text("[data] path", d.path)
    v.choice("[data] generate", d.generate, GENERATORS)
    if d.generate:
        from simfed.partitions.synthetic import check_args

        check_args(clients=d.clients, seed=d.seed, style_strength=d.style_strength,
                   unseen_fraction=d.unseen_fraction)
    v.integer("[run] rounds", r.rounds, 1, MAX_ROUNDS)
    v.integer("[run] clients_per_round", r.clients_per_round, 1)
    v.integer("[run] eval_every", r.eval_every, 0)
    v.integer("[run] checkpoint_every", r.checkpoint_every, 0)
    v.seed("[run] seed", r.seed)
    v.integer("[run] eval_clients", r.eval_clients, 0)
    if r.name:
        v.component("[run] name", r.name)
    v.choice("[engine] backend", e.backend, ("ray", "serial"))
    v.choice("[engine] vectorize", e.vectorize, ("auto", "on", "off"))
    v.integer("[engine] workers", e.workers, 0, MAX_WORKERS)
    v.number("[engine] cpus_per_worker", e.cpus_per_worker, 0.0, 1e4, lo_open=True)
    v.number("[engine] gpus_per_worker", e.gpus_per_worker, 0.0, 1e3)
    v.address("[engine] address", e.address)
    v.integer("[engine] chunk_clients", e.chunk_clients, 0)
    v.integer("[engine] max_retries", e.max_retries, 0, MAX_RETRIES)
    v.integer("[engine] inflight_per_worker", e.inflight_per_worker, 1, 1_000)
    _check_algorithm(exp)
    return exp
