"""Every registered method gives bit-identical numbers on serial, Ray with 1 and 2 workers, and Ray
interrupted then resumed: the same per-client metrics and the same final server state, compared
with ==.

This is the seam test for the protocol: multi-exchange rounds (PeFLL), per-client payloads from a
server hypernetwork (pFedHN, FMLH), per-layer float64 Gram sums (FedACnnL), multi-phase
evaluation (pFedHN's unseen embedding fit) and client state (Local) all cross process boundaries.

A new method needs one entry in SMALL: a config that runs in a second or two on 24 tiny clients.
`test_every_method_has_a_parity_config` fails until it has one.
"""

import polars as pl
import pytest
import torch

from simfed.algorithms import registry
from simfed.engine import checkpoint, metrics
from simfed.engine.loop import run_experiment
from tests.engine.conftest import make_exp

SMALL = {
    "fedavg": dict(local_steps=3),
    "local": dict(local_steps=3, unseen_steps=3),
    "pfedhn": dict(local_steps=3, unseen_exchanges=2, hidden=16, embed_dim=4),
    "pefll": dict(local_steps=3, hidden=16, embed_dim=4, descriptor_batch=8),
    "fmlh": dict(meta_steps=1, inner_steps=2, finetune_steps=2, hidden=16, embed_dim=4),
    "metafl": dict(nu=2, tau=1, gradient="exact"),
    "perfedavg": dict(tau=1),
    "fedacnnl": dict(forward_dtype="float64"),  # every patch position: the row-pair Gram
    "pfedacnnl": dict(patches_per_image=4, forward_dtype="float64", lambdas=[1.0, 100.0]),
    "fedrep": dict(head_epochs=0.5, body_epochs=0.5, unseen_head_epochs=0.5),
    "pfedme": dict(local_steps=2, K=2, unseen_epochs=0.2),
    "knnper": dict(local_steps=3, ks=[3]),
    "ditto": dict(local_steps=3, personal_steps=3, unseen_epochs=0.3),
}
KEYS = ["round", "cohort", "phase", "split", "client_id"]


def test_every_method_has_a_parity_config():
    assert set(registry.names()) - {n for n in registry.names() if n.startswith("test-")} <= set(SMALL)


def rows(run_dir) -> pl.DataFrame:
    """Per-client numbers of a run, in a fixed row order (workers write rows in arrival order)."""
    df = metrics.load(run_dir)
    cols = [c for c in ("n", "loss", "accuracy", "dropped") if c in df.columns]
    return df.sort(KEYS).select([*KEYS, *cols])


def same(a, b) -> bool:
    """Exact equality of two checkpointed server states (nested dicts/lists of tensors and values)."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape and bool(
            torch.equal(a, b) or (torch.isnan(a) == torch.isnan(b)).all() and torch.equal(a.nan_to_num(), b.nan_to_num()))
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return isinstance(b, (list, tuple)) and len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return a == b


class StopAt:
    """Ctrl-C when a given round's first chunk is in."""

    def __init__(self, round):
        self.round = round

    def __call__(self, event):
        if event["type"] == "chunk" and event["round"] == self.round:
            raise KeyboardInterrupt


@pytest.mark.usefixtures("ray_session")
@pytest.mark.parametrize("algorithm", sorted(SMALL))
def test_serial_ray_and_resumed_runs_are_bit_identical(engine_store, tmp_path, algorithm):
    kw = dict(rounds=2, clients_per_round=5, eval_every=2, checkpoint_every=1, eval_clients=3, **SMALL[algorithm])
    run_experiment(make_exp(engine_store, algorithm, **kw), tmp_path / "serial")
    for workers in (1, 2):
        run_experiment(make_exp(engine_store, algorithm, backend="ray", workers=workers, **kw), tmp_path / f"ray{workers}")
    cut = make_exp(engine_store, algorithm, backend="ray", workers=2, **kw)
    with pytest.raises(KeyboardInterrupt):
        run_experiment(cut, tmp_path / "resumed", on_event=StopAt(2))
    assert checkpoint.load(tmp_path / "resumed")["round"] == 1
    run_experiment(cut, tmp_path / "resumed", resume=True)

    ref, model = rows(tmp_path / "serial"), checkpoint.load(tmp_path / "serial")["server"]
    assert ref.filter(pl.col("split") != "train").height > 0 and set(ref["cohort"]) == {"seen", "unseen"}
    for name in ("ray1", "ray2", "resumed"):
        assert rows(tmp_path / name).equals(ref), name
        assert same(checkpoint.load(tmp_path / name)["server"], model), name
    # Two workers really shared the cohort.
    train = metrics.load(tmp_path / "ray2").filter(pl.col("split") == "train")
    assert sorted(train["worker"].unique().to_list()) == [0, 1]
    # the server's per-round scalars (collapse gauges of the hypernetwork methods) are persisted
    # and the same on every backend and after a resume
    ra = metrics.load_rounds(tmp_path / "serial")
    spreads = sorted(c for c in ra.columns if c.endswith("_spread"))
    assert bool(spreads) == (algorithm in ("pefll", "pfedhn", "fmlh"))
    assert all(0.0 < v <= 1.0 for c in spreads for v in ra[c].to_list()), ra
    for name in ("ray1", "ray2", "resumed"):
        assert metrics.load_rounds(tmp_path / name).equals(ra), name
