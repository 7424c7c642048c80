"""The Ray backend's dispatch: a worker takes back the chunks it ran in the previous phase."""

import dataclasses

import polars as pl
import pytest

from simfed.engine import metrics
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
    assert (later["worker"] == later["w0"]).mean() >= 0.75
