"""FedACnnL: exactness against centralized ridge, split invariance, O(d^2) server memory, bad input."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest
import torch
from torch.nn import functional as F

from simfed.algorithms import registry
from simfed.algorithms.base import ClientContext, ClientData, RoundInfo, Task
from simfed.core.config import config_from_dict
from simfed.core.errors import SimfedError
from simfed.engine.worker import all_finite

TASK = Task((1, 10, 10), 4)


@pytest.fixture(autouse=True)
def one_thread():
    # Thousands of tiny per-client ops: intra-op thread hand-offs would cost more than the math
    # on a busy 2-core machine (a worker runs with cpus_per_worker threads anyway).
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)
SMALL = ("conv3x4", "fc16", "fc")  # conv3 -> 8x8, pool -> 4x4x4 = 64 -> 16 -> 4


def make_data(n=2000, seed=0):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 4, n)
    x = rng.integers(0, 120, (n, 1, 10, 10))
    x[np.arange(n), 0, 2 * y + 1, 1:9] = 250  # a bright bar whose row is the class
    return x.astype(np.uint8), y.astype(np.int64)


def clients_of(x, y, k):
    parts = np.array_split(np.arange(len(y)), k)
    return [ClientData(c, "seen", lambda cid, split, p=p: (x[p], y[p]) if split == "train" else (x[:0], y[:0]))
            for c, p in enumerate(parts)]


def ctx(cid, phase, mode="train", task=TASK):
    return ClientContext(client_id=cid, cohort="seen", round=0, seed=0, phase=phase, mode=mode, task=task)


def drive(name, cfg, clients, task=TASK, keep=None):
    """The engine's round in-process: broadcast, client per client, summed sums, finish. Returns
    (state, list of (phase, summed sums))."""
    algo = registry.get(name)
    state = algo.init(cfg, task, 0)
    seen = []
    for pi, phase in enumerate(algo.train_phases(cfg, state, 0)):
        info = RoundInfo(round=0, seed=0, phase_index=pi)
        bcast = algo.broadcast(phase, cfg, state, info)
        acc, n = {}, 0
        for d in clients:
            reply = algo.client(phase, cfg, bcast, None, d, None, ctx(d.client_id, phase, task=task))
            if not all_finite(reply.sums) or (keep is not None and d.client_id not in keep) or not reply.sums:
                continue  # the engine drops non-finite replies
            for k, v in reply.sums.items():
                acc[k] = acc[k] + v if k in acc else v.clone()
            n += 1
        algo.finish(phase, cfg, state, acc, n, info)
        seen.append((phase, bcast, acc))
    return state, seen


def centralized(cfg, state, x, y, positions=None):
    """Pooled ridge, layer by layer, with an independent im2col (slicing) and a dense LU solve."""
    xs = (torch.from_numpy(x).float() / 255.0).double()  # the pixels exactly as ClientData hands them out
    onehot = F.one_hot(torch.from_numpy(y), 4).double()
    h, out = xs, []
    for i, tok in enumerate(cfg.layers):
        if tok.startswith("conv"):
            k = int(tok[4:].split("x")[0])
            side = h.shape[2] - k + 1
            p = torch.stack([h[:, :, a:a + k, b:b + k].reshape(len(y), -1) for a in range(side) for b in range(side)], 1)
            pp = p if positions is None or positions[i] is None else p[:, positions[i]]
            xm = torch.cat([pp, torch.ones(*pp.shape[:2], 1, dtype=torch.float64)], 2).reshape(-1, pp.shape[2] + 1)
            t = torch.relu(onehot @ state.projections[i]).repeat_interleave(pp.shape[1], 0)
        else:
            xm = torch.cat([h.reshape(len(y), -1), torch.ones(len(y), 1, dtype=torch.float64)], 1)
            t = onehot if i == len(cfg.layers) - 1 else torch.relu(onehot @ state.projections[i])
        w = torch.linalg.solve(xm.T @ xm + cfg.gamma * torch.eye(xm.shape[1], dtype=torch.float64), xm.T @ t)
        out.append(w)
        if tok.startswith("conv"):
            z = torch.relu(p @ w[:-1] + w[-1])  # (n, L, c)
            h = F.max_pool2d(z.transpose(1, 2).reshape(len(y), -1, side, side), cfg.pool)
        elif i < len(cfg.layers) - 1:
            h = torch.relu(xm @ w)
    return out


def rel(a, b):
    return float((a - b).abs().max() / b.abs().max())


def cfg_of(name="fedacnnl", **kw):
    return config_from_dict(registry.get(name).Config, {"layers": list(SMALL), **kw})


def test_federated_equals_centralized_for_any_split():
    x, y = make_data(1000)
    cfg = cfg_of()
    results = {k: drive("fedacnnl", cfg, clients_of(x, y, k)) for k in (1, 10, 1000)}
    ref = centralized(cfg, results[1][0], x, y)
    for k, (state, _) in results.items():
        for i, w in enumerate(state.weights):
            assert rel(w, ref[i]) < 1e-8, (k, i, rel(w, ref[i]))
    # the head is not trivial: it classifies its own training data well above chance
    xs = torch.from_numpy(x).float() / 255
    algo = registry.get("fedacnnl")
    ev = algo.client("evaluate", cfg, algo.broadcast("evaluate", cfg, results[10][0], RoundInfo(0, 0, mode="eval")),
                     None, ClientData(0, "seen", lambda c, s: (x, y)), None, ctx(0, "evaluate", "eval")).evals
    assert ev["test"].correct / ev["test"].n > 0.6 and xs.shape[0] == ev["test"].n


def test_patch_subsampling_keeps_exactness():
    x, y = make_data(600, seed=1)
    cfg = cfg_of(patches_per_image=5)
    (s1, seen1), (s10, seen10) = drive("fedacnnl", cfg, clients_of(x, y, 1)), drive("fedacnnl", cfg, clients_of(x, y, 10))
    pos = seen1[0][1]["positions"]
    assert pos is not None and pos.numel() == 5 and torch.equal(pos, seen10[0][1]["positions"])
    assert float(seen1[0][2]["A"][-1, -1]) == 600 * 5  # rows: 5 patches per image
    ref = centralized(cfg, s1, x, y, positions={0: pos})
    for i in range(3):
        assert rel(s1.weights[i], ref[i]) < 1e-8 and rel(s10.weights[i], ref[i]) < 1e-8


def test_server_memory_and_replies_do_not_grow_with_clients():
    x, y = make_data(400, seed=2)
    cfg = cfg_of()
    s10, seen10 = drive("fedacnnl", cfg, clients_of(x, y, 10))
    s500, seen500 = drive("fedacnnl", cfg, clients_of(x, y, 200))

    def sizes(obj):
        return [tuple(v.shape) for v in obj if isinstance(v, torch.Tensor)]

    sd10, sd500 = s10.state_dict(), s500.state_dict()
    assert sizes(sd10["weights"]) == sizes(sd500["weights"]) == [(10, 4), (65, 16), (17, 4)]
    for (p, _, a10), (_, _, a500) in zip(seen10, seen500):
        assert {k: tuple(v.shape) for k, v in a10.items()} == {k: tuple(v.shape) for k, v in a500.items()}
    # a client's reply is d x d and d x k whatever its sample count: never rows of data
    algo = registry.get("fedacnnl")
    for phase, bcast, _ in seen10:
        d, k = tuple(s10.weights[int(phase[5:])].shape)
        for n in (1, 7, 300):
            r = algo.client(phase, cfg, bcast, None, clients_of(x[:n], y[:n], 1)[0], None, ctx(0, phase))
            assert {key: tuple(v.shape) for key, v in r.sums.items()} == {"A": (d, d), "b": (d, k), "n": ()}
            assert all(v.dtype == torch.float64 for v in r.sums.values()) and r.n_train == n


def test_fewer_and_zero_clients():
    x, y = make_data(400, seed=3)
    cfg = cfg_of()
    clients = clients_of(x, y, 4)
    part, _ = drive("fedacnnl", cfg, clients, keep={0, 2})
    keep = np.r_[np.array_split(np.arange(400), 4)[0], np.array_split(np.arange(400), 4)[2]]
    ref = centralized(cfg, part, x[keep], y[keep])
    assert all(rel(w, r) < 1e-8 for w, r in zip(part.weights, ref))
    with pytest.raises(SimfedError, match=r"layer 0 \(conv3x4\).*0 clients"):
        drive("fedacnnl", cfg, clients, keep=set())


def test_non_finite_client_is_dropped_and_the_rest_solve():
    x, y = make_data(300, seed=4)
    cfg = cfg_of()
    good = clients_of(x, y, 3)
    bad = ClientData(9, "seen", lambda c, s: (np.full((5, 1, 10, 10), np.nan, dtype=np.float32) if s == "train"
                                              else x[:0], y[:5] if s == "train" else y[:0]))
    algo = registry.get("fedacnnl")
    state = algo.init(cfg, TASK, 0)
    b = algo.broadcast("layer0", cfg, state, RoundInfo(0, 0))
    assert not all_finite(algo.client("layer0", cfg, b, None, bad, None, ctx(9, "layer0")).sums)
    with_bad, _ = drive("fedacnnl", cfg, good + [bad])
    clean, _ = drive("fedacnnl", cfg, good)
    assert all(torch.equal(a, b) for a, b in zip(with_bad.weights, clean.weights))


def test_singular_gram_with_gamma_zero_names_the_layer():
    x, y = make_data(200, seed=5)
    x[:, :, 1, 0] = 0  # a pixel that is always 0: the raw-pixel Gram matrix is singular
    cfg = config_from_dict(registry.get("fedacnnl").Config, {"layers": ["fc"], "gamma": 0.0})
    with pytest.raises(SimfedError, match=r"fedacnnl layer 0 \(fc\).*singular.*gamma > 0"):
        drive("fedacnnl", cfg, clients_of(x, y, 3))


def test_config_errors():
    cls = registry.get("fedacnnl").Config
    with pytest.raises(SimfedError, match="layer 1 'maxout' cannot be solved analytically"):
        config_from_dict(cls, {"layers": ["conv5x16", "maxout", "fc"]})
    for bad in ({"hidden": "backprop"}, {"gamma": -1.0}, {"activation": "gelu"}, {"patches_per_image": -2},
                {"gram_dtype": "float16"}, {"client_fraction": 1.5}):
        with pytest.raises(SimfedError):
            config_from_dict(cls, bad)
    algo = registry.get("fedacnnl")
    with pytest.raises(SimfedError, match="needs square inputs"):
        algo.validate(cls(), Task((1, 12, 12), 10))
    with pytest.raises(SimfedError, match="too large"):
        algo.validate(config_from_dict(cls, {"layers": ["conv9x1000", "conv9x200", "fc"]}), Task((1, 40, 40), 10))
    algo.validate(cls(), Task((1, 28, 28), 62))
    algo.validate(cls(), Task((3, 32, 32), 10))


def test_frozen_hidden_solves_only_the_head():
    x, y = make_data(300, seed=6)
    cfg = cfg_of(hidden="frozen")
    algo = registry.get("fedacnnl")
    assert algo.train_phases(cfg, None, 0) == ("layer2",)
    init = algo.init(cfg, TASK, 0)
    state, _ = drive("fedacnnl", cfg, clients_of(x, y, 5))
    assert torch.equal(state.weights[0], init.weights[0]) and torch.equal(state.weights[1], init.weights[1])
    assert not torch.equal(state.weights[2], init.weights[2])


def test_end_to_end_through_the_engine(tiny_store, tmp_path):
    from simfed.engine import checkpoint
    from simfed.engine.config import DataConfig, EngineConfig, Experiment, RunConfig
    from simfed.engine.loop import run_experiment
    from simfed.partitions.store import PartitionStore

    store = PartitionStore.open(tiny_store)
    seen = [int(c) for c in store.client_ids("seen")]
    task = Task(tuple(store.sample_shape), store.num_classes)
    cfg = config_from_dict(registry.get("fedacnnl").Config,
                           {"layers": ["conv5x4", "fc32", "fc"], "pool": 4, "patches_per_image": 24})
    exp = Experiment("fedacnnl", cfg, DataConfig(path=tiny_store),
                     RunConfig(rounds=1, clients_per_round=len(seen), eval_every=1, checkpoint_every=1, seed=0),
                     EngineConfig(backend="serial"))
    out = run_experiment(exp, tmp_path / "run")
    weights = checkpoint.load(tmp_path / "run")["server"]["weights"]
    # same math in-process, clients in another order and split differently into one big client
    order = sorted(seen, key=lambda c: -c)
    xs = np.concatenate([store.read(c, "train")[0] for c in order]).reshape(-1, *task.input_shape)
    ys = np.concatenate([store.read(c, "train")[1] for c in order])
    direct, _ = drive("fedacnnl", cfg, clients_of(xs, ys, 1), task=task)
    assert all(rel(w, d) < 1e-8 for w, d in zip(weights, direct.weights))
    by = {r["cohort"]: r for r in out["summary"]}
    assert set(by) == {"seen", "unseen"} and by["seen"]["acc_weighted"] > 3.0 / task.num_classes
    # the worker stacked each chunk, yet reports one train row per client and phase
    from simfed.engine import metrics

    train = metrics.load(tmp_path / "run").filter(pl.col("split") == "train")
    assert train.height == 3 * len(seen) and int(train["n"].sum()) == 3 * len(ys)
    assert not train["dropped"].any() and float(train["seconds"].min()) > 0


def test_example_files_parse_and_validate():
    from pathlib import Path

    from simfed.core.config import load_toml
    from simfed.engine.config import parse

    files = sorted(Path(__file__).resolve().parents[2].glob("examples/*fedacnnl_*.toml"))
    assert len(files) >= 4
    for f in files:
        exp = parse(load_toml(str(f)), str(f))
        registry.get(exp.algorithm).validate(exp.algorithm_config, Task((1, 28, 28), 62))
        registry.get(exp.algorithm).validate(exp.algorithm_config, Task((1, 28, 28), 10))


def batch_drive(cfg, clients, chunk=4, cache=None):
    """`drive` through `chunk_sums`: the chunks' stacked statistics summed in chunk order; with
    `cache`, one worker-lived dict as the engine's worker passes (else a fresh one per call)."""
    algo = registry.get("fedacnnl")
    state = algo.init(cfg, TASK, 0)
    replies = []
    for pi, phase in enumerate(algo.train_phases(cfg, state, 0)):
        info = RoundInfo(round=0, seed=0, phase_index=pi)
        bcast = algo.broadcast(phase, cfg, state, info)
        acc = {}
        for s in range(0, len(clients), chunk):
            cs = [(d, ctx(d.client_id, phase)) for d in clients[s:s + chunk]]
            if cache is not None:
                for _, c in cs:
                    c.cache = cache
            r = algo.chunk_sums(phase, cfg, bcast, cs)
            replies.append(r)
            for k, v in (r.sums or {}).items():
                acc[k] = acc[k] + v if k in acc else v.clone()
        algo.finish(phase, cfg, state, acc, len(clients), info)
    return state, replies


