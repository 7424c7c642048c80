"""Generalized nu-step meta-FL and Per-FedAvg: meta-gradient exactness, client/server steps, bad input."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from simfed.algorithms.kit import functional as fn
from simfed.algorithms import registry
from simfed.algorithms.kit import training
from simfed.algorithms.base import ClientContext, ClientData, RoundInfo, Task
from simfed.core.config import config_from_dict
from simfed.algorithms.kit.models import LeNet, cache_key, flat_params, init_model, load_flat
from simfed.core.errors import SimfedError

TASK = Task(input_shape=(1, 16, 16), num_classes=5)


def tiny_mlp(seed=0):
    # tanh keeps the loss smooth, so finite differences converge at their O(delta^2) rate.
    return init_model(nn.Sequential(nn.Flatten(), nn.Linear(12, 7), nn.Tanh(), nn.Linear(7, 4)), seed).double()


def tiny_lenet(seed=0):
    return init_model(LeNet(1, TASK.num_classes, 16, width=(2, 3), hidden=(8, 6)), seed).double()


def fixed_batches(nu, seed, shape=(12,), classes=4, bs=6):
    g = torch.Generator().manual_seed(seed)
    make = lambda: (torch.randn(bs, *shape, generator=g, dtype=torch.float64),
                    torch.randint(0, classes, (bs,), generator=g))
    return [make() for _ in range(nu)], make()


@pytest.mark.parametrize("nu", [1, 2, 5])
def test_exact_meta_gradient_equals_unrolled_autograd(nu):
    model = tiny_mlp()
    f = fn.loss_fn(model)
    inner, outer = fixed_batches(nu, seed=nu)
    w = flat_params(model)
    ours = fn.meta_gradient(f, w, 0.3, inner, outer, mode="exact")
    ref = fn.unrolled_meta_gradient(f, w, 0.3, inner, outer)
    assert ours.dtype == torch.float64
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-6)
    assert (ours - ref).abs().max() < 1e-12 * max(1.0, float(ref.abs().max()))
    # the second-order terms matter here, so the check above could fail
    assert (fn.meta_gradient(f, w, 0.3, inner, outer, mode="first_order") - ref).abs().max() > 1e-4


def test_exact_meta_gradient_lenet_nu2():
    model = tiny_lenet(1)
    f = fn.loss_fn(model)
    inner, outer = fixed_batches(2, seed=7, shape=(1, 16, 16), classes=5, bs=4)
    w = flat_params(model)
    torch.testing.assert_close(fn.meta_gradient(f, w, 0.2, inner, outer, mode="exact"),
                               fn.unrolled_meta_gradient(f, w, 0.2, inner, outer), rtol=0, atol=1e-10)


def test_hvp_equals_materialized_hessian_product():
    model = tiny_mlp(3)
    f = fn.loss_fn(model)
    (b,), _ = fixed_batches(1, seed=11)
    w = flat_params(model)
    v = torch.randn(w.shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    h = torch.autograd.functional.hessian(lambda p: f(p, b), w)  # test-only reference
    torch.testing.assert_close(fn.hvp(f, w, v, b), h @ v, rtol=0, atol=1e-12)


@pytest.mark.parametrize("nu", [1, 2, 5])
def test_hessian_free_meta_gradient_close_to_exact(nu):
    # Tolerance: central differences err by O(delta^2); with delta = 1e-4 in float64 the meta-gradient
    # matches to a relative 1e-6 of its largest entry (measured ~1e-9).
    model = tiny_mlp()
    f = fn.loss_fn(model)
    inner, outer = fixed_batches(nu, seed=nu)
    w = flat_params(model)
    exact = fn.meta_gradient(f, w, 0.3, inner, outer, mode="exact")
    hf = fn.meta_gradient(f, w, 0.3, inner, outer, mode="hessian_free", hf_delta=1e-4)
    assert (hf - exact).abs().max() <= 1e-6 * exact.abs().max()
    # and a coarse step is measurably worse (so the finite difference is really used)
    coarse = fn.meta_gradient(f, w, 0.3, inner, outer, mode="hessian_free", hf_delta=0.5)
    assert (coarse - exact).abs().max() > 10 * (hf - exact).abs().max()


@pytest.mark.parametrize("nu", [1, 2, 5])
def test_first_order_is_gradient_at_phi_nu(nu):
    model = tiny_mlp()
    f = fn.loss_fn(model)
    inner, outer = fixed_batches(nu, seed=20 + nu)
    w = flat_params(model)
    fo = fn.meta_gradient(f, w, 0.3, inner, outer, mode="first_order")
    # independent reference: nu plain SGD steps on the module itself, then its gradient on D'
    opt = torch.optim.SGD(model.parameters(), lr=0.3)
    for x, y in inner:
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    opt.zero_grad()
    nn.functional.cross_entropy(model(outer[0]), outer[1]).backward()
    ref = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
    torch.testing.assert_close(fo, ref, rtol=0, atol=1e-12)


def test_batch_stream_reshuffles_and_cuts():
    s = fn.BatchStream(5, torch.Generator().manual_seed(0))
    first, second = s.take(3), s.take(3)  # second does not fit in the pass: fresh permutation
    assert len(set(first.tolist())) == 3 and len(set(second.tolist())) == 3
    assert sorted(s.take(9).tolist()) == [0, 1, 2, 3, 4]  # cut to the client's size


# ---------------------------------------------------------------- the registered methods

def client_data(n_train, seed=0, n_eval=6):
    rng = np.random.default_rng(seed)
    splits = {s: (rng.integers(0, 256, (k, 1, 16, 16), dtype=np.uint8), rng.integers(0, 5, k))
              for s, k in (("train", n_train), ("val", n_eval), ("test", n_eval))}
    return ClientData(seed, "seen", reader=lambda cid, split: splits[split],
                      counts={s: len(v[1]) for s, v in splits.items()})


def ctx_for(cid, mode="train", model=None):
    ctx = ClientContext(client_id=cid, cohort="seen", round=3, seed=42, phase="update", mode=mode, task=TASK)
    if model is not None:
        ctx.cache[cache_key(TASK)] = model  # the worker's cached client model, here in float64
    return ctx


def make(name, **kw):
    algo = registry.get(name)
    cfg = config_from_dict(algo.Config, kw)
    return algo, cfg


@pytest.mark.parametrize("gradient", ["exact", "first_order", "hessian_free"])
def test_client_meta_step_is_w_minus_beta_g(gradient):
    algo, cfg = make("metafl", nu=2, alpha=0.1, beta=0.3, tau=1, batch_size=4, outer_batch_size=5,
                     gradient=gradient, hf_delta=1e-4)
    model = tiny_lenet(2)
    state = algo.init(cfg, TASK, seed=2)
    w = state.theta.double()
    data = client_data(30)
    ctx = ctx_for(0, model=model)
    reply = algo.client("update", cfg, w, None, data, None, ctx)
    # reproduce the client's batches from the same seeded stream
    x, y = data.split("train")
    x = x.double()
    stream = fn.BatchStream(30, ctx.generator("meta"))
    inner = [stream.take(4) for _ in range(2)]
    outer = stream.take(5)
    g = fn.meta_gradient(fn.loss_fn(model), w, 0.1, [(x[i], y[i]) for i in inner], (x[outer], y[outer]),
                         mode=gradient, hf_delta=1e-4)
    assert float(reply.sums["n"]) == 30.0 and reply.n_train == 13
    torch.testing.assert_close(w - reply.sums["delta"] / 30.0, w - 0.3 * g, rtol=0, atol=1e-12)
    # same seed, same reply: the step is a function of its inputs
    again = algo.client("update", cfg, w, None, data, None, ctx_for(0, model=model))
    assert torch.equal(again.sums["delta"], reply.sums["delta"])


def test_perfedavg_step_uses_fresh_hessian_batch_and_rejects_nu():
    algo, cfg = make("perfedavg", alpha=0.1, beta=0.2, tau=1, batch_size=4, outer_batch_size=4,
                     gradient="exact")
    assert cfg.nu == 1 and cfg.hessian_batch == "fresh" and cfg.ft_steps == 1
    with pytest.raises(SimfedError, match="unknown key.*nu"):
        make("perfedavg", nu=2)
    model = tiny_lenet(4)
    w = flat_params(model)
    data = client_data(40, seed=1)
    ctx = ctx_for(1, model=model)
    reply = algo.client("update", cfg, w, None, data, None, ctx)
    x, y = data.split("train")
    x = x.double()
    s = fn.BatchStream(40, ctx.generator("meta"))
    d, d1, d2 = s.take(4), s.take(4), s.take(4)  # D, D', D'' of Fallah et al., Algorithm 1
    f = fn.loss_fn(model)
    g_out = fn.grad(f, w - 0.1 * fn.grad(f, w, (x[d], y[d])), (x[d1], y[d1]))
    g = g_out - 0.1 * fn.hvp(f, w, g_out, (x[d2], y[d2]))
    torch.testing.assert_close(reply.sums["delta"] / 40.0, 0.2 * g, rtol=0, atol=1e-12)


def test_server_averages_client_models_by_samples():
    algo, cfg = make("metafl", nu=2, tau=2, batch_size=4, outer_batch_size=4, gradient="first_order")
    state = algo.init(cfg, TASK, seed=0)
    theta0 = state.theta.clone()
    w_i, sums = [], {}
    for cid, n in ((0, 10), (1, 30)):
        model = init_model(LeNet(1, 5, 16), 0)
        r = algo.client("update", cfg, theta0, None, client_data(n, seed=cid), None, ctx_for(cid, model=model))
        w_i.append((theta0 - r.sums["delta"] / n, n))
        for k, v in r.sums.items():
            sums[k] = sums.get(k, 0) + v
    algo.finish("update", cfg, state, sums, 2, RoundInfo(round=0, seed=0))
    expect = (w_i[0][0] * 10 + w_i[1][0] * 30) / 40
    torch.testing.assert_close(state.theta, expect, rtol=0, atol=1e-6)
    assert not torch.equal(state.theta, theta0)
    before = state.theta.clone()
    algo.finish("update", cfg, state, {}, 0, RoundInfo(round=1, seed=0))  # every client dropped
    assert torch.equal(state.theta, before)


@pytest.mark.parametrize("bad", [{"nu": 0}, {"alpha": 0.0}, {"alpha": -1.0}, {"beta": 0},
                                 {"gradient": "second"}, {"hf_delta": 0.0}, {"hessian_batch": "x"},
                                 {"eval_steps": -2}])
def test_bad_config_is_a_user_error(bad):
    with pytest.raises(SimfedError):
        make("metafl", **bad)


def test_small_client_reuses_samples_or_fails_when_strict():
    algo, cfg = make("metafl", nu=5, tau=2, batch_size=8, outer_batch_size=8)
    model = tiny_lenet()
    r = algo.client("update", cfg, flat_params(model), None, client_data(7), None, ctx_for(0, model=model))
    assert torch.isfinite(r.sums["delta"]).all() and r.n_train == 2 * 6 * 7  # batches cut to 7 samples
    _, strict = make("metafl", nu=5, batch_size=8, outer_batch_size=8, strict_batches=True)
    with pytest.raises(SimfedError, match="client 0 has 7 train samples.*uses 48"):
        algo.client("update", strict, flat_params(model), None, client_data(7), None, ctx_for(0, model=model))
    with pytest.raises(SimfedError, match="no train samples"):
        algo.client("update", cfg, flat_params(model), None, client_data(0), None, ctx_for(0, model=model))


def test_non_finite_meta_gradient_returns_a_message():
    algo, cfg = make("metafl", nu=2, tau=3, batch_size=4, outer_batch_size=4)
    model = tiny_lenet()
    w = flat_params(model)
    w[0] = float("nan")
    r = algo.client("update", cfg, w, None, client_data(12), None, ctx_for(0, model=model))
    assert not torch.isfinite(r.sums["delta"]).all()  # the engine drops and counts this reply
    assert r.n_train == 12  # the loop stopped after the first non-finite meta-step


@pytest.mark.parametrize("eval_steps,expect_steps", [(-1, 3), (0, 0), (5, 5)])
def test_evaluation_finetunes_eval_steps_from_global_model(eval_steps, expect_steps):
    algo, cfg = make("metafl", nu=3, alpha=0.2, eval_steps=eval_steps, eval_batch_size=4)
    assert cfg.ft_steps == expect_steps and cfg.ft_lr == 0.2
    model = tiny_lenet(5).float()  # evaluation runs in the store's float32
    w = flat_params(model)
    data = client_data(20, seed=3)
    ctx = ctx_for(3, mode="eval", model=model)
    r = algo.client("evaluate", cfg, w, None, data, None, ctx)
    assert set(r.evals) == {"val", "test"} and r.evals["test"].n == 6
    ref = tiny_lenet(5).float()
    load_flat(ref, w)
    x, y = data.split("train")
    if expect_steps:
        training.sgd_train(ref, x, y, steps=expect_steps, batch_size=4, lr=0.2, gen=ctx.generator("finetune"))
    vx, vy = data.split("test")
    e = training.evaluate(ref, vx, vy)
    assert r.evals["test"].loss_sum == pytest.approx(e.loss_sum, abs=1e-5)


# ---------------------------------------------------------------- through the engine

@pytest.fixture(scope="module")
def small_store(tmp_path_factory):
    from simfed.partitions.store import write_store

    rng = np.random.default_rng(0)
    sizes = [3, 40, 25, 30, 35, 20, 28]  # client 0: fewer samples than one meta-step uses
    client_of = np.repeat(np.arange(len(sizes)), [s + 8 for s in sizes])
    split = np.concatenate([["train"] * s + ["val"] * 4 + ["test"] * 4 for s in sizes])
    x = rng.integers(0, 256, (len(client_of), 1, 16, 16), dtype=np.uint8)
    y = (client_of + rng.integers(0, 2, len(client_of))) % 5  # label skew per client
    return write_store(tmp_path_factory.mktemp("metafl") / "store", x, y, client_of, split,
                       classes=[str(c) for c in range(5)], unseen=[6])


def run_engine(store, run_dir, name, rounds=2, **algo):
    from simfed.engine.config import parse
    from simfed.engine import metrics
    from simfed.engine.loop import run_experiment

    doc = {"data": {"path": store}, "algorithm": {"name": name, **algo}, "engine": {"backend": "serial"},
           "run": {"rounds": rounds, "clients_per_round": 6, "eval_every": 1, "checkpoint_every": 0, "seed": 1}}
    result = run_experiment(parse(doc), run_dir, backend="serial")
    return result, metrics.load(run_dir)


@pytest.mark.parametrize("name,algo", [("metafl", {"nu": 2, "gradient": "exact"}),
                                       ("perfedavg", {"gradient": "hessian_free"})])
def test_end_to_end_serial(small_store, tmp_path, name, algo):
    result, df = run_engine(small_store, tmp_path / "run", name, tau=2, batch_size=8, outer_batch_size=8,
                            eval_steps=3, **algo)
    assert result["dropped"] == 0
    ev = df.filter(df["split"] == "test")
    assert set(ev["cohort"].unique()) == {"seen", "unseen"} and ev["accuracy"].is_finite().all()
    assert df.filter(df["split"] == "train").height == 12  # 6 clients x 2 rounds, client 0 included


def test_engine_drops_non_finite_meta_updates(small_store, tmp_path):
    result, _ = run_engine(small_store, tmp_path / "run", "metafl", rounds=1, nu=1, alpha=1e12, beta=1e12,
                           tau=1, batch_size=8, outer_batch_size=8, eval_steps=0)
    assert result["dropped"] == 6  # every update overflowed; none reached the global model


def test_example_files_parse():
    from pathlib import Path

    from simfed.core.config import load_toml
    from simfed.engine.config import parse

    files = sorted(Path(__file__).parents[2].glob("examples/*.toml"))
    files = [f for f in files if f.name.startswith(("metafl_", "perfedavg_"))]
    assert len(files) >= 4
    for f in files:
        exp = parse(load_toml(str(f)), str(f))
        assert exp.algorithm in ("metafl", "perfedavg") and exp.algorithm_config.ft_steps == 5
