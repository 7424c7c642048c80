"""kNN-Per: the kNN part against brute force, lambda = 0 is the global model, per-client predictions."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from simfed.algorithms.kit import training
from simfed.core.config import config_from_dict
from simfed.algorithms.knnper import KNNPer, KNNPerConfig, features_and_probs, knn_probs, personalized_probs
from simfed.algorithms.kit.models import load_flat
from simfed.core.errors import SimfedError

from baselines import SEED, TASK, client
from clients import make_clients


def test_knn_probs_equal_brute_force():
    rng = np.random.default_rng(0)
    keys, q = rng.normal(size=(30, 7)), rng.normal(size=(9, 7))
    labels = rng.integers(0, 4, size=30)
    for k, scale in ((1, 1.0), (5, 0.1), (10, 100.0), (30, 1.0)):
        ours = knn_probs(torch.tensor(q), torch.tensor(keys), torch.tensor(labels), k, scale, 4).numpy()
        ref = np.zeros((9, 4))
        for i in range(9):
            d = [float(np.sum((q[i] - keys[j]) ** 2)) for j in range(30)]
            near = sorted(range(30), key=lambda j: d[j])[:k]
            w = {j: math.exp(-d[j] / (7 * scale)) for j in near}
            for j in near:
                ref[i, labels[j]] += w[j] / sum(w.values())
        np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-12)
    # far-away queries: every exp underflows in the authors' ratio, the softmax form stays a distribution
    far = knn_probs(torch.tensor(q) + 1e4, torch.tensor(keys), torch.tensor(labels), 5, 0.1, 4)
    assert torch.isfinite(far).all() and torch.allclose(far.sum(1), torch.ones(9, dtype=torch.float64))


def _global_model(algo, cfg, cache):
    from simfed.algorithms.kit.globalmodel import client_model

    state = algo.init(cfg, TASK, SEED)
    data, ctx = client(make_clients([1]), 0, cache=cache)
    model = client_model(ctx)
    load_flat(model, state.theta)
    return state, model


def test_lambda_zero_is_the_global_model():
    clients = make_clients([30, 30], seed=6)
    algo, cfg = KNNPer(), KNNPerConfig(ks=(3,), lambdas=(0.0,))
    cache = {}
    state, model = _global_model(algo, cfg, cache)
    for cid in clients:
        data, ctx = client(clients, cid, mode="eval", cache=cache, phase="evaluate")
        ours = algo.client("evaluate", cfg, state.theta, None, data, None, ctx).evals
        ref = training.evaluate_splits(model, data)
        for split in ("val", "test"):
            assert ours[split].n == ref[split].n and ours[split].correct == ref[split].correct
            assert ours[split].loss_sum == pytest.approx(ref[split].loss_sum, rel=1e-5)
        _, _, probs = personalized_probs(cfg, model, data, [3], TASK.num_classes)
        assert torch.equal(probs["test"], features_and_probs(model, data.split("test")[0])[1].double())


def test_same_model_different_clients_get_different_predictions():
    """Two clients with the same inputs but disjoint label sets: the kNN part follows each one's labels."""
    base = make_clients([40], seed=7)[0]
    x, y = base["train"]
    clients = {c: {s: (x[:n], (y[:n] % 2) + 2 * c) for s, n in (("train", 40), ("val", 12), ("test", 12))}
               for c in (0, 1)}
    algo, cfg = KNNPer(), KNNPerConfig(ks=(1, 5))
    cache = {}
    state, model = _global_model(algo, cfg, cache)
    preds = {}
    for cid in (0, 1):
        data, ctx = client(clients, cid, mode="eval", cache=cache, phase="evaluate")
        k, lam, probs = personalized_probs(cfg, model, data, [1, 5], TASK.num_classes)
        preds[cid] = probs["test"].argmax(1)
        assert lam > 0 and set(preds[cid].tolist()) <= {2 * cid, 2 * cid + 1}
        # the test points are train points: the 1-NN is the point itself
        assert algo.client("evaluate", cfg, state.theta, None, data, None, ctx).evals["test"].correct == 12
    assert not torch.equal(preds[0], preds[1])


def test_k_larger_than_the_train_split():
    clients = make_clients([8], seed=8)
    algo = KNNPer()
    data, ctx = client(clients, 0, mode="eval", cohort="unseen", phase="evaluate")
    theta = algo.init(KNNPerConfig(), TASK, SEED).theta
    with pytest.raises(SimfedError, match="k = 10 .* exceeds the 8 train samples of client 0"):
        algo.client("evaluate", KNNPerConfig(), theta, None, data, None, ctx)
    data, ctx = client(clients, 0, mode="train", phase="update")
    with pytest.raises(SimfedError, match="exceeds the 8 train samples"):
        algo.client("update", KNNPerConfig(), theta, None, data, None, ctx)
    # the documented fallback: k = n_train, i.e. every train sample is a neighbour
    loose = KNNPerConfig(strict_k=False, ks=(5, 10))
    assert algo._check_k(loose, data, 8) == [5, 8]
    data, ctx = client(clients, 0, mode="eval", cohort="unseen", phase="evaluate")
    assert algo.client("evaluate", loose, theta, None, data, None, ctx).evals["test"].n == 6


def test_bad_lambdas_and_ks():
    with pytest.raises(SimfedError, match="lambdas and fallback_lambda must be numbers in"):
        config_from_dict(KNNPerConfig, {"lambdas": [-0.1, 0.5]})
    with pytest.raises(SimfedError, match="ks must be"):
        config_from_dict(KNNPerConfig, {"ks": [0]})
    assert config_from_dict(KNNPerConfig, {"lambdas": [0, 1]}).lambdas == (0, 1)
