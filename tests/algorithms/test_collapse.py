"""Collapse guard for the methods that personalize through a hypernetwork (pFedHN, PeFLL, FMLH).

On a small store where half the clients hold classes {0, 1} and half {2, 3}, a few training
rounds must leave clients of different classes with clearly different generated models, and the
spread gauge the server logs each round must say so. PeFLL without its descriptor normalization
(`descriptor_norm = "none"`, which collapses) is caught by the same criterion.
"""

from __future__ import annotations

import pytest
import torch

from simfed.algorithms.kit import hypernet as hn
from simfed.algorithms.base import ClientContext, ClientData, RoundInfo, Task
from simfed.algorithms.fmlh import FMLH, FMLHConfig
from simfed.algorithms.pefll import PeFLL, PeFLLConfig
from simfed.algorithms.pfedhn import PFedHN, PFedHNConfig

from clients import make_clients

TASK = Task(input_shape=(1, 16, 16), num_classes=4)
SEED = 5
ROUNDS = 3
MIN_REL_DIFF = 0.1   # ||theta_a - theta_b|| / ||theta_a|| between clients of different classes
MIN_SPREAD = 0.02    # the logged gauge (hypernet.spread over the cohort's generated models)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # tiny networks: one intra-op thread is fastest and immune to a busy machine's oversubscription
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def maker(clients, round_, mode="train"):
    cache: dict = {}

    def make(cid, phase):
        d = clients[cid]
        data = ClientData(cid, "seen", reader=lambda c, s: d[s], counts={k: len(v[1]) for k, v in d.items()})
        return data, ClientContext(client_id=cid, cohort="seen", round=round_, seed=SEED, phase=phase, mode=mode,
                                   task=TASK, cache=cache)
    return make


def train_and_measure(algo, cfg):
    """ROUNDS training rounds on 4 clients (0, 2: classes {0, 1}; 1, 3: classes {2, 3});
    returns (min relative model difference across the class groups, last round's stats)."""
    clients = make_clients([32] * 4, 0, two_classes=True, patterns=True)
    ids = [0, 1, 2, 3]
    state = algo.init(cfg, TASK, SEED)
    for r in range(ROUNDS):
        info = RoundInfo(round=r, seed=SEED)
        stats = {}
        for phase in algo.train_phases(cfg, state, r):
            out, _ = hn.serial_phase(algo, phase, cfg, state, ids, info, maker(clients, r))
            stats.update({f"{phase}.{k}": v for k, v in out.items()})
    # the models the seen clients get at evaluation (PeFLL: zero-shot from the train descriptor)
    info = RoundInfo(round=ROUNDS, seed=SEED, mode="eval")
    if algo.name == "pefll":
        hn.serial_phase(algo, "describe", cfg, state, ids, info, maker(clients, ROUNDS, "eval"))
    th = algo.payloads("evaluate", cfg, state, ids, info)
    diff = min(float((th[a] - th[b]).norm() / th[a].norm()) for a in (0, 2) for b in (1, 3))
    return diff, stats


CASES = {
    "pefll": (PeFLL(), PeFLLConfig(embed_dim=8, hidden=32, n_hidden=1, descriptor_batch=16, local_steps=5,
                                   batch_size=8, lr=0.05, server_lr=1e-3), "model.model_spread"),
    "pfedhn": (PFedHN(), PFedHNConfig(embed_dim=8, hidden=32, n_hidden=1, local_steps=5, batch_size=8, lr=0.05),
               "train.model_spread"),
    "fmlh": (FMLH(), FMLHConfig(embed_dim=8, hidden=32, n_hidden=1, meta_steps=2, inner_steps=2, batch_size=8),
             "meta.model_spread"),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_clients_with_different_classes_get_different_models(name):
    algo, cfg, key = CASES[name]
    diff, stats = train_and_measure(algo, cfg)
    assert diff > MIN_REL_DIFF, f"{name}: generated models of different-class clients differ by only {diff:.4f}"
    assert stats[key] > MIN_SPREAD, stats
    assert 0.0 <= stats[key] <= 1.0


def test_the_guard_catches_pefll_without_descriptor_normalization():
    # raw descriptors of different clients are nearly equal, so h hands out one model
    algo, cfg, key = CASES["pefll"]
    diff, stats = train_and_measure(algo, PeFLLConfig(**{**cfg.__dict__, "descriptor_norm": "none"}))
    assert diff < MIN_REL_DIFF and stats[key] < MIN_SPREAD, (diff, stats)


def test_spread_gauge():
    a = torch.randn(50)
    assert hn.spread([a, a.clone(), a.clone()]) == 0.0
    assert hn.spread([a, -a]) == pytest.approx(1.0)
    rows = [torch.randn(3) for _ in range(70)]
    lin = torch.nn.Linear(3, 5)
    with torch.no_grad():
        want = hn.spread([lin(r) for r in rows])
    assert hn.model_spread(lin, rows, chunk=16) == pytest.approx(want, rel=1e-6)
