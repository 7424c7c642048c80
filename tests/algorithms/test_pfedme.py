"""pFedMe: one local iteration is K steps on the composed Moreau objective then the w_i step; beta."""

from __future__ import annotations

import pytest
import torch

from simfed.algorithms.kit import functional as fn
from simfed.algorithms.kit import training
from simfed.algorithms.base import RoundInfo
from simfed.core.config import config_from_dict
from simfed.algorithms.kit.globalmodel import GlobalModelState
from simfed.algorithms.kit.models import flat_params
from simfed.algorithms.pfedme import PFedMe, PFedMeConfig, pfedme_local
from simfed.core.errors import SimfedError

from baselines import SEED, TASK, client, tiny_lenet
from clients import make_clients


def test_local_iteration_equals_autograd_on_the_moreau_objective():
    model = tiny_lenet(2)
    g = torch.Generator().manual_seed(1)
    x, y = torch.rand(6, 1, 16, 16, generator=g, dtype=torch.float64), torch.randint(0, 4, (6,), generator=g)
    w = flat_params(model)
    lam, K, lr, plr = 15.0, 3, 0.005, 0.01
    # one iteration whose batch is the whole (permuted) client: the mean loss is the same function
    wi, seen, loss = pfedme_local(model, w, lam, K, lr, plr, x, y, steps=1, batch_size=6, gen=torch.Generator())
    f = fn.loss_fn(model)
    h = lambda th, b: f(th, b) + 0.5 * lam * (th - w).square().sum()
    theta, fs = w.clone(), []
    for _ in range(K):
        fs.append(float(f(theta, (x, y))))  # the reported loss is f_i before each inner step, Moreau term excluded
        theta = theta - plr * fn.grad(h, theta, (x, y))
    torch.testing.assert_close(flat_params(model), theta, rtol=0, atol=1e-12)
    torch.testing.assert_close(wi, w - lr * lam * (w - theta), rtol=0, atol=1e-12)
    assert seen == 6 * K and (theta - w).abs().max() > 1e-4
    # float32 accumulator (as sgd_train's), so equal to single precision
    assert loss == pytest.approx(sum(fs) / K, rel=1e-6) and fs[0] != pytest.approx(fs[-1], rel=1e-6)


def test_train_loss_is_the_sample_weighted_mean_over_minibatches_and_inner_steps():
    """Batches of unequal size (epochs pass of 10 samples in batches of 4: 4, 4, 2) weigh by samples."""
    model = tiny_lenet(3)
    g = torch.Generator().manual_seed(2)
    x, y = torch.rand(10, 1, 16, 16, generator=g, dtype=torch.float64), torch.randint(0, 4, (10,), generator=g)
    w = flat_params(model)
    lam, K = 2.0, 2
    _, seen, loss = pfedme_local(model, w, lam, K, 0.05, 0.05, x, y, steps=0, batch_size=4,
                                 gen=torch.Generator().manual_seed(7), epochs=1.0)
    # replay the same batches by hand, recording f_i at every inner step
    f = fn.loss_fn(model)
    wi, theta, evals = w.clone(), w.clone(), []
    for idx in training.batches(10, 4, 0, torch.Generator().manual_seed(7), 1.0):
        h = lambda th, b, wi=wi: f(th, b) + 0.5 * lam * (th - wi).square().sum()
        for _ in range(K):
            evals.append((float(f(theta, (x[idx], y[idx]))), idx.numel()))
            theta = theta - 0.05 * fn.grad(h, theta, (x[idx], y[idx]))
        wi = wi - 0.05 * lam * (wi - theta)
    assert seen == sum(n for _, n in evals) == 10 * K
    assert loss == pytest.approx(sum(v * n for v, n in evals) / seen, rel=1e-6)
    # not the plain mean over the evaluations: the last batch holds 2 samples, not 4
    assert loss != pytest.approx(sum(v for v, _ in evals) / len(evals), rel=1e-6)


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
