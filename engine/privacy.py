"""Client-level differential privacy: the [privacy] table, its checks, and the plan a run follows.

DP-FedAvg (McMahan, Ramage, Talwar, Zhang, ICLR 2018, arXiv 1710.06963): each sampled client's
contribution to a summed server update is clipped to L2 norm `clip`, the server adds Gaussian
noise of standard deviation noise_multiplier x clip to the sum and divides by a fixed
denominator (the expected cohort size), never by the data-dependent sum of weights. The cohort
is drawn so that the accounting holds: Poisson sampling at rate q = clients_per_round / seen
clients (add/remove-one neighbours), or `sampling = "fixed"`: clients_per_round drawn without
replacement, accounted for as sampling without replacement (replace-one neighbours, so the
sum's sensitivity is 2 x clip; RDP only, dp-accounting's PLD accountant has no such event).

Options:
- Adaptive clipping (Andrew, Thakkar, McMahan, Ramaswamy, NeurIPS 2021, arXiv 1905.03871):
  `target_quantile` > 0 moves the clip geometrically, clip *= exp(-clip_lr (b - quantile)), b
  the noised fraction of clients whose contribution was within the clip. The noise multiplier
  is split between the update and that count as in the paper: the count's noise std is
  `clip_count_stddev` (default: cohort / 20) and the update's multiplier is
  (noise_multiplier^-2 - parts (2 clip_count_stddev)^-2)^-1/2, so the two releases together
  cost what one Gaussian of `noise_multiplier` costs.
- `noise_cohort_size` (pfl-research, Granqvist et al. 2024, arXiv 2404.06430): a simulation
  device. The noise added to the simulated cohort's sum is scaled by clients_per_round /
  noise_cohort_size, so the mean update carries the noise a cohort of noise_cohort_size
  clients would; the epsilon reported is that deployment's (same sampling rate, a population
  noise_cohort_size / clients_per_round times the seen clients), not the simulation's.
- Local DP (`mode = "local"`): each client clips its own update and adds the Gaussian noise
  itself, so the server never sees an un-noised update. Accounted per client over every round
  (a client may be sampled every time, and the server sees who sends), with sensitivity 2 x clip
  (any change of the client's data), no sampling amplification.

The accountants are Google's dp-accounting (engine.accounting); the clipping and noise are
engine.mechanism; what each method releases is its declaration (algorithms.base.PrivacySupport).
Ours: the keys, their checks, the parts split (a round whose release spans several phases or
keys clips each part to clip / sqrt(parts)), and the refusals.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from simfed.core import validate as v
from simfed.core.config import config_from_dict
from simfed.core.errors import SimfedError

ACCOUNTANTS = ("rdp", "pld")
SAMPLINGS = ("poisson", "fixed")
MODES = ("central", "local")
MAX_NOISE = 1e4  # target_epsilon's search stops here: beyond it the update is noise alone


@dataclass(frozen=True)
class PrivacyConfig:
    clip: float = 1.0  # L2 bound on one client's contribution per round (the start value with target_quantile)
    noise_multiplier: float | None = None  # noise std / clip; give this or target_epsilon
    target_epsilon: float | None = None  # solve noise_multiplier so that epsilon after run.rounds is at most this
    delta: float = 1e-5
    accountant: str = "rdp"  # "rdp" or "pld" (Google's dp-accounting)
    sampling: str = "poisson"  # "poisson" at rate clients_per_round / seen, or "fixed" size (rdp only)
    noise_cohort_size: int = 0  # > 0: noise as if this many clients were sampled per round (pfl-research)
    mode: str = "central"  # "central": the server noises the sum; "local": every client noises its own update
    target_quantile: float = 0.0  # > 0: adaptive clipping to this quantile of the clients' update norms
    clip_lr: float = 0.2  # adaptive clipping's step: clip *= exp(-clip_lr (fraction unclipped - quantile))
    clip_count_stddev: float = 0.0  # adaptive clipping: noise std of the unclipped count; 0 = cohort / 20


def parse_section(section: Any) -> PrivacyConfig:
    """The [privacy] table as a checked PrivacyConfig (numbers given as integers become floats)."""
    if not isinstance(section, dict):
        raise SimfedError("[privacy] must be a table")
    cfg = config_from_dict(PrivacyConfig, section, "[privacy]")
    for key in ("noise_multiplier", "target_epsilon"):
        value = getattr(cfg, key)
        if value is not None:
            cfg = dataclasses.replace(cfg, **{key: v.number(f"[privacy] {key}", value)})
    return check_config(cfg)


def check_config(cfg: PrivacyConfig) -> PrivacyConfig:
    """One line for any value no run can use; the rest needs the store (`resolve`)."""
    v.number("[privacy] clip", cfg.clip, 0.0, lo_open=True)
    v.number("[privacy] delta", cfg.delta, 0.0, 1.0, lo_open=True, hi_open=True)
    v.choice("[privacy] accountant", cfg.accountant, ACCOUNTANTS)
    v.choice("[privacy] sampling", cfg.sampling, SAMPLINGS)
    v.choice("[privacy] mode", cfg.mode, MODES)
    v.integer("[privacy] noise_cohort_size", cfg.noise_cohort_size, 0)
    v.number("[privacy] target_quantile", cfg.target_quantile, 0.0, 1.0, hi_open=True)
    v.number("[privacy] clip_lr", cfg.clip_lr, 0.0, 10.0, lo_open=True)
    v.number("[privacy] clip_count_stddev", cfg.clip_count_stddev, 0.0)
    if (cfg.noise_multiplier is None) == (cfg.target_epsilon is None):
        raise SimfedError("[privacy] needs exactly one of noise_multiplier (noise std / clip) and target_epsilon "
                          "(the noise multiplier is then solved for before the run); give one of them")
    if cfg.noise_multiplier is not None:
        v.number("[privacy] noise_multiplier", cfg.noise_multiplier, 0.0, MAX_NOISE)
    if cfg.target_epsilon is not None:
        v.number("[privacy] target_epsilon", cfg.target_epsilon, 0.0, 1e6, lo_open=True)
    if cfg.sampling == "fixed" and cfg.accountant == "pld":
        raise SimfedError("[privacy] sampling = \"fixed\" needs accountant = \"rdp\" (dp-accounting's PLD accountant "
                          "has no sampling-without-replacement event); use sampling = \"poisson\" or accountant = \"rdp\"")
    if cfg.mode == "local" and cfg.target_quantile > 0:
        raise SimfedError("[privacy] target_quantile (adaptive clipping) needs the server's noised count, so mode = "
                          "\"central\"; set target_quantile = 0 for local DP")
    if cfg.mode == "local" and cfg.noise_cohort_size:
        raise SimfedError("[privacy] noise_cohort_size scales the server's noise to a larger cohort; local DP's noise "
                          "is each client's own and does not depend on the cohort: set noise_cohort_size = 0")
    return cfg


@dataclass(frozen=True)
class PrivacyPlan:
    """[privacy] resolved against the method and the store: everything the engine needs."""

    mode: str
    sampling: str
    clip: float  # the first round's clip
    noise_multiplier: float  # what the accountant sees (update and count together with adaptive clipping)
    update_multiplier: float  # the update's own noise std / clip
    count_stddev: float  # adaptive clipping's count noise (0: fixed clip)
    target_quantile: float
    clip_lr: float
    released: tuple[tuple[str, tuple[str, ...]], ...]  # the method's (phase, sums keys) parts
    weight: str  # the sums key holding a client's weight
    cohort: int  # clients_per_round: the fixed denominator
    noise_cohort: int  # the cohort the noise is calibrated for (noise_cohort_size, else cohort)
    seen: int  # the seen clients: the sampled population
    rounds: int
    accounting: Any  # engine.accounting.Accounting
    covers: str  # what the guarantee covers (the method's declaration)

    @property
    def parts(self) -> int:
        return len(self.released)

    @property
    def rate(self) -> float:
        return self.cohort / self.seen

    @property
    def noise_scale(self) -> float:
        """Noise on the simulated cohort's sum relative to the deployment's (noise_cohort_size)."""
        return self.cohort / self.noise_cohort

    @property
    def adaptive(self) -> bool:
        return self.target_quantile > 0

    def keys(self, phase: str) -> tuple[str, ...]:
        return tuple(k for p, keys in self.released for k in (keys if p == phase else ()))

    def epsilon(self, rounds: int) -> float:
        return self.accounting.epsilon(self.noise_multiplier, rounds)

    def describe(self) -> dict[str, Any]:
        """What status.json and the start event say about the guarantee."""
        return {"mode": self.mode, "accountant": self.accounting.accountant, "delta": self.accounting.delta,
                "noise_multiplier": self.noise_multiplier, "update_noise_multiplier": self.update_multiplier,
                "clip": self.clip, "adaptive_clip": self.adaptive, "sampling": self.sampling,
                "sampling_rate": self.rate, "denominator": self.cohort, "noise_cohort_size": self.noise_cohort,
                "accounted_population": self.accounting.population, "covers": self.covers}


def method_support(algorithm: str, algo: Any):
    """The method's PrivacySupport, or the one-line refusal."""
    from simfed.algorithms.base import NoPrivacy, PrivacySupport

    support = algo.capabilities.privacy
    if isinstance(support, NoPrivacy):
        raise SimfedError(f"[privacy] with {algorithm}: {support.why}; remove [privacy] or pick a method that "
                          "supports it (fedavg, pefll, ...: docs/privacy.md)")
    if not isinstance(support, PrivacySupport):
        raise SimfedError(f"[privacy] with {algorithm}: the method declares no privacy support "
                          "(Capabilities.privacy); remove [privacy] or pick a method that supports it")
    return support


