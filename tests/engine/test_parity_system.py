"""The [system] clock keeps simfed's promise: with availability, dropout, lognormal speeds, a deadline
with over-commitment and partial stragglers, and with FedBuff, the per-client metrics (virtual
clock columns included), the round statistics and the final model are == on serial, Ray with 1 and
2 workers, and Ray interrupted then resumed. An ideal [system] table changes no number at all.
"""

import dataclasses

import polars as pl
import pytest

from simfed.engine import checkpoint, metrics
from simfed.engine.loop import run_experiment
from simfed.engine.system import SystemConfig
from tests.engine.conftest import make_exp
from tests.engine.test_method_parity import KEYS, StopAt, same

CLOCK = ["n", "loss", "accuracy", "dropped", "bytes_up", "bytes_down", "virtual_start", "virtual_seconds", "outcome",
         "staleness"]
# Durations here are 1.5-6 virtual seconds (defaults: 100 samples/s, 1.25 MB/s down, 250 kB/s up,
# a 360 kB LeNet): a 3.5 s deadline makes stragglers, some of them partial.
SYNC = SystemConfig(availability=0.8, dropout=0.15, compute_spread=0.8, up_spread=0.6, deadline=3.5,
                    overcommit=1.3, stragglers="partial")
ASYNC = SystemConfig(availability=0.9, dropout=0.15, compute_spread=0.8, up_spread=0.6)


def experiment(store, algorithm, system, aggregation="sync", **kw):
    exp = make_exp(store, algorithm, rounds=3, clients_per_round=5, eval_every=3, checkpoint_every=1, eval_clients=3,
                   **kw)
    return dataclasses.replace(exp, system=system, run=dataclasses.replace(exp.run, aggregation=aggregation,
                                                                            buffer_size=3))


def rows(run_dir) -> pl.DataFrame:
    """A client may have several runs in one asynchronous round (dropped, then restarted)."""
    return metrics.load(run_dir).sort([*KEYS, "virtual_start", "outcome"]).select([*KEYS, *CLOCK])


def on(exp, backend, workers=0):
    return dataclasses.replace(exp, engine=dataclasses.replace(exp.engine, backend=backend, workers=workers))


@pytest.mark.usefixtures("ray_session")
@pytest.mark.parametrize("algorithm,aggregation,kw", [
    ("fedavg", "sync", dict(local_steps=6)),
    ("ditto", "fedbuff", dict(local_steps=3, personal_steps=2, unseen_epochs=0.3)),
], ids=["sync-deadline-overcommit-partial", "fedbuff-client-state"])
def test_system_runs_are_bit_identical_everywhere(engine_store, tmp_path, algorithm, aggregation, kw):
    exp = experiment(engine_store, algorithm, SYNC if aggregation == "sync" else ASYNC, aggregation, **kw)
    run_experiment(exp, tmp_path / "serial")
    for workers in (1, 2):
        run_experiment(on(exp, "ray", workers), tmp_path / f"ray{workers}")
    with pytest.raises(KeyboardInterrupt):
        run_experiment(on(exp, "ray", 2), tmp_path / "resumed", on_event=StopAt(3))
    assert checkpoint.load(tmp_path / "resumed")["round"] == 2
    run_experiment(on(exp, "ray", 2), tmp_path / "resumed", resume=True)

    ref, model, stats = rows(tmp_path / "serial"), checkpoint.load(tmp_path / "serial")["server"], \
        metrics.load_rounds(tmp_path / "serial")
    for name in ("ray1", "ray2", "resumed"):
        assert rows(tmp_path / name).equals(ref), name
        assert same(checkpoint.load(tmp_path / name)["server"], model), name
        assert metrics.load_rounds(tmp_path / name).equals(stats), name
    # the run exercised what it claims: every outcome (sync), stale updates (fedbuff), a clock that moved
    train = ref.filter(pl.col("split") == "train")
    outcomes = set(train["outcome"])
    if aggregation == "sync":
        assert outcomes == {"completed", "partial", "dropped", "straggler"}, outcomes
        part = train.filter(pl.col("outcome") == "partial")
        assert (part["n"] < 6 * 32).all() and (part["n"] > 0).all()  # fewer local steps than a full client
    else:
        assert {"completed", "dropped"} <= outcomes and train["staleness"].max() > 0
        assert train.filter(pl.col("outcome") == "completed").group_by("round").len().sort("round")["len"].to_list() \
            == [3, 3, 3]
    times = stats["virtual_time"].to_list()
    assert times == sorted(times) and times[0] > 0


def test_an_ideal_system_table_changes_no_number(engine_store, tmp_path):
    """availability "always", no dropout, no deadline: the same cohorts and numbers as without [system],
    plus the clock's columns (and only with the table)."""
    plain = make_exp(engine_store, rounds=2, clients_per_round=5, local_steps=3)
    run_experiment(plain, tmp_path / "plain")
    run_experiment(dataclasses.replace(plain, system=SystemConfig()), tmp_path / "ideal")
    a, b = metrics.load(tmp_path / "plain").sort(KEYS), metrics.load(tmp_path / "ideal").sort(KEYS)
    numbers = [*KEYS, "n", "loss", "accuracy", "dropped", "bytes_up", "bytes_down"]
    assert a.select(numbers).equals(b.select(numbers))
    assert a.select(CLOCK[-4:]).null_count().row(0) == (a.height,) * 4
    train = b.filter(pl.col("split") == "train")
    assert set(train["outcome"]) == {"completed"} and train["virtual_seconds"].min() > 0
    assert "virtual_time" not in metrics.load_rounds(tmp_path / "plain").columns
    assert same(checkpoint.load(tmp_path / "plain")["server"], checkpoint.load(tmp_path / "ideal")["server"])
