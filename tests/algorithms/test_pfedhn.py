"""pFedHN: streamed VJPs give exactly the hypernetwork and embedding gradients; unseen fitting."""

from __future__ import annotations

import copy

import pytest
import torch

from simfed.algorithms.kit import hypernet as hn
from simfed.algorithms.base import RoundInfo, Task
from simfed.algorithms.kit.models import lenet_for
from simfed.algorithms.pfedhn import PFedHN, PFedHNConfig
from simfed.core.errors import SimfedError

from clients import context_maker, make_clients

TASK = Task(input_shape=(1, 16, 16), num_classes=4)
SEED = 3


def maker(clients, round_=0, mode="train", cohort="seen"):
    return context_maker(clients, TASK, SEED, round_, mode, cohort)


CFG = PFedHNConfig(embed_dim=5, hidden=16, n_hidden=2, local_steps=3, batch_size=8, lr=0.05,
                   server_clip=0.0, unseen_exchanges=3, unseen_lr=0.5)


def train_round(algo, state, clients, ids, drop=()):
    info = RoundInfo(round=0, seed=SEED)
    make = maker(clients)
    per = algo.payloads("train", CFG, state, ids, info)
    deltas = {}
    for cid in ids:
        data, ctx = make(cid, "train")
        r = algo.client("train", CFG, None, per[cid], data, None, ctx)
        if cid in drop:  # the engine drops a non-finite reply: it never reaches absorb
            continue
        deltas[cid] = r.item
        algo.absorb("train", CFG, state, cid, r.item, info)
    return info, deltas


def check_grads(state, state0, deltas):
    hnet = copy.deepcopy(state0.hnet)
    emb = {c: state0.emb[c].clone().requires_grad_(True) for c in deltas}
    loss = sum((hnet(emb[c][None])[0] * d).sum() for c, d in deltas.items())
    loss.backward()
    for p, q in zip(state.hnet.parameters(), hnet.parameters()):
        torch.testing.assert_close(p.grad, q.grad, atol=1e-5, rtol=1e-5)
    assert sorted(state._egrad) == sorted(deltas)
    for c in deltas:
        torch.testing.assert_close(state._egrad[c], emb[c].grad, atol=1e-5, rtol=1e-5)
    return hnet, emb


def test_streamed_vjp_equals_autograd_and_finish_takes_the_sgd_step():
    algo = PFedHN()
    clients = make_clients([30, 20, 25, 12])
    state = algo.init(CFG, TASK, SEED)
    ids = [0, 1, 2, 3]
    for c in ids:  # create the rows the way payloads does, then snapshot
        hn.embedding_row(state.emb, c, state.dim, SEED, "pfedhn-embed")
    state0 = copy.deepcopy(state)
    info, deltas = train_round(algo, state, clients, ids)
    hnet, emb = check_grads(state, state0, deltas)
    ref = copy.deepcopy(state0.hnet)
    for p, q in zip(ref.parameters(), hnet.parameters()):
        p.grad = q.grad / 4
    torch.optim.SGD(ref.parameters(), lr=CFG.server_lr, momentum=0.9, weight_decay=CFG.server_weight_decay).step()
    out = algo.finish("train", CFG, state, {}, 4, info)
    assert out["clients"] == 4.0
    for p, q in zip(state.hnet.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, atol=1e-6, rtol=1e-6)
    for c in ids:  # embedding rows: their own gradient, SGD with weight decay
        want = state0.emb[c] - CFG.embed_lr * (emb[c].grad + CFG.embed_weight_decay * state0.emb[c])
        torch.testing.assert_close(state.emb[c], want, atol=1e-6, rtol=1e-6)


def test_missing_client_and_empty_round():
    algo = PFedHN()
    clients = make_clients([30, 20, 25])
    state = algo.init(CFG, TASK, SEED)
    for c in range(3):
        hn.embedding_row(state.emb, c, state.dim, SEED, "pfedhn-embed")
    state0 = copy.deepcopy(state)
    info, deltas = train_round(algo, state, clients, [0, 1, 2], drop={1})
    check_grads(state, state0, deltas)
    assert algo.finish("train", CFG, state, {}, 2, info)["clients"] == 2.0
    assert torch.equal(state.emb[1], state0.emb[1])  # the dropped client's row does not move
    before = [p.detach().clone() for p in state.hnet.parameters()]
    assert algo.finish("train", CFG, state, {}, 0, info)["clients"] == 0.0
    assert all(torch.equal(a, b) for a, b in zip(before, state.hnet.parameters()))


