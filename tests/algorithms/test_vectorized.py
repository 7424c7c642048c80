"""The vectorized chunk trainer equals the per-client loop (float64, 1e-10), unequal sizes included."""

from __future__ import annotations

import copy

import pytest
import torch

from simfed.algorithms import training
from simfed.algorithms.models import flat_params, init_model, lenet_for, load_flat
from simfed.algorithms.vectorized import sgd_train_chunk

SIZES = [7, 33, 64, 90]  # partial batches, a client smaller than one batch, unequal step counts


def _clients(seed=0):
    g = torch.Generator().manual_seed(seed)
    xs = [torch.rand(n, 1, 28, 28, generator=g, dtype=torch.float64) for n in SIZES]
    ys = [torch.randint(0, 10, (n,), generator=g) for n in SIZES]
    return xs, ys


def _gens(tag):
    return [torch.Generator().manual_seed(1000 * tag + c) for c in range(len(SIZES))]


@pytest.mark.parametrize("mode", [dict(steps=6), dict(steps=3, epochs=1.0), dict(steps=3, epochs=2.5)])
@pytest.mark.parametrize("opt", [dict(momentum=0.9, weight_decay=5e-4, clip=0.0),
                                 dict(momentum=0.0, weight_decay=0.0, clip=0.5),
                                 dict(momentum=0.9, weight_decay=1e-3, clip=2.0)])
def test_chunk_equals_per_client_loop_float64(mode, opt):
    model = init_model(lenet_for((1, 28, 28), 10), 3).double()
    xs, ys = _clients()
    # Different starting points per client (Local, pFedHN and PeFLL start each client elsewhere).
    base = flat_params(model)
    thetas = torch.stack([base + 0.01 * c for c in range(len(SIZES))])
    vec, seen_v, loss_v = sgd_train_chunk(model, thetas, xs, ys, batch_size=16, lr=0.05, gens=_gens(1),
                                          **mode, **opt)
    for c in range(len(SIZES)):
        ref = copy.deepcopy(model)
        load_flat(ref, thetas[c])
        seen, loss = training.sgd_train(ref, xs[c], ys[c], batch_size=16, lr=0.05, gen=_gens(1)[c], **mode, **opt)
        assert seen == seen_v[c]
        assert abs(loss - loss_v[c]) < 1e-6 * max(1.0, abs(loss))  # the loop sums its reported loss in float32
        assert (flat_params(ref) - vec[c]).abs().max().item() < 1e-10
        assert not torch.equal(vec[c], thetas[c])  # it trained


def test_per_client_step_counts_freeze_finished_clients():
    model = init_model(lenet_for((1, 28, 28), 10), 4).double()
    xs, ys = _clients(1)
    thetas = flat_params(model).expand(len(SIZES), -1).clone()
    steps = [0, 1, 4, 9]
    vec, seen, _ = sgd_train_chunk(model, thetas, xs, ys, steps=steps, batch_size=16, lr=0.1, gens=_gens(2),
                                   momentum=0.9)
    assert torch.equal(vec[0], thetas[0]) and seen[0] == 0
    for c in range(1, len(SIZES)):
        ref = copy.deepcopy(model)
        load_flat(ref, thetas[c])
        training.sgd_train(ref, xs[c], ys[c], steps=steps[c], batch_size=16, lr=0.1, gen=_gens(2)[c], momentum=0.9)
        assert (flat_params(ref) - vec[c]).abs().max().item() < 1e-10


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (GPU machines only; CI has none)")
def test_chunk_on_cuda_equals_the_cpu_loop_float64():
    model = init_model(lenet_for((1, 28, 28), 10), 5).double()
    xs, ys = _clients(2)
    thetas = flat_params(model).expand(len(SIZES), -1).clone()
    dev = torch.device("cuda")
    vec, seen, _ = sgd_train_chunk(model.to(dev), thetas.to(dev), [x.to(dev) for x in xs], [y.to(dev) for y in ys],
                                   steps=5, batch_size=16, lr=0.05, gens=_gens(3), momentum=0.9, epochs=1.0)
    assert vec.device.type == "cuda"
    for c in range(len(SIZES)):
        ref = copy.deepcopy(model).cpu()
        load_flat(ref, thetas[c])
        training.sgd_train(ref, xs[c], ys[c], steps=5, batch_size=16, lr=0.05, gen=_gens(3)[c], momentum=0.9,
                           epochs=1.0)
        assert (flat_params(ref) - vec[c].cpu()).abs().max().item() < 1e-8
