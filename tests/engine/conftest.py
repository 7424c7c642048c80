"""Engine test helpers: a small synthetic store and a compact way to build experiments."""

from __future__ import annotations

import dataclasses

import polars as pl
import pytest

from simfed.algorithms import registry
from simfed.core.config import config_from_dict
from simfed.engine import metrics
from simfed.engine.config import DataConfig, EngineConfig, Experiment, RunConfig
from simfed.engine.loop import run_experiment


def make_exp(store: str, algorithm: str = "fedavg", *, rounds: int = 2, clients_per_round: int = 6,
             eval_every: int = 1, checkpoint_every: int = 1, seed: int = 0, backend: str = "serial",
             workers: int = 0, eval_clients: int = 0, **algo) -> Experiment:
    cfg = config_from_dict(registry.get(algorithm).Config, algo)
    return Experiment(algorithm=algorithm, algorithm_config=cfg, data=DataConfig(path=store),
                      run=RunConfig(rounds=rounds, clients_per_round=clients_per_round, eval_every=eval_every,
                                    checkpoint_every=checkpoint_every, seed=seed, eval_clients=eval_clients),
                      engine=EngineConfig(backend=backend, workers=workers))


# Fault runs compare with an undisturbed Ray run of the same seed, ==, row by row: the server folds
# chunk results in chunk order, so neither arrival order, nor retries, nor restarts change a bit.
FAULT_WORKERS = 2
FAULT_KW = dict(rounds=4, clients_per_round=8, eval_every=1, checkpoint_every=2, local_steps=5)


def fault_exp(store, **engine):
    exp = make_exp(store, backend="ray", workers=FAULT_WORKERS, **FAULT_KW)
    return dataclasses.replace(exp, engine=dataclasses.replace(exp.engine, **engine))


NUMBERS = ["round", "split", "cohort", "client_id", "n", "loss", "accuracy", "bytes_up", "bytes_down", "dropped"]


def numbers(run_dir) -> pl.DataFrame:
    return metrics.load(run_dir).select(NUMBERS).sort(["round", "split", "cohort", "client_id"])


@pytest.fixture(scope="session")
def undisturbed(engine_store, tmp_path_factory, ray_session):
    """Per-client numbers of the fault-test run, undisturbed (Ray, FAULT_WORKERS workers)."""
    run_dir = tmp_path_factory.mktemp("faults") / "undisturbed"
    run_experiment(fault_exp(engine_store), run_dir)
    df = numbers(run_dir)
    assert df.filter(pl.col("split") == "test").height > 0 and df["round"].max() == FAULT_KW["rounds"]
    return df
