"""pFedACnnL: the closed-form personal head, lambda selection on val, grouping by label histogram."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.nn import functional as F

from simfed.algorithms import registry
from simfed.algorithms.base import ClientData, RoundInfo
from simfed.core.config import config_from_dict
from simfed.algorithms.kit import analytic
from simfed.algorithms.kit.acnnl import geometry
from simfed.algorithms.pfedacnnl import features, personal_head
from simfed.core.errors import SimfedError

from test_fedacnnl import SMALL, TASK, ctx, drive, make_data, one_thread  # noqa: F401 (fixture)


def split_client(cid, x, y, seed=0, cohort="seen"):
    """A client with 60/20/20 train/val/test splits."""
    n = len(y)
    idx = np.random.default_rng(seed).permutation(n)
    parts = {"train": idx[:int(.6 * n)], "val": idx[int(.6 * n):int(.8 * n)], "test": idx[int(.8 * n):]}
    return ClientData(cid, cohort, lambda c, s: (x[parts[s]], y[parts[s]]))


def shifted_clients(k=8, n=150, seed=0):
    """Concept shift: on odd clients every label is moved by one, which no global head can fit."""
    out = []
    for c in range(k):
        x, y = make_data(n, seed=seed + c)
        out.append(split_client(c, x, (y + (c % 2)) % 4 if c % 2 else y, seed=c))
    return out


def evaluate(name, cfg, state, clients, split="test"):
    algo = registry.get(name)
    bcast = algo.broadcast("evaluate", cfg, state, RoundInfo(0, 0, mode="eval"))
    evs = [algo.client("evaluate", cfg, bcast, None, d, None, ctx(d.client_id, "evaluate", "eval")).evals[split]
           for d in clients]
    return sum(e.correct for e in evs) / sum(e.n for e in evs)


def cfg_of(name, **kw):
    return config_from_dict(registry.get(name).Config, {"layers": list(SMALL), **kw})


def test_personal_head_is_the_closed_form_toward_the_global_head():
    clients = shifted_clients()
    cfg = cfg_of("pfedacnnl", lambdas=[30.0], include_global=False)
    state, _ = drive("pfedacnnl", cfg, clients)
    geo = geometry(cfg, TASK)
    d = clients[1]
    x, y = d.split("train")
    h = features(cfg, geo, state.weights, x)
    w_g = state.weights[-1]
    expect = torch.linalg.solve(h.T @ h + 30.0 * torch.eye(h.shape[1], dtype=torch.float64),
                                h.T @ F.one_hot(y, 4).double() + 30.0 * w_g)
    got = personal_head(cfg, geo, state.weights, w_g, d, 4)
    assert torch.allclose(got, expect, rtol=1e-9, atol=1e-12)
    # the lambda picked is the one with the best validation accuracy of the grid
    grid = [0.1, 1e3, 1e8]
    cfg3 = cfg_of("pfedacnnl", lambdas=grid, include_global=False)
    xv, yv = d.split("val")
    hv = features(cfg, geo, state.weights, xv)
    accs = []
    for lam in grid:
        w = torch.linalg.solve(h.T @ h + lam * torch.eye(h.shape[1], dtype=torch.float64),
                               h.T @ F.one_hot(y, 4).double() + lam * w_g)
        accs.append(int(((hv @ w).argmax(1) == yv).sum()))
    chosen = personal_head(cfg3, geo, state.weights, w_g, d, 4)
    best = max(range(3), key=lambda j: (accs[j], grid[j]))
    w_best = torch.linalg.solve(h.T @ h + grid[best] * torch.eye(h.shape[1], dtype=torch.float64),
                                h.T @ F.one_hot(y, 4).double() + grid[best] * w_g)
    assert torch.allclose(chosen, w_best, rtol=1e-9, atol=1e-12)


def test_personalization_beats_the_global_model_under_concept_shift():
    clients = shifted_clients()
    unseen = [split_client(100 + c, *make_data(150, seed=50 + c), seed=c, cohort="unseen") for c in range(2)]
    unseen[1] = split_client(101, unseen[1].split("train")[0][:0].numpy(), np.zeros(0, np.int64))  # no data at all
    cfg_g, cfg_p = cfg_of("fedacnnl"), cfg_of("pfedacnnl")
    sg, _ = drive("fedacnnl", cfg_g, clients)
    sp, _ = drive("pfedacnnl", cfg_p, clients)
    assert all(torch.equal(a, b) for a, b in zip(sg.weights, sp.weights))  # same global solve
    acc_g, acc_p = evaluate("fedacnnl", cfg_g, sg, clients), evaluate("pfedacnnl", cfg_p, sp, clients)
    print("concept shift: global", acc_g, "personal", acc_p)
    assert acc_p > acc_g + 0.2, (acc_g, acc_p)
    # an unseen client solves its own head from its train split; evaluation works without train data too
    algo = registry.get("pfedacnnl")
    bcast = algo.broadcast("evaluate", cfg_p, sp, RoundInfo(0, 0, mode="eval", cohort="unseen"))
    ev = algo.client("evaluate", cfg_p, bcast, None, unseen[0], None, ctx(100, "evaluate", "eval")).evals
    assert ev["test"].n == 30 and ev["test"].correct / 30 > 0.5
    assert algo.client("evaluate", cfg_p, bcast, None, unseen[1], None, ctx(101, "evaluate", "eval")).evals == {}


def test_groups_by_label_histogram():
    clients = []
    for c in range(8):
        x, y = make_data(200, seed=c)
        keep = (y < 2) if c < 4 else (y >= 2)  # two label groups
        clients.append(split_client(c, x[keep], y[keep], seed=c))
    cfg = cfg_of("pfedacnnl", groups=2, cluster_iters=3)
    algo = registry.get("pfedacnnl")
    assert algo.train_phases(cfg, None, 0)[:4] == ("cluster0", "cluster1", "cluster2", "cluster3")
    state, seen = drive("pfedacnnl", cfg, clients)
    cents = state.centroids
    assert torch.allclose(cents[:, :2].sum(1).sort().values, torch.tensor([0.0, 1.0], dtype=torch.float64), atol=1e-12)
    head_sums = [acc for phase, _, acc in seen if phase == "layer2"][0]
    d = state.weights[-1].shape[0]
    assert head_sums["Ag"].shape == (2, d, d) and head_sums["bg"].shape == (2, d, 4)
    # the global head is FedACnnL's; the head of the {0, 1} group is the ridge solution of its clients only
    g0 = int(torch.argmax(cents[:, 0]))
    both, _ = drive("fedacnnl", cfg_of("fedacnnl"), clients)
    assert torch.allclose(state.weights[-1], both.weights[-1], rtol=1e-9, atol=1e-12)
    geo = geometry(cfg, TASK)
    a = sum(analytic.statistics(geo, 2, state.weights[:2], d_.split("train")[0],
                                lambda s, e, y=d_.split("train")[1]: F.one_hot(y[s:e], 4).double(), "relu", 2)[0]
            for d_ in clients[:4])
    assert torch.allclose(head_sums["Ag"][g0], a, rtol=1e-12)
    b = sum(analytic.statistics(geo, 2, state.weights[:2], d_.split("train")[0],
                                lambda s, e, y=d_.split("train")[1]: F.one_hot(y[s:e], 4).double(), "relu", 2)[1]
            for d_ in clients[:4])
    assert torch.allclose(state.group_heads[g0], torch.linalg.solve(a + torch.eye(d, dtype=torch.float64), b),
                          rtol=1e-8, atol=1e-12)
    acc = evaluate("pfedacnnl", cfg, state, clients)
    assert acc > 0.9, acc


def test_config_and_empty_cluster_phase_errors():
    cls = registry.get("pfedacnnl").Config
    for bad in ({"lambdas": []}, {"lambdas": [0.0, 1.0]}, {"groups": -1}, {"layers": ["conv5x8", "lstm", "fc"]}):
        with pytest.raises(SimfedError):
            config_from_dict(cls, bad)
    cfg = cfg_of("pfedacnnl", groups=2, cluster_iters=1)
    algo = registry.get("pfedacnnl")
    state = algo.init(cfg, TASK, 0)
    with pytest.raises(SimfedError, match="cluster0.*no client"):
        algo.finish("cluster0", cfg, state, {}, 0, RoundInfo(0, 0))
    with pytest.raises(SimfedError, match=r"layer 2 \(fc\).*0 clients"):
        algo.finish("layer2", cfg, state, {}, 0, RoundInfo(0, 0))


def test_pfedacnnl_end_to_end_through_the_engine(tiny_store, tmp_path):
    from simfed.engine.config import DataConfig, EngineConfig, Experiment, RunConfig
    from simfed.engine.loop import run_experiment
    from simfed.partitions.store import PartitionStore

    store = PartitionStore.open(tiny_store)
    seen = store.client_ids("seen")
    cfg = config_from_dict(registry.get("pfedacnnl").Config,
                           {"layers": ["conv5x4", "fc32", "fc"], "pool": 4, "patches_per_image": 24, "groups": 2,
                            "cluster_iters": 2})
    exp = Experiment("pfedacnnl", cfg, DataConfig(path=tiny_store),
                     RunConfig(rounds=1, clients_per_round=len(seen), eval_every=1, checkpoint_every=1, seed=0),
                     EngineConfig(backend="serial"))
    out = run_experiment(exp, tmp_path / "run")
    by = {r["cohort"]: r for r in out["summary"]}
    assert set(by) == {"seen", "unseen"} and out["dropped"] == 0
    assert by["seen"]["acc_weighted"] > 3.0 / store.num_classes