def test_stacked_chunks_equal_client_by_client_and_drop_non_finite_clients():
    x, y = make_data(600, seed=7)
    cfg = cfg_of(patches_per_image=6)
    clients = clients_of(x, y, 9)
    bad = ClientData(99, "seen", lambda c, s: (np.full((5, 1, 10, 10), np.nan, dtype=np.float32) if s == "train"
                                               else x[:0], y[:5] if s == "train" else y[:0]))
    per_client, _ = drive("fedacnnl", cfg, clients)
    stacked, replies = batch_drive(cfg, clients[:5] + [bad] + clients[5:])
    assert all(rel(w, r) < 1e-10 for w, r in zip(stacked.weights, per_client.weights))
    # chunks of 4: [c0..c3], [c4, bad, c5, c6], [c7, c8] in each of the 3 phases
    assert replies[1].dropped == [False, True, False, False] and replies[1].n_train[1] == 5
    assert sum(sum(r.n_train) for r in replies[:3]) == 605 and not any(replies[0].dropped + replies[2].dropped)


def test_float32_gram_stays_close_to_the_float64_solution():
    x, y = make_data(800, seed=8)
    exact, _ = drive("fedacnnl", cfg_of(), clients_of(x, y, 4))
    fast, _ = drive("fedacnnl", cfg_of(gram_dtype="float32"), clients_of(x, y, 4))
    diffs = [rel(f, e) for f, e in zip(fast.weights, exact.weights)]
    # float32 products over blocks of <= 2^22 elements: ~1e-6 relative on the Gram sums, amplified
    # by the conditioning of each layer's system (measured 8e-7, 3.5e-4, 3.7e-5 here)
    assert all(0 < d < 2e-3 for d in diffs), diffs
    from simfed.algorithms.kit.acnnl import geometry, predict

    xs = torch.from_numpy(x).float() / 255
    out_fast, out_exact = (predict(geometry(cfg_of(), TASK), s.weights, xs, cfg_of()) for s in (fast, exact))
    assert rel(out_fast, out_exact) < 1e-3 and float((out_fast.argmax(1) == out_exact.argmax(1)).float().mean()) > 0.995


