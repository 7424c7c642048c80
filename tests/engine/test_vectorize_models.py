"""engine.vectorize with models other than the LeNet: a model vmap can batch (ResNet-18's GroupNorm)
trains vectorized, close to the loop; one it cannot (the character LSTM) makes a worker fall back
to the per-client loop under "auto" (the engine refuses it under "on", tests/cli/test_models_cli.py)."""

from __future__ import annotations

import dataclasses

import polars as pl

from simfed.algorithms.base import Task
from simfed.algorithms.fedavg import FedAvgConfig
from simfed.algorithms.kit import models
from simfed.engine.loop import run_experiment
from simfed.engine.worker import Worker, WorkerSpec
from simfed.partitions.store import PartitionStore
from tests.engine.conftest import make_exp
from tests.engine.test_method_parity import rows


def test_a_worker_falls_back_to_the_loop_for_a_model_vmap_cannot_batch(shakespeare_store, tmp_path):
    st = PartitionStore.open(shakespeare_store)
    for name, vectorized in (("charlstm", False), ("mlp", True)):
        keys = {"hidden": 8 if name == "charlstm" else [8]}
        task = Task(**st.task_fields(), model=models.parse_spec({"name": name, **keys}))
        spec = WorkerSpec(store_path=shakespeare_store, algorithm="fedavg", cfg=FedAvgConfig(), task=task, seed=0,
                          state_dir=str(tmp_path / name), vectorize="on")
        assert Worker(spec).vectorize is vectorized, name


def test_resnet18_trains_vectorized_close_to_the_loop(cifar_store, tmp_path):
    exp = make_exp(cifar_store, "fedavg", rounds=1, clients_per_round=3, eval_every=1, eval_clients=2,
                   local_steps=2, batch_size=4)
    exp = dataclasses.replace(exp, model=models.parse_spec({"name": "resnet18", "width": 2}))
    on = dataclasses.replace(exp, engine=dataclasses.replace(exp.engine, vectorize="on"))
    run_experiment(on, tmp_path / "on")
    run_experiment(exp, tmp_path / "loop")
    test = lambda d: rows(d).filter(pl.col("split") == "test")
    a, b = test(tmp_path / "on"), test(tmp_path / "loop")
    assert a.height > 0 and a["client_id"].to_list() == b["client_id"].to_list()
    assert (a["loss"] - b["loss"]).abs().max() < 1e-3  # float32: another summation order, not bit-equal
