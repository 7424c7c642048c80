"""Checkpoints: a resumed run reaches the same numbers as one that never stopped."""

import polars as pl
import pytest
import torch

from simfed.engine import checkpoint, metrics
from simfed.core.errors import SimfedError
from simfed.engine.loop import run_experiment
from tests.engine.conftest import make_exp


def _final(run_dir):
    df = metrics.load(run_dir)
    return df.filter(pl.col("split") != "train").sort(["round", "client_id", "split"]).select(
        ["round", "client_id", "split", "loss", "accuracy"])


class _StopAfter:
    """Simulates Ctrl-C: raises KeyboardInterrupt when a given round's first chunk finishes."""

    def __init__(self, round):
        self.round = round

    def __call__(self, event):
        if event["type"] == "chunk" and event["round"] == self.round:
            raise KeyboardInterrupt


@pytest.mark.parametrize("algorithm", ["fedavg", "local"])
def test_interrupted_then_resumed_equals_uninterrupted(engine_store, tmp_path, algorithm):
    kw = dict(rounds=4, clients_per_round=6, eval_every=2, checkpoint_every=2, local_steps=4)
    run_experiment(make_exp(engine_store, algorithm, **kw), tmp_path / "full")

    with pytest.raises(KeyboardInterrupt):
        run_experiment(make_exp(engine_store, algorithm, **kw), tmp_path / "cut", on_event=_StopAfter(4))
    assert checkpoint.load(tmp_path / "cut")["round"] == 2
    status = (tmp_path / "cut" / "status.json").read_text()
    assert '"interrupted"' in status
    run_experiment(make_exp(engine_store, algorithm, **kw), tmp_path / "cut", resume=True)

    full, cut = _final(tmp_path / "full"), _final(tmp_path / "cut")
    assert full.height > 0 and full.equals(cut)
    a = checkpoint.load(tmp_path / "full")["server"]["theta"]
    b = checkpoint.load(tmp_path / "cut")["server"]["theta"]
    assert torch.equal(a, b)


def test_resume_refuses_pickled_code(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    torch.save({"format": 1, "round": 1, "server": Evil(), "counters": {}}, tmp_path / checkpoint.NAME)
    with pytest.raises(SimfedError, match="cannot load checkpoint"):
        checkpoint.load(tmp_path)


def test_fresh_run_will_not_overwrite_a_run(engine_store, tmp_path):
    run_experiment(make_exp(engine_store, rounds=1), tmp_path / "r")
    with pytest.raises(SimfedError, match="already holds a run"):
        run_experiment(make_exp(engine_store, rounds=1), tmp_path / "r")