def _count_split(cfg: PrivacyConfig, sigma: float, parts: int, noise_cohort: int) -> tuple[float, float]:
    """(update multiplier, count std): the noise multiplier split as in Andrew et al.'s Theorem 1."""
    if cfg.target_quantile <= 0:
        return sigma, 0.0
    count = cfg.clip_count_stddev or noise_cohort / 20.0
    if sigma == 0:
        return 0.0, count
    rest = sigma ** -2 - parts * (2.0 * count) ** -2
    if rest <= 0:
        least = math.sqrt(parts) * sigma / 2.0
        raise SimfedError(f"[privacy] clip_count_stddev = {count:g} leaves no noise budget for the update at "
                          f"noise_multiplier {sigma:.4g} with adaptive clipping; it must exceed {least:.4g} "
                          "(raise clip_count_stddev or noise_cohort_size, or lower the noise multiplier)")
    return rest ** -0.5, count


def resolve(exp: Any, seen: int) -> PrivacyPlan:
    """The plan of the experiment's [privacy] for its method and [run] with `seen` seen clients;
    solves target_epsilon for the noise multiplier. Raises SimfedError (one line)."""
    from simfed.algorithms import registry
    from simfed.engine.accounting import Accounting

    cfg, run, algo = exp.privacy, exp.run, registry.get(exp.algorithm)
    support = method_support(exp.algorithm, algo)
    if cfg.mode == "local" and support.no_local:
        raise SimfedError(f"[privacy] mode = \"local\" with {exp.algorithm}: {support.no_local}")
    algo.validate_privacy(exp.algorithm_config)
    cohort = run.clients_per_round
    if cfg.noise_cohort_size and cfg.noise_cohort_size < cohort:
        raise SimfedError(f"[privacy] noise_cohort_size = {cfg.noise_cohort_size} is below clients_per_round = "
                          f"{cohort}; it must be at least the simulated cohort (or 0)")
    noise_cohort = cfg.noise_cohort_size or cohort
    population = round(seen * noise_cohort / cohort)
    accounting = Accounting(accountant=cfg.accountant, kind=cfg.mode if cfg.mode == "local" else cfg.sampling,
                            rate=cohort / seen, population=population, cohort=noise_cohort, delta=cfg.delta)
    sigma = cfg.noise_multiplier
    if sigma is None:
        sigma = accounting.solve(cfg.target_epsilon, run.rounds, MAX_NOISE)
    parts = len(support.released)
    update, count = _count_split(cfg, sigma, parts, noise_cohort)
    return PrivacyPlan(mode=cfg.mode, sampling=cfg.sampling, clip=cfg.clip, noise_multiplier=float(sigma),
                       update_multiplier=float(update), count_stddev=float(count), target_quantile=cfg.target_quantile,
                       clip_lr=cfg.clip_lr, released=support.released, weight=support.weight, cohort=cohort,
                       noise_cohort=noise_cohort, seen=seen, rounds=run.rounds, accounting=accounting,
                       covers=support.covers)
