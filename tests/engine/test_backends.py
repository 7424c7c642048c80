"""The Ray backend's dispatch: a worker takes back the chunks it ran in the previous phase."""

import dataclasses
from types import SimpleNamespace

import polars as pl
import pytest

from simfed.algorithms.base import RoundInfo
from simfed.engine import metrics
from simfed.engine.dispatch import Dispatch
from simfed.engine.loop import run_experiment
from tests.engine.conftest import make_exp


@pytest.mark.usefixtures("ray_session")
def test_a_chunk_returns_to_its_worker_in_the_next_phase(engine_store, tmp_path):
    """FedACnnL keeps each chunk's layer inputs in the worker for the next layer's phase; they are
    only of use if the chunk comes back to that worker. Five layer phases, 21 one-client chunks,
    two workers: (nearly) every client must stay on its first phase's worker."""
    exp = make_exp(engine_store, "fedacnnl", rounds=1, clients_per_round=21, eval_every=0, checkpoint_every=0,
                   backend="ray", workers=2, patches_per_image=4)
    exp = dataclasses.replace(exp, engine=dataclasses.replace(exp.engine, chunk_clients=1))
    run_experiment(exp, tmp_path / "run")
    df = metrics.load(tmp_path / "run").filter(pl.col("phase").str.starts_with("layer"))
    assert df["phase"].n_unique() == 5 and df["worker"].n_unique() == 2
    first = df.filter(pl.col("phase") == "layer0").select("client_id", pl.col("worker").alias("w0"))
    later = df.filter(pl.col("phase") != "layer0").join(first, on="client_id")
    assert later.height == 4 * 21
    # Which worker is free first is a matter of timing: 0.62-0.96 was seen over runs on 2 cores,
    # against 0.5 for chunks handed out without regard to where they ran (the rule itself is checked
    # exactly below).
    assert (later["worker"] == later["w0"]).mean() >= 0.6


def test_a_free_worker_takes_its_own_chunk_of_the_window_first_else_the_oldest():
    ran = {(0,): 1, (1,): 0, (2,): 1, (3,): 1, (4,): 0}  # chunk clients -> worker, last phase
    be = SimpleNamespace(server=SimpleNamespace(begin=SimpleNamespace(remote=lambda *a: None)),
                         spec=SimpleNamespace(algorithm="fedacnnl"), n_workers=2,
                         engine=SimpleNamespace(inflight_per_worker=1), _ran=ran)
    d = Dispatch(be, "layer1", RoundInfo(round=1, seed=0), [[c] for c in range(5)], None, 0)
    assert d.window == 4  # chunks 0..3 while none is folded
    assert d.pick(0) == 1 and d.pick(1) == 0
    d.todo = [0, 2, 3, 4]  # chunk 1 went to worker 0
    assert d.pick(0) == 0  # its own chunk 4 lies beyond the window: the oldest chunk instead
    d.folded = 1
    assert d.pick(0) == 4  # the window moved on: its own chunk again
