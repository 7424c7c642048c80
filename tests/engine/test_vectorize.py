"""engine.vectorize: the chunk trainer runs through the engine, deterministically, and agrees with the loop."""

from __future__ import annotations

import dataclasses

import polars as pl
import pytest

from simfed.algorithms import registry

from simfed.engine import checkpoint
from simfed.core.errors import SimfedError
from simfed.engine.loop import run_experiment
from simfed.engine.plan import check_experiment
from tests.engine.conftest import make_exp
from tests.engine.test_method_parity import SMALL, rows, same


def _with(exp, **engine):
    return dataclasses.replace(exp, engine=dataclasses.replace(exp.engine, **engine))


@pytest.mark.usefixtures("ray_session")
@pytest.mark.parametrize("algorithm", ["fedavg", "local"])
def test_vectorized_runs_are_bit_identical_across_backends_and_close_to_the_loop(engine_store, tmp_path, algorithm):
    kw = dict(rounds=2, clients_per_round=5, eval_every=2, eval_clients=3, local_epochs=1.0)
    if algorithm == "local":
        kw["unseen_steps"] = 3
    on = _with(make_exp(engine_store, algorithm, **kw), vectorize="on")
    run_experiment(on, tmp_path / "serial")
    run_experiment(_with(on, backend="ray", workers=2), tmp_path / "ray2")
    run_experiment(_with(on, vectorize="off"), tmp_path / "loop")
    ref = rows(tmp_path / "serial")
    assert rows(tmp_path / "ray2").equals(ref)
    assert same(checkpoint.load(tmp_path / "ray2")["server"], checkpoint.load(tmp_path / "serial")["server"])
    # float32: the batched kernels sum in another order than the loop, so close, not equal.
    loop = rows(tmp_path / "loop")
    evals = lambda df: df.filter(pl.col("split") == "test").sort(["round", "cohort", "client_id"])
    a, b = evals(ref), evals(loop)
    assert a.height > 0 and a["client_id"].to_list() == b["client_id"].to_list()
    assert (a["loss"] - b["loss"]).abs().max() < 1e-3
    train = lambda df: df.filter(pl.col("split") == "train").sort(["round", "client_id"])["n"].to_list()
    assert train(ref) == train(loop)  # the same samples were trained


def test_vectorize_on_for_a_method_without_a_chunk_step_is_a_config_error(engine_store):
    # Ditto's client step (global and personal SGD) has no chunk step: never vectorized
    exp = _with(make_exp(engine_store, "ditto", **SMALL["ditto"]), vectorize="on")
    with pytest.raises(SimfedError, match="vectorize"):
        check_experiment(exp)


@pytest.mark.parametrize("algorithm", ["pfedhn", "pefll", "metafl", "perfedavg"])
def test_vectorized_client_step_of_each_method_runs_a_round_close_to_the_loop(engine_store, tmp_path,
                                                                            monkeypatch, algorithm):
    """engine.vectorize = "on" trains a round of each method through its `chunk_replies` (counted),
    end to end on the serial backend; float32, so close to the loop's numbers, not equal."""
    algo = registry.get(algorithm)
    owner = next(c for c in type(algo).__mro__ if "chunk_replies" in vars(c))
    original, calls = vars(owner)["chunk_replies"], []

    def counted(self, phase, *args):
        calls.append(phase)
        return original(self, phase, *args)

    kw = dict(rounds=1, clients_per_round=5, eval_every=1, eval_clients=3, **SMALL[algorithm])
    on = _with(make_exp(engine_store, algorithm, **kw), vectorize="on")
    with monkeypatch.context() as m:
        m.setattr(owner, "chunk_replies", counted)
        run_experiment(on, tmp_path / "on")
    assert calls and set(calls) == set(algo.capabilities.chunk_replies)
    run_experiment(_with(on, vectorize="off"), tmp_path / "loop")
    a, b = rows(tmp_path / "on"), rows(tmp_path / "loop")
    assert a.select(["round", "cohort", "phase", "split", "client_id", "n"]).equals(
        b.select(["round", "cohort", "phase", "split", "client_id", "n"]))  # the same samples trained
    train = a.filter(pl.col("split") == "train")["loss"].drop_nulls()
    assert train.len() >= 5 and (train - b.filter(pl.col("split") == "train")["loss"].drop_nulls()).abs().max() < 1e-4
    test = lambda df: df.filter(pl.col("split") == "test")["loss"]
    assert test(a).len() > 0 and (test(a) - test(b)).abs().max() < 1e-3
