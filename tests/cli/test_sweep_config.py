"""Sweep files expand into typed trials: grid x per-method keys x random draws, checked up front."""

from __future__ import annotations

import tomllib

from simfed.sweeps.config import parse_sweep

BASE = """
[data]
path = "store"
[run]
rounds = 3
[algorithm]
batch_size = 16
[engine]
backend = "serial"
"""


def _parse(extra: str):
    return parse_sweep(tomllib.loads(BASE + extra), "test.toml")


def test_grid_and_per_method_keys():
    sweep = _parse("""
[sweep.grid]
algorithm.name = ["fedavg", "pefll"]
"run.seed" = [0, 1]
[sweep.method.fedavg]
"algorithm.lr" = [0.01, 0.1]
"algorithm.local_steps" = 7
[sweep.method.pefll]
algorithm.embed_dim = 5
""")
    trials = sweep.trials
    assert [t.id for t in trials] == [f"{i:03d}-{m}" for i, m in enumerate(["fedavg"] * 4 + ["pefll"] * 2)]
    fedavg = [t.experiment for t in trials if t.experiment.algorithm == "fedavg"]
    assert {(e.run.seed, e.algorithm_config.lr) for e in fedavg} == {(0, 0.01), (1, 0.01), (0, 0.1), (1, 0.1)}
    assert all(e.algorithm_config.local_steps == 7 and e.algorithm_config.batch_size == 16 for e in fedavg)
    pefll = [t.experiment for t in trials if t.experiment.algorithm == "pefll"]
    assert all(e.algorithm_config.embed_dim == 5 for e in pefll)
    assert all(t.experiment.engine.workers == 1 and t.experiment.run.name == t.id for t in trials)
    assert trials[0].doc["data"]["path"].endswith("/store")  # absolute: trials run in Tune's directories
    assert sweep.scheduler.name == "fifo"


def test_random_draws_are_shared_across_seeds_and_reproducible():
    text = """
[sweep]
samples = 3
seed = 4
scheduler = "asha"
grace_period = 2
[sweep.grid]
"algorithm.name" = ["fedavg"]
"run.seed" = [0, 1]
[sweep.random]
"algorithm.lr" = { loguniform = [1e-3, 1e-1] }
"algorithm.local_steps" = { choice = [5, 10] }
"""
    a, b = _parse(text), _parse(text)
    assert [t.overrides for t in a.trials] == [t.overrides for t in b.trials]
    assert len(a.trials) == 6 and a.scheduler.name == "asha" and a.scheduler.grace_period == 2
    by_seed = {}
    for t in a.trials:
        by_seed.setdefault(t.experiment.run.seed, []).append((t.experiment.algorithm_config.lr,
                                                             t.experiment.algorithm_config.local_steps))
    assert by_seed[0] == by_seed[1]  # one configuration = the same draw on every seed
    assert len({lr for lr, _ in by_seed[0]}) == 3 and all(1e-3 <= lr <= 1e-1 for lr, _ in by_seed[0])