def test_unseen_clients_fit_a_new_embedding_with_h_frozen():
    algo = PFedHN()
    clients = make_clients([30, 20])
    state = algo.init(CFG, TASK, SEED)
    h0 = [p.detach().clone() for p in state.hnet.parameters()]
    info = RoundInfo(round=5, seed=SEED, mode="eval", cohort="unseen")
    make = maker(clients, 5, mode="eval", cohort="unseen")
    phases = algo.eval_phases(CFG, state, "unseen")
    assert phases == ("fit0", "fit1", "fit2", "evaluate")
    start = {c: hn.embedding_row({}, c, state.dim, SEED, "pfedhn-unseen") for c in (0, 1)}
    for ph in phases[:-1]:
        hn.serial_phase(algo, ph, CFG, state, [0, 1], info, make)
    moved = {c: float((state._unseen[c] - start[c]).norm()) for c in (0, 1)}
    assert all(m > 0 for m in moved.values())
    _, evals = hn.serial_phase(algo, "evaluate", CFG, state, [0, 1], info, make)
    assert sorted(evals) == [0, 1] and evals[0]["test"].n == 6
    assert state._unseen == {} and state.emb == {}
    assert all(torch.equal(a, b) for a, b in zip(h0, state.hnet.parameters()))
    assert all(p.grad is None for p in state.hnet.parameters())


def test_batched_payloads_equal_single_forward():
    algo = PFedHN()
    state = algo.init(CFG, TASK, SEED)
    info = RoundInfo(round=0, seed=SEED)
    per = algo.payloads("train", CFG, state, [4, 9, 2], info)
    with torch.no_grad():
        one = state.hnet(state.emb[9][None])[0]
    torch.testing.assert_close(per[9], one, atol=1e-6, rtol=1e-6)
    assert per[4].shape == (sum(p.numel() for p in lenet_for((1, 16, 16), 4).parameters()),)
    # each payload owns its storage: a row view would pickle the whole chunk's thetas per client
    for t in per.values():
        assert t.untyped_storage().nbytes() == t.numel() * t.element_size()


def test_bad_input():
    with pytest.raises(SimfedError, match="target_shapes"):
        PFedHN().validate(PFedHNConfig(target_shapes=[[16, 1, 5, 5], [16], [32, 16, 5, 5]]), TASK)
    with pytest.raises(ValueError):
        PFedHNConfig(unseen_lr=0)


def test_embedding_rows_take_sgd_momentum_like_the_hypernetwork():
    # the authors' SGD(momentum 0.9, wd) over h AND the embeddings; rows of absent clients stay
    from simfed.algorithms.pfedhn import momentum_rows_
    e0, g1, g2 = torch.randn(5), torch.randn(5), torch.randn(5)
    ref = e0.clone().requires_grad_(True)
    opt = torch.optim.SGD([ref], lr=0.1, momentum=0.9, weight_decay=0.01)
    table, mom = {3: e0.clone(), 4: e0.clone()}, {}
    for g in (g1, g2):
        ref.grad = g.clone()
        opt.step()
        momentum_rows_(table, mom, {3: g}, 0.1, 0.9, 0.01)
    torch.testing.assert_close(table[3], ref.detach(), atol=1e-7, rtol=1e-6)
    assert torch.equal(table[4], e0) and sorted(mom) == [3]


def test_one_clip_over_hypernetwork_and_embedding_gradients():
    algo, cfg = PFedHN(), PFedHNConfig(**{**CFG.__dict__, "server_clip": 0.01})
    clients = make_clients([30, 20])
    state = algo.init(cfg, TASK, SEED)
    info, deltas = train_round(algo, state, clients, [0, 1])
    grads = [p.grad / 2 for p in state.hnet.parameters()] + [state._egrad[c] for c in (0, 1)]
    total = float(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads])))
    e0 = {c: state.emb[c].clone() for c in (0, 1)}
    egrad = {c: state._egrad[c].clone() for c in (0, 1)}
    out = algo.finish("train", cfg, state, {}, 2, info)
    assert out["grad_norm"] == pytest.approx(total, rel=1e-5) and total > 0.01
    scale = 0.01 / (total + 1e-6)
    for c in (0, 1):  # first step of momentum SGD: lr * (clipped g + wd * e)
        want = e0[c] - cfg.embed_lr * (egrad[c] * scale + cfg.embed_weight_decay * e0[c])
        torch.testing.assert_close(state.emb[c], want, atol=1e-7, rtol=1e-6)
    assert 0 < out["model_spread"] <= 1 and 0 < out["embedding_spread"] <= 1
