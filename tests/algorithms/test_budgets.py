"""A straggler's step budget (ClientContext.budget, [system] stragglers = "partial"): the kit's
loops train the first `budget` steps of the full run's batches, and the vectorized chunk trainers
equal the per-client loops with the same budgets (float64, 1e-10)."""

from __future__ import annotations

import copy

import torch

from simfed.algorithms.kit import training
from simfed.algorithms.kit.functional import loss_fn
from simfed.algorithms.kit.models import flat_params, init_model, lenet_for, load_flat
from simfed.algorithms.kit.vectorized import sgd_train_chunk
from simfed.algorithms.kit.vectorized_meta import meta_chunk_step
from simfed.algorithms.metafl import MetaFLConfig, meta_client_step

SIZES = [7, 40, 90]
BUDGETS = [None, 2, 0]


def _data():
    g = torch.Generator().manual_seed(0)
    return ([torch.rand(n, 1, 28, 28, generator=g, dtype=torch.float64) for n in SIZES],
            [torch.randint(0, 10, (n,), generator=g) for n in SIZES])


def _gens():
    return [torch.Generator().manual_seed(50 + c) for c in range(len(SIZES))]


def test_a_budget_is_the_first_steps_of_the_full_run():
    full = list(training.batches(90, 16, 7, torch.Generator().manual_seed(1), epochs=1.5))
    cut = list(training.batches(90, 16, 7, torch.Generator().manual_seed(1), epochs=1.5, budget=4))
    assert len(full) == 9 and len(cut) == 4 and all(torch.equal(a, b) for a, b in zip(full, cut))


def test_sgd_chunk_with_budgets_equals_the_loop():
    model = init_model(lenet_for((1, 28, 28), 10), 1).double()
    xs, ys = _data()
    thetas = flat_params(model).expand(len(SIZES), -1).clone()
    vec, seen, _ = sgd_train_chunk(model, thetas, xs, ys, steps=5, batch_size=16, lr=0.1, gens=_gens(),
                                   momentum=0.9, budgets=BUDGETS)
    for c, budget in enumerate(BUDGETS):
        ref = copy.deepcopy(model)
        load_flat(ref, thetas[c])
        n, _ = training.sgd_train(ref, xs[c], ys[c], steps=5, batch_size=16, lr=0.1, gen=_gens()[c], momentum=0.9,
                                  budget=budget)
        assert seen[c] == n == (5 if budget is None else budget) * min(16, SIZES[c])
        assert (flat_params(ref) - vec[c]).abs().max().item() < 1e-10


def test_meta_chunk_with_budgets_equals_the_loop():
    cfg = MetaFLConfig(nu=1, tau=3, gradient="first_order", batch_size=8, outer_batch_size=8)
    model = init_model(lenet_for((1, 28, 28), 10), 2).double()
    xs, ys = _data()
    w0 = flat_params(model)
    w, seen, _ = meta_chunk_step(cfg, model, w0, xs, ys, _gens(), BUDGETS)
    for c, budget in enumerate(BUDGETS):
        ref, n, _ = meta_client_step(cfg, w0, loss_fn(model), xs[c], ys[c], _gens()[c], budget)
        assert seen[c] == n == (3 if budget is None else budget) * cfg.samples_per_meta_step(SIZES[c])
        assert (ref - w[c]).abs().max().item() < 1e-10
