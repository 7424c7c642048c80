"""pFedMe: one local iteration is K steps on the composed Moreau objective then the w_i step; beta."""

from __future__ import annotations

import pytest
import torch

from simfed.algorithms import functional as fn
from simfed.algorithms.base import RoundInfo, config_from_dict
from simfed.algorithms.fedavg import GlobalModelState
from simfed.algorithms.models import flat_params
from simfed.algorithms.pfedme import PFedMe, PFedMeConfig, pfedme_local
from simfed.engine.errors import SimfedError

from baselines import SEED, TASK, client, tiny_lenet
from clients import make_clients


def test_local_iteration_equals_autograd_on_the_moreau_objective():
    model = tiny_lenet(2)
    g = torch.Generator().manual_seed(1)
    x, y = torch.rand(6, 1, 16, 16, generator=g, dtype=torch.float64), torch.randint(0, 4, (6,), generator=g)
    w = flat_params(model)
    lam, K, lr, plr = 15.0, 3, 0.005, 0.01
    # one iteration whose batch is the whole (permuted) client: the mean loss is the same function
    wi, seen = pfedme_local(model, w, lam, K, lr, plr, x, y, steps=1, batch_size=6, gen=torch.Generator())
    f = fn.loss_fn(model)
    h = lambda th, b: f(th, b) + 0.5 * lam * (th - w).square().sum()
    theta = w.clone()
    for _ in range(K):
        theta = theta - plr * fn.grad(h, theta, (x, y))
    torch.testing.assert_close(flat_params(model), theta, rtol=0, atol=1e-12)
    torch.testing.assert_close(wi, w - lr * lam * (w - theta), rtol=0, atol=1e-12)
    assert seen == 6 * K and (theta - w).abs().max() > 1e-4


def test_server_step_mixes_with_beta():
    algo, cfg = PFedMe(), PFedMeConfig(beta=0.5)
    w = torch.tensor([1.0, 2.0])
    wis, ns = [torch.tensor([3.0, 2.0]), torch.tensor([1.0, 6.0])], [1.0, 3.0]
    sums = {"delta": sum((w - wi) * n for wi, n in zip(wis, ns)), "n": torch.tensor(sum(ns), dtype=torch.float64)}
    state = GlobalModelState(w.clone())
    algo.finish("update", cfg, state, sums, 2, RoundInfo(round=0, seed=SEED))
    mean = (wis[0] * ns[0] + wis[1] * ns[1]) / sum(ns)
    torch.testing.assert_close(state.theta, 0.5 * w + 0.5 * mean)


def test_personal_models_differ_and_fit_their_client():
    clients = make_clients([40, 40], seed=3, two_classes=True)
    algo, cfg = PFedMe(), PFedMeConfig(lam=1.0, lr=0.05, personal_lr=0.1, local_steps=15, batch_size=8)
    state = algo.init(cfg, TASK, SEED)
    cache, theta = {}, {}
    for cid in (0, 1):
        data, ctx = client(clients, cid, cache=cache)
        theta[cid] = algo.client("update", cfg, state.theta, None, data, None, ctx).state
    assert not torch.equal(theta[0], theta[1])
    acc = {}
    for i in (0, 1):
        for cid in (0, 1):
            data, ctx = client(clients, cid, mode="eval", cache=cache, phase="evaluate")
            acc[i, cid] = algo.client("evaluate", cfg, state.theta, None, data, theta[i], ctx).evals["test"].correct
    assert acc[0, 0] > acc[1, 0] and acc[1, 1] > acc[0, 1]


def test_negative_lambda_is_a_config_error():
    with pytest.raises(SimfedError, match="lam must be >= 0"):
        config_from_dict(PFedMeConfig, {"lam": -1})