def test_client_fraction_solves_from_a_seeded_subset_of_clients():
    from simfed.algorithms.kit.acnnl import selected

    x, y = make_data(900, seed=9)
    cfg = cfg_of(client_fraction=0.3)
    clients = clients_of(x, y, 30)
    picked = [d.client_id for d in clients if selected(cfg, 0, 0, d.client_id)]
    assert 3 <= len(picked) <= 18 and picked == [c for c in range(30) if selected(cfg, 0, 0, c)]
    assert picked != [c for c in range(30) if selected(cfg, 0, 1, c)]  # a new subset each round
    state, seen = drive("fedacnnl", cfg, clients)
    keep = np.concatenate([np.array_split(np.arange(900), 30)[c] for c in picked])
    ref = centralized(cfg, state, x[keep], y[keep])
    assert all(rel(w, r) < 1e-8 for w, r in zip(state.weights, ref))
    assert all(float(acc["n"]) == len(keep) for _, _, acc in seen)  # the same clients in every layer phase
    stacked, _ = batch_drive(cfg, clients, chunk=7)
    assert all(rel(w, r) < 1e-10 for w, r in zip(stacked.weights, state.weights))
    with pytest.raises(SimfedError, match="client_fraction"):
        cfg_of(client_fraction=0.0)


def test_forward_cache_hits_give_bitwise_the_same_solution(monkeypatch):
    from simfed.algorithms.kit import analytic

    x, y = make_data(500, seed=10)
    cfg = cfg_of(patches_per_image=5)
    clients = clients_of(x, y, 6)
    calls = []
    real = analytic.forward
    monkeypatch.setattr(analytic, "forward", lambda *a, **k: calls.append(k.get("upto")) or real(*a, **k))
    cold, _ = batch_drive(cfg, clients)
    n_cold, calls[:] = list(calls), []
    shared = {}
    warm, _ = batch_drive(cfg, clients, cache=shared)
    # every phase after the first applied one layer to the kept inputs instead of the forward
    assert n_cold == [0, 0, 1, 1, 2, 2] and calls == [0, 0]
    assert all(torch.equal(a, b) for a, b in zip(warm.weights, cold.weights))
    assert shared["analytic-forward"] == {}  # the head's phase keeps nothing; nothing left over
    # a tiny budget keeps nothing, and the result is still the same
    monkeypatch.setattr(analytic, "CACHE_BYTES", 1)
    monkeypatch.setattr(analytic.ForwardCache.__init__, "__defaults__", (1,))
    calls[:] = []
    small, _ = batch_drive(cfg, clients, cache={})
    assert calls == n_cold and all(torch.equal(a, b) for a, b in zip(small.weights, cold.weights))
