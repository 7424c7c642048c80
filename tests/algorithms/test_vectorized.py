"""The vectorized chunk trainer, and every method's `chunk_replies`, equal the per-client loop (float64,
1e-10), unequal sizes included."""

from __future__ import annotations

import copy

import pytest
import torch

from simfed.algorithms import registry
from simfed.algorithms.kit import training
from simfed.algorithms.base import ClientContext, Task
from simfed.algorithms.kit.models import cache_key, flat_params, init_model, lenet_for, load_flat
from simfed.algorithms.kit.vectorized import sgd_train_chunk

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


# --- the methods' chunk_replies against their per-client `client`, float64 ---------------------------

CHUNK_SIZES = [5, 21, 40, 64]  # a client smaller than one batch, partial batches, unequal sizes
TASK = Task((1, 16, 16), 4)


class Data64:
    """A client's train split in float64 (ClientData hands out float32), duck-typed for the methods."""

    def __init__(self, client_id: int, x: torch.Tensor, y: torch.Tensor):
        self.client_id, self.cohort, self.x, self.y = client_id, "seen", x, y

    def split(self, name):
        return (self.x, self.y) if name == "train" else (self.x[:0], self.y[:0])

    def n(self, name):
        return int(self.y.shape[0]) if name == "train" else 0


def _method_clients(phase, seed=0, sizes=CHUNK_SIZES):
    """(datas, ctxs) of float64 clients; the contexts share one cache holding a float64 LeNet."""
    g = torch.Generator().manual_seed(seed)
    cache = {cache_key(TASK): lenet_for(TASK.input_shape, TASK.num_classes).double()}
    datas, ctxs = [], []
    for cid, n in enumerate(sizes):
        datas.append(Data64(cid, torch.rand(n, 1, 16, 16, generator=g, dtype=torch.float64),
                            torch.randint(0, 4, (n,), generator=g)))
        ctxs.append(ClientContext(client_id=cid, cohort="seen", round=2, seed=seed, phase=phase, mode="train",
                                  task=TASK, cache=cache))
    return datas, ctxs


def _thetas(n_clients, seed=0):
    base = flat_params(init_model(lenet_for(TASK.input_shape, TASK.num_classes), seed).double())
    g = torch.Generator().manual_seed(seed + 1)
    return [base + 0.05 * torch.randn(base.shape, generator=g, dtype=torch.float64) for _ in range(n_clients)]


def _close(a, b, tol=1e-10):
    if a is None or b is None:
        return a is None and b is None
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_close(a[k], b[k], tol) for k in a)
    if isinstance(a, torch.Tensor):
        return a.shape == b.shape and a.dtype == b.dtype and (a - b).abs().max().item() <= tol
    return abs(a - b) <= tol * max(1.0, abs(a))


def _assert_chunk_equals_loop(algo, cfg, phase, bcast, payloads, datas, ctxs):
    vec = algo.chunk_replies(phase, cfg, bcast, payloads, datas, [None] * len(datas), ctxs)
    assert len(vec) == len(datas)
    for p, d, c, r in zip(payloads, datas, ctxs, vec):
        ref = algo.client(phase, cfg, bcast, p, d, None, c)
        assert r.n_train == ref.n_train
        assert _close(r.item, ref.item) and _close(r.sums, ref.sums)
        assert _close(r.train_loss, ref.train_loss)
    return vec


@pytest.mark.parametrize("method", ["pfedhn", "pefll"])
def test_hypernet_chunk_replies_equals_client_float64(method):
    """Each client from ITS OWN generated theta (the stacked rows differ); unequal sizes, a chunk
    of 1, and a client without a payload (its earlier reply was dropped) in the middle."""
    algo = registry.get(method)
    phase = {"pfedhn": "train", "pefll": "model"}[method]
    assert phase in algo.capabilities.chunk_replies
    # clip = 0.3 bites (LeNet's gradient norm is about 1 here): per-client clipping is exercised
    cfg = algo.Config(local_steps=4, batch_size=16, lr=0.05, momentum=0.9, weight_decay=1e-3, clip=0.3)
    datas, ctxs = _method_clients(phase)
    payloads = _thetas(len(datas))
    vec = _assert_chunk_equals_loop(algo, cfg, phase, None, payloads, datas, ctxs)
    assert all(r.item.abs().max() > 0 for r in vec)  # it trained
    _assert_chunk_equals_loop(algo, cfg, phase, None, payloads[2:3], datas[2:3], ctxs[2:3])
    holes = [payloads[0], None, payloads[2]]
    out = _assert_chunk_equals_loop(algo, cfg, phase, None, holes, datas[:3], ctxs[:3])
    assert out[1].item is None and out[1].n_train == 0


META = [("metafl", dict(nu=2, gradient="exact", hessian_batch="inner")),
        ("metafl", dict(nu=2, gradient="exact", hessian_batch="fresh")),
        ("metafl", dict(nu=2, gradient="first_order")),
        ("metafl", dict(nu=2, gradient="hessian_free", hessian_batch="inner")),
        ("perfedavg", dict()),  # Hessian-free on fresh batches, nu = 1
        ("perfedavg", dict(gradient="exact"))]


@pytest.mark.parametrize("method,kw", META, ids=[f"{m}-{'-'.join(map(str, k.values()))}" for m, k in META])
def test_meta_chunk_replies_equals_client_float64(method, kw):
    """Every meta-gradient variant; a 5-sample client is smaller than one batch (batches cut to
    its size, samples reused within a meta-step); a chunk of 1."""
    algo = registry.get(method)
    assert "update" in algo.capabilities.chunk_replies
    cfg = algo.Config(tau=3, batch_size=8, outer_batch_size=12, alpha=0.1, beta=0.1, **kw)
    datas, ctxs = _method_clients("update", seed=1)
    w0 = _thetas(1, seed=1)[0]
    none = [None] * len(datas)
    vec = _assert_chunk_equals_loop(algo, cfg, "update", w0, none, datas, ctxs)
    assert all(r.sums["delta"].abs().max() > 0 for r in vec)  # it trained
    _assert_chunk_equals_loop(algo, cfg, "update", w0, none[:1], datas[:1], ctxs[:1])


def test_meta_chunk_replies_freezes_a_diverged_client_as_the_loop_stops_it():
    """A client whose meta-gradient is not finite stops after that step (seen, loss), as in the loop;
    the other clients of its chunk are untouched by its NaNs."""
    algo = registry.get("metafl")
    cfg = algo.Config(nu=2, tau=3, batch_size=8, outer_batch_size=8, gradient="exact")
    datas, ctxs = _method_clients("update", seed=2)
    datas[1].x = datas[1].x.clone()
    datas[1].x[:] = float("nan")  # every batch of client 1 gives a NaN gradient
    w0 = _thetas(1, seed=2)[0]
    vec = algo.chunk_replies("update", cfg, w0, [None] * 4, datas, [None] * 4, ctxs)
    for j, (d, c, r) in enumerate(zip(datas, ctxs, vec)):
        ref = algo.client("update", cfg, w0, None, d, None, c)
        assert r.n_train == ref.n_train
        if j == 1:
            assert r.n_train == cfg.samples_per_meta_step() and not torch.isfinite(r.sums["delta"]).any()
        else:
            assert _close(r.sums, ref.sums) and _close(r.train_loss, ref.train_loss)
