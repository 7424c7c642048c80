"""FedRep: the head/body split, frozen training of each part, and the body average is FedAvg's."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from simfed.algorithms.kit import training
from simfed.algorithms.base import RoundInfo
from simfed.core.config import config_from_dict
from simfed.algorithms.fedavg import FedAvg, FedAvgConfig
from simfed.algorithms.kit.globalmodel import GlobalModelState
from simfed.algorithms.fedrep import FedRep, FedRepConfig, head_size
from simfed.algorithms.kit.models import flat_params, lenet_for, load_flat
from simfed.core.errors import SimfedError

from baselines import SEED, TASK, client
from clients import make_clients

CFG = dict(lr=0.05, momentum=0.9, batch_size=8)


def test_lenet_head_is_the_last_linear_layer_and_no_head_is_an_error():
    model = lenet_for(TASK.input_shape, TASK.num_classes)
    assert head_size(model, 1) == 84 * 4 + 4
    assert head_size(model, 3) == sum(p.numel() for p in model.classifier.parameters())
    for bad in (nn.Sequential(nn.Linear(5, 3), nn.ReLU(), nn.Conv2d(1, 1, 1)), nn.Sequential(nn.Linear(5, 3))):
        with pytest.raises(ValueError, match="no separable head"):
            head_size(bad, 1)
    with pytest.raises(SimfedError, match="no separable head of 4 linear"):
        FedRep().validate(FedRepConfig(head_layers=4), TASK)
    with pytest.raises(SimfedError, match="body_epochs"):
        config_from_dict(FedRepConfig, {"body_epochs": 0})


def test_body_average_equals_fedavg_on_the_body_with_heads_frozen():
    """head_epochs = 0: each client trains the body only; the server step must be FedAvg's."""
    clients = make_clients([20, 33, 12], seed=4)
    rep, cfg = FedRep(), FedRepConfig(head_epochs=0.0, body_epochs=2.0, **CFG)
    state = rep.init(cfg, TASK, SEED)
    body, head0 = state.theta.clone(), state.head0.clone()
    full = torch.cat([body, head0])
    cache, rep_sums, avg_sums = {}, {}, {}
    for cid in clients:
        data, ctx = client(clients, cid, cache=cache)
        r = rep.client("update", cfg, (body, head0), None, data, None, ctx)
        assert torch.equal(r.state, head0)  # the head did not move
        # FedAvg's client on the full model, the head frozen by hand, same batches
        model = lenet_for(TASK.input_shape, TASK.num_classes)
        load_flat(model, full)
        for p in list(model.parameters())[-2:]:
            p.requires_grad_(False)
        x, y = data.split("train")
        training.sgd_train(model, x, y, steps=0, epochs=2.0, batch_size=8, lr=0.05,
                           momentum=0.9, gen=ctx.generator("body"))
        n = float(len(y))
        for sums, delta in ((rep_sums, r.sums["delta"]), (avg_sums, (full - flat_params(model)) * n)):
            sums["delta"] = sums.get("delta", 0) + delta
            sums["n"] = sums.get("n", 0) + torch.tensor(n, dtype=torch.float64)
    info = RoundInfo(round=0, seed=SEED)
    rep.finish("update", cfg, state, rep_sums, 3, info)
    avg = GlobalModelState(full.clone())
    FedAvg().finish("update", FedAvgConfig(), avg, avg_sums, 3, info)
    assert torch.equal(state.theta, avg.theta[:body.numel()])
    assert torch.equal(avg.theta[body.numel():], head0)
    assert not torch.equal(state.theta, body)


def test_heads_are_personal_and_new_clients_train_only_a_head():
    clients = make_clients([40, 40], seed=5, two_classes=True)
    rep, cfg = FedRep(), FedRepConfig(head_epochs=3.0, body_epochs=1.0, unseen_head_epochs=3.0, **CFG)
    state = rep.init(cfg, TASK, SEED)
    bcast = rep.broadcast("update", cfg, state, None)
    cache, heads = {}, {}
    for cid in (0, 1):
        data, ctx = client(clients, cid, cache=cache)
        heads[cid] = rep.client("update", cfg, bcast, None, data, None, ctx).state
    assert not torch.equal(heads[0], heads[1])
    acc = {}
    for i in (0, 1):
        for cid in (0, 1):
            data, ctx = client(clients, cid, mode="eval", cache=cache, phase="evaluate")
            acc[i, cid] = rep.client("evaluate", cfg, bcast, None, data, heads[i], ctx).evals["test"].correct
    assert acc[0, 0] > acc[1, 0] and acc[1, 1] > acc[0, 1]
    # a new client: random head, trained with the body frozen; the cached model's body is the global one
    data, ctx = client(clients, 1, mode="eval", cohort="unseen", cache=cache, phase="evaluate")
    rep.client("evaluate", cfg, bcast, None, data, None, ctx)
    model = next(iter(cache.values()))
    flat = flat_params(model)
    assert torch.equal(flat[:bcast[0].numel()], bcast[0]) and not torch.equal(flat[bcast[0].numel():], bcast[1])
    assert all(p.requires_grad for p in model.parameters())


def test_train_loss_is_the_sample_weighted_mean_over_head_and_body_passes():
    """2.5 head epochs and 1 body epoch: the head pass (50 samples) weighs 2.5 times the body pass (20)."""
    clients = make_clients([20], seed=6)
    rep, cfg = FedRep(), FedRepConfig(head_epochs=2.5, body_epochs=1.0, **CFG)
    state = rep.init(cfg, TASK, SEED)
    data, ctx = client(clients, 0, cache={})
    r = rep.client("update", cfg, (state.theta, state.head0), None, data, None, ctx)
    # the same two passes by hand: head (body frozen) then body (head frozen), the client's generators
    model = lenet_for(TASK.input_shape, TASK.num_classes)
    load_flat(model, torch.cat([state.theta, state.head0]))
    x, y = data.split("train")
    params = list(model.parameters())
    passes = []
    for part, epochs in (("head", 2.5), ("body", 1.0)):
        for i, p in enumerate(params):
            p.requires_grad_((i >= len(params) - 2) == (part == "head"))
        passes.append(training.sgd_train(model, x, y, steps=0, epochs=epochs, batch_size=8, lr=0.05, momentum=0.9,
                                         gen=ctx.generator(part)))
    (n_head, l_head), (n_body, l_body) = passes
    assert (n_head, n_body) == (50, 20) and r.n_train == 70
    assert r.train_loss == pytest.approx((n_head * l_head + n_body * l_body) / 70, rel=1e-6)
    assert r.train_loss != pytest.approx((l_head + l_body) / 2, rel=1e-4)  # weighted by samples, not by pass
