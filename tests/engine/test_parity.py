"""A run's numbers must not depend on the backend or on how many workers ran which client."""

import polars as pl
import pytest

from simfed.engine import metrics
from simfed.engine.loop import run_experiment
from tests.engine.conftest import make_exp


def _eval_rows(run_dir):
    df = metrics.load(run_dir).filter(pl.col("split") != "train")
    return df.sort(["round", "cohort", "split", "client_id"]).select(["round", "client_id", "split", "n", "loss",
                                                                      "accuracy"])


@pytest.mark.usefixtures("ray_session")
def test_serial_one_and_two_workers_agree(engine_store, tmp_path):
    runs = {}
    for name, backend, workers in (("serial", "serial", 0), ("ray1", "ray", 1), ("ray2", "ray", 2)):
        exp = make_exp(engine_store, rounds=2, clients_per_round=8, backend=backend, workers=workers, local_steps=5)
        result = run_experiment(exp, tmp_path / name)
        assert result["workers"] == (workers or 1)
        runs[name] = _eval_rows(tmp_path / name)
    ref = runs["serial"]
    assert ref.height > 0 and ref["accuracy"].max() > 0
    for name in ("ray1", "ray2"):
        other = runs[name]
        assert other.select(["round", "client_id", "split", "n"]).equals(ref.select(["round", "client_id", "split", "n"]))
        assert (other["loss"] - ref["loss"]).abs().max() < 1e-4, name
        assert (other["accuracy"] - ref["accuracy"]).abs().max() < 1e-9, name
    # Two workers really shared the cohort.
    train = metrics.load(tmp_path / "ray2").filter(pl.col("split") == "train")
    assert sorted(train["worker"].unique().to_list()) == [0, 1]
