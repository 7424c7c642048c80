"""FMLH: the server's least-squares fit of h(e_i) to d_i, the meta-update, the constraints."""

from __future__ import annotations

import copy

import pytest
import torch
from torch.nn import functional as F

from simfed.algorithms.kit import hypernet as hn
from simfed.algorithms.base import ClientContext, ClientData, RoundInfo, Task
from simfed.algorithms.fmlh import FMLH, FMLHConfig, support_query
from simfed.algorithms.kit.models import lenet_for, load_flat
from simfed.core.errors import SimfedError

from clients import make_clients

TASK = Task(input_shape=(1, 16, 16), num_classes=4)
SEED = 11


def maker(clients, mode="train", cohort="seen"):
    cache: dict = {}

    def make(cid, phase):
        d = clients[cid]
        data = ClientData(cid, cohort, reader=lambda c, s: d[s], counts={k: len(v[1]) for k, v in d.items()})
        return data, ClientContext(client_id=cid, cohort=cohort, round=0, seed=SEED, phase=phase, mode=mode,
                                   task=TASK, cache=cache)
    return make


def cfg(**kw):
    base = dict(embed_dim=4, hidden=16, n_hidden=1, meta_steps=2, inner_steps=2, batch_size=8, rho=100.0,
                server_clip=0.0, head_init_scale=1.0)
    base.update(kw)
    return FMLHConfig(**base)


def test_server_fits_h_to_the_fine_tuned_differences_exactly():
    algo, c = FMLH(), cfg()
    clients = make_clients([30, 25, 40])
    state = algo.init(c, TASK, SEED)
    ids = [0, 1, 2]
    info = RoundInfo(round=0, seed=SEED)
    per = algo.payloads("meta", c, state, ids, info)
    state0 = copy.deepcopy(state)
    make, items, u = maker(clients), {}, 0
    for cid in ids:
        data, ctx = make(cid, "meta")
        r = algo.client("meta", c, state.w, per[cid], data, None, ctx)
        items[cid] = r.item
        u = u + r.sums["u"]
        algo.absorb("meta", c, state, cid, r.item, info)
    # reference: least squares 1/2 sum ||h(e_i) - d_i||^2 (the ball is large, so no projection)
    hnet = copy.deepcopy(state0.hnet)
    emb = {i: state0.emb[i].clone().requires_grad_(True) for i in ids}
    sum(0.5 * ((hnet(emb[i][None])[0] - items[i]) ** 2).sum() for i in ids).backward()
    for p, q in zip(state.hnet.parameters(), hnet.parameters()):
        torch.testing.assert_close(p.grad, q.grad, atol=1e-5, rtol=1e-5)
    for i in ids:
        torch.testing.assert_close(state._egrad[i], emb[i].grad, atol=1e-5, rtol=1e-5)
    algo.finish("meta", c, state, {"u": u, "n": torch.tensor(3.0, dtype=torch.float64)}, 3, info)
    torch.testing.assert_close(state.w, state0.w - u / 3, atol=1e-6, rtol=1e-6)
    for i in ids:
        torch.testing.assert_close(state.emb[i], state0.emb[i] - c.embed_lr * emb[i].grad, atol=1e-6, rtol=1e-6)


def test_client_first_order_maml_step():
    algo, c = FMLH(), cfg(meta_steps=1, inner_steps=0, outer_lr=0.1)
    clients = make_clients([20])
    data, ctx = maker(clients)(0, "meta")
    w = torch.randn(sum(p.numel() for p in lenet_for((1, 16, 16), 4).parameters())) * 0.05
    w_i = w + 0.01
    r = algo.client("meta", c, w, w_i, data, None, ctx)
    # with no inner steps phi = w_i; the outer step is a query-batch gradient at w_i
    torch.testing.assert_close(r.item, w_i - w)
    x, y = data.split("train")
    sup, qry = support_query(20, c.support_fraction, ctx)
    assert len(sup) == 4 and len(qry) == 16 and not set(sup.tolist()) & set(qry.tolist())
    gen = ctx.generator("meta")
    qb = qry[torch.randperm(len(qry), generator=gen)[:c.batch_size]]
    m = lenet_for((1, 16, 16), 4)
    load_flat(m, w_i)
    F.cross_entropy(m(x[qb]), y[qb]).backward()
    g = torch.cat([p.grad.reshape(-1) for p in m.parameters()])
    torch.testing.assert_close(r.sums["u"], c.outer_lr * g, atol=1e-6, rtol=1e-5)


