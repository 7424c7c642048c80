"""Clients report their mean training loss through the protocol (Reply.train_loss) and the engine logs
it in the train rows, for every method that has a loss; the closed-form methods log none."""

import math

import polars as pl
import pytest

from simfed.algorithms import registry
from simfed.engine import metrics
from simfed.engine.loop import run_experiment
from tests.engine.conftest import make_exp
from tests.engine.test_method_parity import SMALL

NO_LOSS = {"fedacnnl", "pfedacnnl"}  # layer-wise least squares: no loss is descended


@pytest.mark.parametrize("algorithm", sorted(SMALL))
def test_train_rows_carry_the_mean_training_loss(engine_store, tmp_path, algorithm):
    assert algorithm in registry.names()
    run_experiment(make_exp(engine_store, algorithm, rounds=1, clients_per_round=3, eval_every=0, eval_clients=1,
                            **SMALL[algorithm]), tmp_path / "r")
    train = metrics.load(tmp_path / "r").filter(pl.col("split") == "train")
    losses = train.filter(pl.col("loss").is_not_null())
    if algorithm in NO_LOSS:
        assert losses.height == 0
        return
    # One loss per client of the cohort, from the phase in which it trains (PeFLL's third, pFedHN's only).
    assert sorted(losses["client_id"].to_list()) == sorted(set(train["client_id"].to_list()))
    assert all(math.isfinite(v) and 0 < v < 20 for v in losses["loss"].to_list())
    assert metrics.train_curve(metrics.load(tmp_path / "r"))["loss_mean"][0] == pytest.approx(losses["loss"].mean())
