"""Ditto: the proximal gradient is the gradient of the composed objective; personal models differ."""

from __future__ import annotations

import pytest
import torch

from simfed.algorithms.kit import functional as fn
from simfed.algorithms.base import RoundInfo
from simfed.core.config import config_from_dict
from simfed.algorithms.ditto import Ditto, DittoConfig
from simfed.algorithms.kit.proximal import proximal_grads
from simfed.algorithms.kit.models import flat_params, load_flat
from simfed.core.errors import SimfedError

from baselines import SEED, TASK, client, tiny_lenet
from clients import make_clients


def test_proximal_gradient_equals_autograd_of_composed_objective():
    model = tiny_lenet(1)
    g = torch.Generator().manual_seed(0)
    x, y = torch.rand(6, 1, 16, 16, generator=g, dtype=torch.float64), torch.randint(0, 4, (6,), generator=g)
    v = flat_params(model)
    w = v + 0.1 * torch.randn(v.shape, generator=g, dtype=torch.float64)
    lam = 2.5
    proximal_grads(model, w, lam, x, y)
    ours = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
    f = fn.loss_fn(model)
    ref = fn.grad(lambda th, b: f(th, b) + 0.5 * lam * (th - w).square().sum(), v, (x, y))
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-12)
    assert (ours - fn.grad(f, v, (x, y))).abs().max() > 1e-3  # the proximal term is really there


def test_round_trains_global_and_personal_models_and_personalizes():
    clients = make_clients([40, 40], seed=1, two_classes=True)
    algo, cfg = Ditto(), DittoConfig(lr=0.1, personal_lr=0.1, local_steps=4, personal_steps=30, batch_size=8,
                                     lam=0.1, momentum=0.0)
    state = algo.init(cfg, TASK, SEED)
    w = state.theta.clone()
    cache, replies = {}, {}
    for cid in (0, 1):
        data, ctx = client(clients, cid, cache=cache)
        replies[cid] = algo.client("update", cfg, w, None, data, None, ctx)
    v0, v1 = replies[0].state, replies[1].state
    assert not torch.equal(v0, v1) and not torch.equal(v0, w)
    sums = {k: replies[0].sums[k] + replies[1].sums[k] for k in ("delta", "n")}
    algo.finish("update", cfg, state, sums, 2, RoundInfo(round=0, seed=SEED))
    assert not torch.equal(state.theta, w)
    # each personal model predicts its own client's classes, so it is the better model there
    acc = {}
    for i, v in ((0, v0), (1, v1)):
        for cid in (0, 1):
            data, ctx = client(clients, cid, mode="eval", cache=cache, phase="evaluate")
            acc[i, cid] = algo.client("evaluate", cfg, w, None, data, v, ctx).evals["test"].correct
    assert acc[0, 0] > acc[1, 0] and acc[1, 1] > acc[0, 1]


def test_unseen_client_trains_v_from_w():
    clients = make_clients([24], seed=2, two_classes=True)
    algo = Ditto()
    cfg = DittoConfig(unseen_epochs=2, batch_size=8)
    state = algo.init(cfg, TASK, SEED)
    data, ctx = client(clients, 0, mode="eval", cohort="unseen", phase="evaluate")
    base = DittoConfig(unseen_epochs=0, batch_size=8)
    a = algo.client("evaluate", cfg, state.theta, None, data, None, ctx).evals["test"]
    b = algo.client("evaluate", base, state.theta, None, data, None, ctx).evals["test"]
    assert a.loss_sum != b.loss_sum


def test_negative_lambda_is_a_config_error():
    with pytest.raises(SimfedError, match="lam must be >= 0"):
        config_from_dict(DittoConfig, {"lam": -0.1})
