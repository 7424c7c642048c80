"""PeFLL: the three exchanges give exactly the gradients of the composed networks
h((mean phi - m) / s); normalization, decoupled decay, joint clip; clients get different models."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from simfed.algorithms.kit import hypernet as hn
from simfed.algorithms.base import ClientContext, ClientData, RoundInfo, Task
from simfed.core.config import config_from_dict
from simfed.algorithms.pefll import PeFLL, PeFLLConfig, descriptor, descriptor_batch
from simfed.core.errors import SimfedError

from clients import make_clients as _make_clients

TASK = Task(input_shape=(1, 16, 16), num_classes=4)
SEED = 7


def make_clients(sizes, seed=0):
    return _make_clients(sizes, seed, two_classes=True, val=5, test=8)


def maker(clients, round_, mode="train", cohort="seen"):
    cache: dict = {}

    def make(cid, phase):
        d = clients[cid]
        data = ClientData(cid, cohort, reader=lambda c, split: d[split],
                          counts={k: len(v[1]) for k, v in d.items()})
        ctx = ClientContext(client_id=cid, cohort=cohort, round=round_, seed=SEED, phase=phase, mode=mode,
                            task=TASK, cache=cache)
        return data, ctx
    return make


def small_cfg(**kw):
    base = dict(embed_dim=3, hidden=16, n_hidden=1, descriptor_batch=16, local_steps=3, batch_size=8,
                lr=0.05, server_lr=1e-3, server_clip=0.0, lambda_theta=0.01)
    base.update(kw)
    return PeFLLConfig(**base)


def run_exchanges(algo, cfg, state, clients, ids, round_=0, drop=()):
    """Describe and model phases through the protocol; returns recorded deltas and the embed sums."""
    info = RoundInfo(round=round_, seed=SEED)
    make = maker(clients, round_)
    deltas = {}
    orig_client = algo.client

    def client(phase, *a, **k):
        r = orig_client(phase, *a, **k)
        cid = a[-1].client_id
        if phase == "model" and r.item is not None:
            if cid in drop:
                r.item = r.item * float("nan")
            else:
                deltas[cid] = r.item.clone()
        return r

    algo.client = client
    try:
        hn.serial_phase(algo, "describe", cfg, state, ids, info, make, chunk=2)
        v = {c: t.clone() for c, t in state._v.items()}
        hn.serial_phase(algo, "model", cfg, state, ids, info, make, chunk=3)
        # the embed phase by hand, to look at the eta_h gradient and the summed eta_v gradient before finish
        bcast = algo.broadcast("embed", cfg, state, info)
        per = algo.payloads("embed", cfg, state, ids, info)
        sums = {}
        for cid in ids:
            data, ctx = make(cid, "embed")
            r = orig_client("embed", cfg, bcast, per.get(cid), data, None, ctx)
            for k, t in (r.sums or {}).items():
                sums[k] = t if k not in sums else sums[k] + t
    finally:
        algo.client = orig_client
    return info, v, deltas, sums


def reference(cfg, state0, clients, deltas, round_=0, first=None):
    """Autograd through h((mean phi(B_i) - m) / s) with delta_i held fixed, in one process;
    m and s: mean and std of the descriptor of client `first` (constants, as in the authors' code)."""
    hnet, embed = copy.deepcopy(state0.hnet), copy.deepcopy(state0.embed)
    make = maker(clients, round_)

    def raw(cid):
        data, ctx = make(cid, "describe")
        x, y = data.split("train")
        idx = descriptor_batch(cfg, data, ctx)
        return descriptor(embed, cfg, x[idx], y[idx], TASK.num_classes)

    m, s = torch.tensor(0.0), torch.tensor(1.0)
    if cfg.descriptor_norm == "first":
        with torch.no_grad():
            u = raw(min(deltas) if first is None else first)
            m, s = u.mean(), u.std()
    loss = 0.0
    for cid, d in deltas.items():
        theta = hnet(((raw(cid) - m) / s)[None])[0]
        loss = loss + (theta * d).sum() + cfg.lambda_theta * (theta ** 2).sum()
    loss.backward()
    return hnet, embed


@pytest.mark.parametrize("norm", ["first", "none"])
def test_three_exchanges_match_autograd_through_composed_networks(norm):
    algo, cfg = PeFLL(), small_cfg(descriptor_norm=norm, lambda_h=0.1, lambda_v=0.2)
    clients = make_clients([40, 25, 10, 33])  # client 2 has fewer samples than the descriptor batch
    state = algo.init(cfg, TASK, SEED)
    state0 = copy.deepcopy(state)
    ids = [0, 1, 2, 3]
    info, v, deltas, sums = run_exchanges(algo, cfg, state, clients, ids)
    assert sorted(deltas) == ids and state._n_h == 4
    hnet, embed = reference(cfg, state0, clients, deltas)
    for p, q in zip(state.hnet.parameters(), hnet.parameters()):
        torch.testing.assert_close(p.grad, q.grad, atol=1e-5, rtol=1e-5)
    ref_v = torch.cat([q.grad.reshape(-1) for q in embed.parameters()])
    assert float(ref_v.norm()) > 0
    torch.testing.assert_close(sums["grad_v"], ref_v, atol=1e-5, rtol=1e-5)
    assert float(sums["n"]) == 4.0

    # finish: one Adam step on the mean gradient (no L2 inside Adam), then the decoupled decay
    # eta <- (1 - 2 lr lambda) eta of objective (1); no clipping here
    ref_params = [p.detach().clone().requires_grad_(True) for p in list(hnet.parameters()) + list(embed.parameters())]
    nh = len(list(hnet.parameters()))
    for p, q in zip(ref_params, list(hnet.parameters()) + list(embed.parameters())):
        p.grad = q.grad / 4
    ref_opt = torch.optim.Adam(ref_params, lr=cfg.server_lr)
    ref_opt.step()
    with torch.no_grad():
        for j, p in enumerate(ref_params):
            p.mul_(1 - 2 * cfg.server_lr * (cfg.lambda_h if j < nh else cfg.lambda_v))
    out = algo.finish("embed", cfg, state, sums, 4, info)
    assert out["clients_h"] == 4 and out["clients_v"] == 4
    new = list(state.hnet.parameters()) + list(state.embed.parameters())
    for p, q in zip(new, ref_params):
        torch.testing.assert_close(p.detach(), q.detach(), atol=1e-6, rtol=1e-6)
    assert state._v == {} and state._dv == {} and state._n_h == 0


def test_dropped_client_is_left_out_and_round_completes():
    algo, cfg = PeFLL(), small_cfg()
    clients = make_clients([40, 25, 30, 33])
    state = algo.init(cfg, TASK, SEED)
    state0 = copy.deepcopy(state)
    info, v, deltas, sums = run_exchanges(algo, cfg, state, clients, [0, 1, 2, 3], drop={1})
    assert sorted(deltas) == [0, 2, 3] and 1 not in state._dv
    hnet, embed = reference(cfg, state0, clients, deltas)
    for p, q in zip(state.hnet.parameters(), hnet.parameters()):
        torch.testing.assert_close(p.grad, q.grad, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(sums["grad_v"], torch.cat([q.grad.reshape(-1) for q in embed.parameters()]),
                               atol=1e-5, rtol=1e-5)
    out = algo.finish("embed", cfg, state, sums, 3, info)
    assert out["clients_h"] == 3
    # a round in which every client is dropped leaves the networks as they are
    before = [p.detach().clone() for p in state.hnet.parameters()]
    assert algo.finish("embed", cfg, state, {}, 0, info)["clients_h"] == 0
    assert all(torch.equal(a, b) for a, b in zip(before, state.hnet.parameters()))


def test_zero_shot_evaluation_for_seen_and_unseen_with_label_mask():
    algo, cfg = PeFLL(), small_cfg(label_mask=True)
    clients = make_clients([40, 25, 30, 33])
    state = algo.init(cfg, TASK, SEED)
    for cohort, ids in (("seen", [0, 1]), ("unseen", [2, 3])):
        info = RoundInfo(round=0, seed=SEED, mode="eval", cohort=cohort)
        make = maker(clients, 0, mode="eval", cohort=cohort)
        evals = {}
        for phase in algo.eval_phases(cfg, state, cohort):
            _, evals = hn.serial_phase(algo, phase, cfg, state, ids, info, make)
        assert sorted(evals) == ids
        for e in evals.values():
            assert e["test"].n == 8 and 0 <= e["test"].correct <= 8
            # masked to the client's two classes: the loss stays finite
            assert np.isfinite(e["test"].loss_sum)
    assert state._v_eval == {}


def test_model_payloads_own_their_storage():
    # a row view of the batched h output would pickle every client's theta into each payload
    algo, cfg = PeFLL(), small_cfg()
    state = algo.init(cfg, TASK, SEED)
    state._v = {c: torch.randn(3) for c in (0, 1, 2)}
    per = algo.payloads("model", cfg, state, [0, 1, 2], RoundInfo(round=0, seed=SEED))
    assert sorted(per) == [0, 1, 2]
    for t in per.values():
        assert t.untyped_storage().nbytes() == t.numel() * t.element_size()


def test_eval_descriptor_averages_the_whole_train_split():
    algo, cfg = PeFLL(), small_cfg()
    clients = make_clients([300])
    state = algo.init(cfg, TASK, SEED)
    info = RoundInfo(round=0, seed=SEED, mode="eval")
    hn.serial_phase(algo, "describe", cfg, state, [0], info, maker(clients, 0, mode="eval"))
    data, _ = maker(clients, 0)(0, "x")
    x, y = data.split("train")
    with torch.no_grad():
        ref = descriptor(state.embed.eval(), cfg, x, y, TASK.num_classes)
    torch.testing.assert_close(state._v_eval[0], ref, atol=1e-5, rtol=1e-5)


def test_label_free_descriptor_ignores_labels():
    cfg = small_cfg(label_free=True)
    state = PeFLL().init(cfg, TASK, SEED)
    assert state.embed.features[0].in_channels == 1
    x = torch.rand(5, 1, 16, 16)
    a = descriptor(state.embed, cfg, x, torch.zeros(5, dtype=torch.long), 4)
    b = descriptor(state.embed, cfg, x, torch.full((5,), 3), 4)
    torch.testing.assert_close(a, b)


def test_bad_input():
    with pytest.raises(SimfedError, match="target_shapes"):
        PeFLL().validate(PeFLLConfig(target_shapes=[[16, 1, 5, 5], [16]]), TASK)
    PeFLL().validate(PeFLLConfig(), TASK)
    with pytest.raises(SimfedError, match="eval_descriptor"):
        config_from_dict(PeFLLConfig, {"eval_descriptor": "all"})
    with pytest.raises(SimfedError, match="unknown key"):
        config_from_dict(PeFLLConfig, {"embedding_dim": 3})
    cfg = small_cfg(short_clients="error")
    clients = make_clients([10])
    data, ctx = maker(clients, 0)(0, "describe")
    with pytest.raises(SimfedError, match="fewer than descriptor_batch"):
        descriptor_batch(cfg, data, ctx)
    # default: a short client uses all of its samples, in a seeded order
    idx = descriptor_batch(small_cfg(), data, ctx)
    assert sorted(idx.tolist()) == list(range(10))


def test_normalization_is_fixed_once_from_the_lowest_client_and_checkpointed():
    algo, cfg = PeFLL(), small_cfg(server_clip=0.5, decay="none")
    clients = make_clients([40, 25, 30, 33])
    state = algo.init(cfg, TASK, SEED)
    info, v, deltas, sums = run_exchanges(algo, cfg, state, clients, [3, 1, 2])
    m, s = state.norm
    assert float(m) == float(v[1].mean()) and float(s) == float(v[1].std())  # lowest id of the cohort
    h0 = [p.detach().clone() for p in state.hnet.parameters()]
    out = algo.finish("embed", cfg, state, sums, 3, info)
    # one clip over eta_h and eta_v together
    assert out["grad_norm"] > 0.5 and out["grad_norm"] ** 2 == pytest.approx(
        out["eta_h_grad_norm"] ** 2 + out["eta_v_grad_norm"] ** 2, rel=1e-4)
    assert any(not torch.equal(a, b) for a, b in zip(h0, state.hnet.parameters()))
    run_exchanges(algo, cfg, state, clients, [0, 2], round_=1)  # a later round does not move (m, s)
    assert state.norm == (m, s)
    fresh = algo.init(cfg, TASK, SEED + 1)
    fresh.load_state_dict(copy.deepcopy(state.state_dict()))
    assert torch.equal(fresh.norm[0], m) and torch.equal(fresh.norm[1], s)
    # evaluation feeds h the normalized descriptor too
    ev_info = RoundInfo(round=2, seed=SEED, mode="eval")
    hn.serial_phase(algo, "describe", cfg, state, [0], ev_info, maker(clients, 2, mode="eval"))
    per = algo.payloads("evaluate", cfg, state, [0], ev_info)
    with torch.no_grad():
        torch.testing.assert_close(per[0], state.hnet(((state._v_eval[0] - m) / s)[None])[0])


def test_config_contract():
    assert PeFLLConfig().descriptor_norm == "first" and PeFLLConfig().decay == "decoupled"
    with pytest.raises(SimfedError, match="descriptor_norm"):
        config_from_dict(PeFLLConfig, {"descriptor_norm": "all"})
    with pytest.raises(SimfedError, match="decay"):
        config_from_dict(PeFLLConfig, {"decay": "coupled"})
    assert hn.default_embed_dim(Task((1, 16, 16), 4, num_clients=90, total_clients=100), 0) == 26
