"""Engine test helpers: a small synthetic store and a compact way to build experiments."""

from __future__ import annotations

from simfed.algorithms import registry
from simfed.algorithms.base import config_from_dict
from simfed.engine.config import DataConfig, EngineConfig, Experiment, RunConfig


def make_exp(store: str, algorithm: str = "fedavg", *, rounds: int = 2, clients_per_round: int = 6,
             eval_every: int = 1, checkpoint_every: int = 1, seed: int = 0, backend: str = "serial",
             workers: int = 0, eval_clients: int = 0, **algo) -> Experiment:
    cfg = config_from_dict(registry.get(algorithm).Config, algo)
    return Experiment(algorithm=algorithm, algorithm_config=cfg, data=DataConfig(path=store),
                      run=RunConfig(rounds=rounds, clients_per_round=clients_per_round, eval_every=eval_every,
                                    checkpoint_every=checkpoint_every, seed=seed, eval_clients=eval_clients),
                      engine=EngineConfig(backend=backend, workers=workers))
