"""Privacy accounting with Google's dp-accounting (RDP or PLD): the DpEvent of one round, epsilon
after r rounds, and the noise multiplier that reaches a target epsilon.

Nothing here bounds privacy by hand. One round is one dp-accounting event:
- Poisson sampling: PoissonSampledDpEvent(q, GaussianDpEvent(noise_multiplier)), add/remove-one
  neighbours (a client's clipped contribution is in the sum or not: sensitivity clip);
- fixed-size sampling: SampledWithoutReplacementDpEvent(population, cohort,
  GaussianDpEvent(noise_multiplier / 2)) under replace-one neighbours (RDP only): replacing one
  client moves the sum by up to 2 x clip, so the noise is noise_multiplier / 2 times that
  sensitivity;
- local DP: GaussianDpEvent(noise_multiplier / 2) per round, for one client's own report (its
  data may change arbitrarily: sensitivity 2 x clip), every round (no amplification: the server
  sees who reports).
r rounds are SelfComposedDpEvent(event, r), given to a fresh RdpAccountant or PLDAccountant
(default orders and discretization), and get_epsilon(delta) answers; for PLD with Poisson
sampling, one round's PLD is built once per noise multiplier (dp-accounting's own
from_gaussian_mechanism, as PLDAccountant builds it) and self-composed r times, because building
it is what costs seconds. The target-epsilon search
is dp-accounting's calibrate_dp_mechanism over a bracket found here.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
from dataclasses import dataclass
from typing import Iterator

from simfed.core.errors import SimfedError


def dp_accounting():
    """The dp-accounting package, or one line saying how to install it."""
    try:
        import dp_accounting as dpa
    except ImportError:
        raise SimfedError("[privacy] needs Google's dp-accounting package; install it with "
                          "pip install 'simfed[privacy]' (or pip install dp-accounting)") from None
    return dpa


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """The RDP accountant logs a warning for each fractional order whose series does not converge
    (it then leaves that order out, which only loosens the bound): noise on the user's terminal."""
    log = logging.getLogger("absl")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        log.setLevel(level)


@functools.lru_cache(maxsize=4)
def _poisson_pld(rate: float, sigma: float):
    """One round's PLD of the Poisson-subsampled Gaussian, as dp-accounting's PLDAccountant builds it
    (its default discretization, add/remove neighbours)."""
    from dp_accounting.pld import privacy_loss_distribution

    return privacy_loss_distribution.from_gaussian_mechanism(standard_deviation=sigma, sampling_prob=rate,
                                                             value_discretization_interval=1e-4)


@dataclass(frozen=True)
class Accounting:
    accountant: str  # "rdp" or "pld"
    kind: str  # "poisson", "fixed" (sampling without replacement) or "local"
    rate: float  # Poisson sampling rate q
    population: int  # fixed-size sampling: the population sampled from
    cohort: int  # fixed-size sampling: clients per round
    delta: float

    def round_event(self, sigma: float):
        dpa = dp_accounting()
        if self.kind == "poisson":
            return dpa.PoissonSampledDpEvent(self.rate, dpa.GaussianDpEvent(sigma))
        if self.kind == "fixed":
            return dpa.SampledWithoutReplacementDpEvent(self.population, self.cohort, dpa.GaussianDpEvent(sigma / 2))
        return dpa.GaussianDpEvent(sigma / 2)

    def event(self, sigma: float, rounds: int):
        return dp_accounting().SelfComposedDpEvent(self.round_event(sigma), rounds)

    def fresh(self):
        """A new accountant of the chosen kind, with the neighbouring relation its event needs."""
        dpa = dp_accounting()
        if self.accountant == "pld":
            return dpa.pld.PLDAccountant()
        relation = dpa.NeighboringRelation
        return dpa.rdp.RdpAccountant(neighboring_relation=relation.REPLACE_ONE if self.kind == "fixed"
                                     else relation.ADD_OR_REMOVE_ONE)

    def epsilon(self, sigma: float, rounds: int) -> float:
        """Epsilon at delta after `rounds` rounds of noise multiplier `sigma` (inf without noise)."""
        if rounds <= 0:
            return 0.0
        with _quiet():
            if self.accountant == "pld" and self.kind == "poisson" and sigma > 0:
                # What PLDAccountant computes, less its rebuilding of one round's PLD at every call
                # (seconds each; the loop asks after every round). Equal to it to ~1e-12 relative.
                return float(_poisson_pld(self.rate, sigma).self_compose(rounds).get_epsilon_for_delta(self.delta))
            return float(self.fresh().compose(self.event(sigma, rounds)).get_epsilon(self.delta))

    def solve(self, target: float, rounds: int, most: float) -> float:
        """The least noise multiplier (to 1e-3) whose epsilon after `rounds` rounds is at most `target`;
        SimfedError if even `most` does not reach it."""
        least = self.epsilon(most, rounds)
        if not least <= target:
            raise SimfedError(f"[privacy] target_epsilon = {target:g}: no noise_multiplier up to {most:g} reaches it "
                              f"in {rounds} rounds at delta {self.delta:g} with the {self.accountant} accountant (the "
                              f"least epsilon is {least:.4g}); raise target_epsilon or delta, or run fewer rounds")
        hi = 1.0
        while self.epsilon(hi, rounds) > target:
            hi = min(2.0 * hi, most)
        lo = hi / 2.0
        while self.epsilon(lo, rounds) <= target:
            if lo < 1e-3:
                return lo  # a target this loose needs next to no noise
            hi, lo = lo, lo / 2.0
        dpa = dp_accounting()
        with _quiet():
            sigma = dpa.calibrate_dp_mechanism(self.fresh, lambda s: self.event(s, rounds), target, self.delta,
                                               dpa.ExplicitBracketInterval(lo, hi), tol=1e-3)
        return float(sigma) if math.isfinite(sigma) else most
