"""[privacy]: the accountant against dp-accounting called directly, clipping against the un-noised sum,
the noise's measured standard deviation, Poisson sampling, adaptive clipping, and what every method
declares. Engine-level checks run a probe method whose client updates are fixed vectors, serially."""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass

import dp_accounting
import numpy as np
import polars as pl
import pytest
import torch

from simfed.algorithms import registry
from simfed.algorithms.base import (Algorithm, Capabilities, Eval, NoPrivacy, PrivacySupport, Reply, RoundInfo,
                                    ServerState, Task)
from simfed.algorithms.registry import register
from simfed.core.errors import SimfedError
from simfed.engine import checkpoint, metrics
from simfed.engine.loop import run_experiment
from simfed.engine.mechanism import ServerPrivacy
from simfed.engine.privacy import parse_section, resolve
from simfed.engine.sampling import sample_cohort, sample_poisson
from simfed.partitions.store import PartitionStore
from tests.engine.conftest import make_exp

DIM = 100_000  # coordinates of the probe's update: enough to measure the noise's std to well under 1%


@dataclass(frozen=True)
class ProbeConfig:
    norm: float = 0.5  # L2 norm of every client's update
    big: int = -1  # this client's update is `blow_up` x the clip instead
    blow_up: float = 1000.0
    clip_hint: float = 1.0  # the clip the test sets, to size the big update


class ProbeState(ServerState):
    def __init__(self):
        self.released = torch.zeros(DIM)  # the last round's sums["delta"] as finish saw it (checkpointed)
        self.denominator = torch.zeros((), dtype=torch.float64)


def direction(cid: int) -> torch.Tensor:
    """A client's fixed unit direction (the test recomputes it)."""
    v = torch.randn(DIM, generator=torch.Generator().manual_seed(cid))
    return v / v.norm()


def update_of(cfg: ProbeConfig, cid: int) -> torch.Tensor:
    size = cfg.blow_up * cfg.clip_hint if cid == cfg.big else cfg.norm
    return direction(cid) * size


@register
class Probe(Algorithm):
    """Clients send fixed vectors weighted by their sample count; finish keeps the released sum."""

    name = "test-dp-probe"
    Config = ProbeConfig
    capabilities = Capabilities(privacy=PrivacySupport(released=(("update", ("delta",)),), covers="a probe"))

    def init(self, cfg, task, seed):
        return ProbeState()

    def train_phases(self, cfg, state, round):
        return ("update",)

    def eval_phases(self, cfg, state, cohort):
        return ("evaluate",)

    def client(self, phase, cfg, bcast, payload, data, cstate, ctx):
        if ctx.mode == "eval":
            return Reply(evals={"test": Eval(n=1, loss_sum=0.0, correct=1)})
        n = float(data.n("train"))
        return Reply(sums={"delta": update_of(cfg, ctx.client_id) * n, "n": torch.tensor(n, dtype=torch.float64)},
                     n_train=int(n))

    def finish(self, phase, cfg, state, sums, n_clients, info):
        if info.mode == "train":
            state.released = sums["delta"].clone()
            state.denominator = sums["n"].clone()
        return None

    def privacy_zeros(self, phase, cfg, state):
        return {"delta": torch.zeros(DIM)}


def probe_run(store, tmp_path, privacy: dict, rounds=1, clients_per_round=6, **cfg):
    exp = make_exp(store, "test-dp-probe", rounds=rounds, clients_per_round=clients_per_round, eval_every=0,
                   checkpoint_every=0, **cfg)
    exp = dataclasses.replace(exp, privacy=parse_section(privacy))
    run_experiment(exp, tmp_path)
    train = metrics.load(tmp_path).filter(pl.col("split") == "train")
    return checkpoint.load(tmp_path)["server"], train, metrics.load_rounds(tmp_path)


# --- the accountant: simfed's epsilon == dp-accounting's, called here directly ----------------------