def test_offsets_respect_the_norm_ball_and_spectral_bound():
    algo, c = FMLH(), cfg(rho=0.01, spectral_norm=True, spectral_bound=0.5, unseen="global")
    state = algo.init(c, TASK, SEED)
    info = RoundInfo(round=0, seed=SEED)
    per = algo.payloads("meta", c, state, [0, 1, 2], info)
    for w_i in per.values():
        assert float((w_i - state.w).norm()) <= 0.01 * float(state.w.norm()) * (1 + 1e-5)
    for m in state.hnet.modules():
        if isinstance(m, torch.nn.Linear):
            assert float(torch.linalg.matrix_norm(m.weight.detach(), ord=2)) <= 0.5 + 1e-4
    # unseen = "global": unseen clients start from the meta-model itself; a missing client or empty
    # round is harmless
    ev = algo.payloads("evaluate", c, state, [7], RoundInfo(round=0, seed=SEED, mode="eval", cohort="unseen"))
    assert torch.equal(ev[7], state.w)
    w0 = state.w.clone()
    assert algo.finish("meta", c, state, {}, 0, info)["clients"] == 0.0
    assert torch.equal(state.w, w0)


def test_evaluation_fine_tunes_from_w_i():
    algo, c = FMLH(), cfg(finetune_steps=2)
    clients = make_clients([20, 20])
    state = algo.init(c, TASK, SEED)
    for cohort in ("seen", "unseen"):
        info = RoundInfo(round=0, seed=SEED, mode="eval", cohort=cohort)
        _, ev = hn.serial_phase(algo, "evaluate", c, state, [0, 1], info, maker(clients, "eval", cohort))
        assert sorted(ev) == [0, 1] and ev[1]["test"].n == 6
    assert state.emb == {}  # evaluation creates no training state


def test_bad_input():
    with pytest.raises(SimfedError, match="target_shapes"):
        FMLH().validate(FMLHConfig(target_shapes=[[3, 3]]), TASK)
    with pytest.raises(ValueError, match="support_fraction"):
        FMLHConfig(support_fraction=1.0)
    with pytest.raises(ValueError, match="unseen"):
        FMLHConfig(unseen="zero")


def test_unseen_client_fits_a_new_embedding_with_h_and_w_frozen():
    algo, c = FMLH(), cfg(unseen_exchanges=2, unseen_steps=5, finetune_steps=1)
    clients = make_clients([20, 24, 18])
    state = algo.init(c, TASK, SEED)
    for cid in (0, 1):  # two trained rows: the newcomer starts at their mean
        hn.embedding_row(state.emb, cid, state.dim, SEED, "fmlh-embed")
    w0, emb0 = state.w.clone(), {k: v.clone() for k, v in state.emb.items()}
    h0 = [p.detach().clone() for p in state.hnet.parameters()]
    phases = algo.eval_phases(c, state, "unseen")
    assert phases == ("fit0", "fit1", "evaluate") and algo.eval_phases(c, state, "seen") == ("evaluate",)
    info = RoundInfo(round=3, seed=SEED, mode="eval", cohort="unseen")
    make = maker(clients, "eval", "unseen")
    start = (emb0[0] + emb0[1]) / 2
    radius = c.rho * float(w0.norm())
    hn.serial_phase(algo, "fit0", c, state, [2], info, make)
    e1 = state._unseen[2].clone()
    assert not torch.equal(e1, start)
    # the fit lowers the least-squares objective for the difference the client sent
    data, ctx = make(2, "fit0")
    d = algo.client("fit0", c, w0, w0 + project_offset(state, start, radius), data, None, ctx).item

    def ls(e):
        with torch.no_grad():
            from simfed.algorithms.fmlh import project
            return float(((project(state.hnet(e[None]), radius)[0] - d) ** 2).sum())
    assert ls(e1) < ls(start)
    hn.serial_phase(algo, "fit1", c, state, [2], info, make)
    _, ev = hn.serial_phase(algo, "evaluate", c, state, [2], info, make)
    assert sorted(ev) == [2] and ev[2]["test"].n == 6
    assert state._unseen == {} and torch.equal(state.w, w0)
    assert state.emb.keys() == emb0.keys() and all(torch.equal(state.emb[k], emb0[k]) for k in emb0)
    assert all(torch.equal(a, b) for a, b in zip(h0, state.hnet.parameters()))
    assert all(p.grad is None for p in state.hnet.parameters())


def project_offset(state, e, radius):
    from simfed.algorithms.fmlh import project
    with torch.no_grad():
        return project(state.hnet(e[None]), radius)[0]
