"""Faults: a dead worker is replaced and its clients retried, a dead server restarted from the checkpoint,
both with the numbers of an undisturbed run; non-finite updates are dropped and counted."""

import json
import os
import signal
from dataclasses import dataclass

import polars as pl
import pytest
import torch

from simfed.algorithms.fedavg import FedAvg, FedAvgConfig
from simfed.algorithms.registry import register
from simfed.engine import checkpoint, metrics
from simfed.engine.loop import run_experiment
from tests.engine.conftest import fault_exp, make_exp, numbers
from tests.engine.test_method_parity import rows


@dataclass(frozen=True)
class NanConfig(FedAvgConfig):
    poison_every: int = 3


@register
class NanFedAvg(FedAvg):
    """FedAvg whose clients with id % poison_every == 0 send NaN updates."""

    name = "test-nan-fedavg"
    Config = NanConfig

    def client(self, phase, cfg, bcast, payload, data, cstate, ctx):
        reply = super().client(phase, cfg, bcast, payload, data, cstate, ctx)
        if ctx.mode == "train" and ctx.client_id % cfg.poison_every == 0:
            reply.sums["delta"] = reply.sums["delta"] * float("nan")
        return reply


def test_non_finite_updates_are_dropped_and_counted(engine_store, tmp_path):
    exp = make_exp(engine_store, "test-nan-fedavg", rounds=2, clients_per_round=12, local_steps=3)
    result = run_experiment(exp, tmp_path / "r")
    train = metrics.load(tmp_path / "r").filter(pl.col("split") == "train")
    poisoned = train.filter(pl.col("client_id") % 3 == 0)
    assert poisoned.height > 0
    assert poisoned["dropped"].all() and not train.filter(pl.col("client_id") % 3 != 0)["dropped"].any()
    assert result["dropped"] == poisoned.height
    # The model stayed finite: the NaNs never reached the average.
    ev = metrics.load(tmp_path / "r").filter(pl.col("split") == "test")
    assert ev["loss"].is_finite().all() and ev.height > 0


@pytest.mark.usefixtures("ray_session")
def test_killed_worker_is_replaced_and_its_clients_retried(engine_store, tmp_path):
    kw = dict(rounds=2, clients_per_round=16, local_steps=8, eval_every=2)
    run_experiment(make_exp(engine_store, **kw), tmp_path / "ref")
    state = {"pids": [], "killed": False}

    def kill_once(event):
        if event["type"] == "start":
            state["pids"] = [w["pid"] for w in event["workers"]]
        elif event["type"] == "chunk" and event["round"] == 2 and not state["killed"]:
            os.kill(state["pids"][0], signal.SIGKILL)
            state["killed"] = True

    exp = make_exp(engine_store, backend="ray", workers=2, **kw)
    result = run_experiment(exp, tmp_path / "killed", on_event=kill_once)
    assert state["killed"] and result["retries"] >= 1
    # Bit-identical to the serial run: per-client numbers and the final model.
    assert rows(tmp_path / "killed").equals(rows(tmp_path / "ref"))
    assert torch.equal(checkpoint.load(tmp_path / "killed")["server"]["theta"],
                       checkpoint.load(tmp_path / "ref")["server"]["theta"])
    # Every cohort client trained exactly once per round despite the retry.
    train = metrics.load(tmp_path / "killed").filter(pl.col("split") == "train")
    assert train.group_by(["round", "client_id"]).len()["len"].max() == 1
    # A pooled worker that died between two runs (on a cluster: with its node) is started again
    # when the next run sets the pool up.
    os.kill(state["pids"][1], signal.SIGKILL)
    run_experiment(exp, tmp_path / "next")
    assert rows(tmp_path / "next").equals(rows(tmp_path / "ref"))


def _kill_server_in_round(round_: int, state: dict):
    def on_event(event):
        if event["type"] == "start":
            state["server"] = event["server_pid"]
        elif event["type"] == "chunk" and event["round"] == round_ and not state.get("killed"):
            os.kill(state["server"], signal.SIGKILL)
            state["killed"] = True
    return on_event


def test_killed_server_is_restarted_from_the_checkpoint_with_the_same_numbers(engine_store, tmp_path, undisturbed):
    state: dict = {}
    # Killed in round 3: the checkpoint after round 2 is restored and round 3 replayed.
    result = run_experiment(fault_exp(engine_store), tmp_path / "r", on_event=_kill_server_in_round(3, state))
    assert state["killed"] and result["server_restarts"] == 1
    assert numbers(tmp_path / "r").equals(undisturbed)
    status = json.loads((tmp_path / "r" / "status.json").read_text())
    assert status["state"] == "finished" and status["server_restarts"] == 1


def test_server_deaths_beyond_the_bound_fail_with_the_resume_command(engine_store, tmp_path):
    from simfed.core.errors import RunFailed

    state: dict = {}
    with pytest.raises(RunFailed) as err:
        run_experiment(fault_exp(engine_store, max_retries=0), tmp_path / "r", on_event=_kill_server_in_round(1, state))
    message = str(err.value)
    assert err.value.exit_code == 1 and "\n" not in message
    assert f"simfed launch --resume {tmp_path / 'r'}" in message
    assert json.loads((tmp_path / "r" / "status.json").read_text())["state"] == "failed"


@pytest.mark.parametrize("backend", ["serial", "ray"])
def test_user_error_inside_a_client_surfaces_as_one_line_and_marks_the_run_failed(engine_store, tmp_path, backend,
                                                                                  request):
    import json

    from simfed.core.errors import SimfedError

    if backend == "ray":
        request.getfixturevalue("ray_session")
    # strict_batches: a client too small for one meta-step is a user error raised on the worker.
    exp = make_exp(engine_store, "metafl", backend=backend, workers=2 if backend == "ray" else 0,
                   nu=5, batch_size=64, strict_batches=True, tau=1)
    with pytest.raises(SimfedError) as err:
        run_experiment(exp, tmp_path / "r")
    assert type(err.value) is SimfedError and "strict_batches" in str(err.value)
    assert "Traceback" not in str(err.value) and "\n" not in str(err.value).strip()
    assert json.loads((tmp_path / "r" / "status.json").read_text())["state"] == "failed"