SETTINGS = [  # (noise multiplier, sampling rate = clients_per_round / seen, rounds, delta)
    (1.1, 10 / 100, 50, 1e-5),
    (1.5, 5 / 20, 8, 1e-3),
    (3.0, 20 / 400, 300, 1e-6),
]


def direct(accountant: str, sigma: float, q: float, rounds: int, delta: float) -> float:
    acc = dp_accounting.rdp.RdpAccountant() if accountant == "rdp" else dp_accounting.pld.PLDAccountant()
    event = dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma))
    return acc.compose(event, rounds).get_epsilon(delta)


def plan_for(privacy: dict, rounds: int, clients_per_round: int, seen: int, algorithm: str = "fedavg"):
    exp = make_exp("unused", algorithm, rounds=rounds, clients_per_round=clients_per_round)
    return resolve(dataclasses.replace(exp, privacy=parse_section(privacy)), seen)


@pytest.mark.parametrize("accountant", ["rdp", "pld"])
@pytest.mark.parametrize("setting", SETTINGS, ids=["q0.1", "q0.25", "q0.05"])
def test_epsilon_equals_dp_accounting(accountant, setting):
    sigma, q, rounds, delta = setting
    seen = {0.1: 100, 0.25: 20, 0.05: 400}[q]
    plan = plan_for({"noise_multiplier": sigma, "delta": delta, "accountant": accountant}, rounds, round(q * seen), seen)
    assert plan.rate == q
    # PLD: simfed self-composes one round's PLD (built once) where PLDAccountant starts from the
    # identity PLD; the two agree to ~1e-12, RDP's are the same computation
    assert plan.epsilon(rounds) == pytest.approx(direct(accountant, sigma, q, rounds, delta), rel=1e-9)
    # every round is accounted for: epsilon grows with the rounds
    assert 0 < plan.epsilon(1) < plan.epsilon(rounds // 2) < plan.epsilon(rounds)


def test_fixed_size_and_local_dp_are_accounted_as_documented():
    fixed = plan_for({"noise_multiplier": 1.2, "sampling": "fixed"}, 30, 10, 100)
    acc = dp_accounting.rdp.RdpAccountant(neighboring_relation=dp_accounting.NeighboringRelation.REPLACE_ONE)
    event = dp_accounting.SampledWithoutReplacementDpEvent(100, 10, dp_accounting.GaussianDpEvent(0.6))
    assert fixed.epsilon(30) == pytest.approx(acc.compose(event, 30).get_epsilon(1e-5), rel=1e-12)
    local = plan_for({"noise_multiplier": 8.0, "mode": "local", "accountant": "pld"}, 5, 10, 100)
    direct_local = dp_accounting.pld.PLDAccountant().compose(dp_accounting.GaussianDpEvent(4.0), 5).get_epsilon(1e-5)
    assert local.epsilon(5) == pytest.approx(direct_local, rel=1e-12)
    noise_cohort = plan_for({"noise_multiplier": 1.1, "noise_cohort_size": 1000}, 50, 10, 100)
    assert noise_cohort.noise_scale == 0.01 and noise_cohort.epsilon(50) == pytest.approx(
        direct("rdp", 1.1, 0.1, 50, 1e-5), rel=1e-12)  # the deployment's epsilon: same rate, 100x population


def test_target_epsilon_solves_the_least_noise():
    plan = plan_for({"target_epsilon": 3.0}, 40, 10, 100)
    assert direct("rdp", plan.noise_multiplier, 0.1, 40, 1e-5) <= 3.0
    assert direct("rdp", plan.noise_multiplier - 2e-3, 0.1, 40, 1e-5) > 3.0
    with pytest.raises(SimfedError, match="no noise_multiplier up to"):
        plan_for({"target_epsilon": 1e-3}, 40, 10, 100)  # below RDP's floor at delta 1e-5


# --- the mechanism, end to end through the engine --------------------------------------------------

def test_a_client_1000x_the_clip_contributes_at_most_the_clip(engine_store, tmp_path):
    seen = PartitionStore.open(engine_store).client_ids("seen")
    cohort = sample_poisson(0, 0, seen, 6 / len(seen))
    big = cohort[0]
    server, train, _ = probe_run(engine_store, tmp_path, {"noise_multiplier": 0.0, "clip": 1.0}, big=big)
    assert sorted(train["client_id"].to_list()) == cohort  # Poisson sampling drew the cohort
    released = server["released"].double()
    others = sum(direction(c).double() * 0.5 for c in cohort if c != big)  # within the clip: untouched
    big_part = released - others
    assert big_part.norm() <= 1.0 + 1e-5
    assert big_part.norm() >= 1.0 - 1e-5  # clipped to the bound, not dropped
    assert torch.allclose(big_part / big_part.norm(), direction(big).double(), atol=1e-5)
    assert float(server["denominator"]) == 6.0  # the fixed denominator, not the sum of weights
    status = json.loads((tmp_path / "status.json").read_text())
    assert status["epsilon"] is None and status["privacy"]["noise_multiplier"] == 0.0  # no noise: no bound


def test_an_empty_cohort_still_releases_noise():
    plan = plan_for({"noise_multiplier": 1.5, "clip": 2.0}, 5, 6, 20)
    server = ServerPrivacy(plan)
    sums, stats = server.release("update", {}, lambda: {"delta": torch.zeros(DIM)},
                                 RoundInfo(round=3, seed=0, private=True))
    assert float(sums["delta"].std()) == pytest.approx(3.0, rel=0.01) and float(sums["n"]) == 6.0
    again, _ = ServerPrivacy(plan).release("update", {}, lambda: {"delta": torch.zeros(DIM)},
                                           RoundInfo(round=3, seed=0, private=True))
    assert torch.equal(again["delta"], sums["delta"]) and stats["privacy_clip"] == 2.0  # seeded by (seed, round)


@pytest.mark.parametrize("noise_cohort_size", [0, 60])
def test_noise_std_is_noise_multiplier_times_clip(engine_store, tmp_path, noise_cohort_size):
    privacy = {"noise_multiplier": 2.0, "clip": 0.5, "noise_cohort_size": noise_cohort_size}
    server, _, rounds = probe_run(engine_store, tmp_path, privacy, norm=0.0)
    noise = server["released"].double()
    expected = 2.0 * 0.5 * (6 / noise_cohort_size if noise_cohort_size else 1.0)
    # the sample std of 1e5 normal draws has relative standard error 1/sqrt(2e5) = 0.22%: 1% is 4.5 of them
    assert float(noise.std()) == pytest.approx(expected, rel=0.01)
    assert abs(float(noise.mean())) < 5 * expected / math.sqrt(DIM)
    seen = len(PartitionStore.open(engine_store).client_ids("seen"))
    assert rounds["epsilon"].to_list() == [plan_for(privacy, 1, 6, seen).epsilon(1)]


def test_local_dp_noises_each_client(engine_store, tmp_path):
    server, train, _ = probe_run(engine_store, tmp_path, {"noise_multiplier": 2.0, "clip": 0.5, "mode": "local"},
                                 norm=0.0)
    k = train.height  # k clients each added std 1.0: the sum's std is sqrt(k)
    assert float(server["released"].double().std()) == pytest.approx(math.sqrt(k), rel=0.01)


def test_adaptive_clip_settles_at_the_target_quantile(engine_store, tmp_path):
    privacy = {"noise_multiplier": 0.0, "clip": 0.1, "target_quantile": 0.5, "clip_lr": 0.5,
               "clip_count_stddev": 1e-3}
    server, _, rounds = probe_run(engine_store, tmp_path, privacy, rounds=10)
    clips = rounds["update.privacy_clip"].to_list()
    assert clips[0] == 0.1 and all(b > a for a, b in zip(clips[:6], clips[1:7]))  # all clipped: it grows
    final = float(server["__privacy__"]["clip"])  # the norm 0.5 is every client's: the median
    assert 0.5 * math.exp(-0.25) * 0.99 <= final <= 0.5 * math.exp(0.25) * 1.01


# --- sampling and declarations -----------------------------------------------------------------------

def test_fixed_sampling_draws_clients_per_round(engine_store, tmp_path):
    _, train, rounds = probe_run(engine_store, tmp_path, {"noise_multiplier": 1.0, "sampling": "fixed"}, rounds=2)
    seen = PartitionStore.open(engine_store).client_ids("seen")
    for r in (1, 2):  # the non-private sampler: exactly clients_per_round, without replacement
        assert sorted(train.filter(pl.col("round") == r)["client_id"].to_list()) == sample_cohort(0, r - 1, seen, 6)
    assert rounds["epsilon"].to_list() == [plan_for({"noise_multiplier": 1.0, "sampling": "fixed"}, 2, 6,
                                                    len(seen)).epsilon(r) for r in (1, 2)]


def test_poisson_sampling_is_seeded_and_has_the_stated_rate():
    ids = list(range(100))
    assert sample_poisson(3, 7, ids, 0.1) == sample_poisson(3, 7, list(reversed(ids)), 0.1)
    sizes = [len(sample_poisson(3, r, ids, 0.1)) for r in range(2000)]
    assert np.mean(sizes) == pytest.approx(10.0, abs=0.3) and len(set(sizes)) > 5  # the size varies
    assert sample_cohort(3, 7, ids, 10) == sample_cohort(3, 7, ids, 10)  # the non-private sampler is untouched


def test_every_method_declares_its_privacy():
    task = Task(input_shape=(1, 28, 28), num_classes=10, num_clients=20, total_clients=24)
    for name in registry.names():
        if name.startswith("test-"):
            continue
        algo = registry.get(name)
        support = algo.capabilities.privacy
        assert isinstance(support, (PrivacySupport, NoPrivacy)), name
        if isinstance(support, NoPrivacy):
            with pytest.raises(SimfedError, match=f"with {name}"):
                plan_for({"noise_multiplier": 1.0}, 2, 5, 20, name)
            continue
        cfg = registry.get(name).Config(**({"descriptor_norm": "public"} if name == "pefll" else {}))
        state = algo.init(cfg, task, 0)
        for phase, keys in support.released:
            assert phase in algo.train_phases(cfg, state, 0), name
            assert set(algo.privacy_zeros(phase, cfg, state)) == set(keys), name


def test_pefll_private_term_is_the_accumulated_gradient():
    """PeFLL's hypernetwork term returned under [privacy] equals what it accumulates without it."""
    pefll = registry.get("pefll")
    cfg = pefll.Config(hidden=16, embed_dim=4, descriptor_norm="public")
    task = Task(input_shape=(1, 28, 28), num_classes=10, num_clients=20, total_clients=24)
    plain, private = pefll.init(cfg, task, 0), pefll.init(cfg, task, 0)
    u = torch.randn(4, generator=torch.Generator().manual_seed(1))
    delta = torch.randn(plain.hnet(u[None]).shape[1], generator=torch.Generator().manual_seed(2))
    for state, flag in ((plain, False), (private, True)):
        state._v[5] = u
        terms = pefll.absorb("model", cfg, state, 5, delta, RoundInfo(round=0, seed=0, private=flag))
    assert terms is not None and all(p.grad is None for p in private.hnet.parameters())
    accumulated = torch.cat([p.grad.reshape(-1) for p in plain.hnet.parameters()])
    assert torch.equal(terms["grad_h"], accumulated) and torch.equal(private._dv[5], plain._dv[5])


def test_privacy_with_a_system_clock_is_refused_in_one_line():
    import pytest

    from simfed.core.errors import SimfedError
    from simfed.engine import config

    base = {"data": {"path": "x"}, "algorithm": {"name": "fedavg"}, "privacy": {"noise_multiplier": 1.0}}
    for extra in ({"system": {"dropout": 0.1}}, {"run": {"aggregation": "fedbuff"}}):
        with pytest.raises(SimfedError, match=r"\[privacy\] with \[system\]") as e:
            config.parse({**base, **extra})
        assert "\n" not in str(e.value)
