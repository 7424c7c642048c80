"""The Gaussian mechanism of [privacy] (engine.privacy): per-client clipping, the noise, the fixed
denominator and adaptive clipping's update. Plain functions on tensors plus the server's small
bookkeeping (`ServerPrivacy`); the serial and Ray backends run them the same way.

Where each step happens:
- a worker clips each client's part of the released update (PrivacySupport: phase, sums keys)
  before the chunk's sums are formed, so the server only ever sees clipped sums; in local mode it
  also adds the client's own noise there, from the client's seeded stream;
- the server clips the per-client terms it computes itself from items (PeFLL's hypernetwork
  gradient), adds the noise to each released sum once, from a generator derived from (run seed,
  round, phase, key), and replaces the weight's sum by the fixed denominator.

The noise is thus a function of the run seed and the round alone: bit-identical on any backend,
worker count, retry and resume. Ours; the mechanism is DP-FedAvg's (arXiv 1710.06963) and the
clip update Andrew et al.'s geometric rule (arXiv 1905.03871).
"""

from __future__ import annotations

import math
from typing import Any, Callable, Mapping, NamedTuple

import torch

from simfed.core.seeds import derive_seed

UNCLIPPED = "privacy.unclipped"  # sums key of adaptive clipping's count (centred: +-1/2 per client and part)
STATE_KEY = "__privacy__"  # the server checkpoint's entry for the adaptive clip
SHRINK = 1.0 - 1e-6  # a clipped part ends strictly inside the bound, whatever the float rounding


class Broadcast(NamedTuple):
    """A private phase's broadcast: the method's message and the round's clip (it moves with
    adaptive clipping, so workers learn it from the server each phase)."""

    message: Any
    clip: float


def part_bound(plan, clip: float) -> float:
    """One part's bound: a round's parts together stay within `clip`."""
    return clip / math.sqrt(plan.parts)


def l2_norm(tensors) -> float:
    """The L2 norm of several tensors taken as one vector, in float64."""
    return math.sqrt(sum(float(t.double().square().sum()) for t in tensors))


def clip_part(part: Mapping[str, torch.Tensor], bound: float) -> tuple[dict[str, torch.Tensor], bool]:
    """The tensors scaled together to L2 norm <= bound (untouched when already within): (clipped,
    whether they were within)."""
    norm = l2_norm(part.values())
    if norm <= bound:
        return dict(part), True
    scale = bound / norm * SHRINK
    return {k: t * scale for k, t in part.items()}, False


def unweighted(sums: Mapping[str, Any], keys, weight: str) -> dict[str, torch.Tensor]:
    """A client's released keys divided by its weight (FedAvg's delta x n / n): its own update."""
    w = float(sums[weight]) if weight in sums else 1.0
    return {k: sums[k] / w if w > 0 else sums[k] for k in keys if k in sums}


def gaussian(like: torch.Tensor, std: float, gen: torch.Generator) -> torch.Tensor:
    return torch.randn(like.shape, generator=gen, dtype=like.dtype) * std


def client_part(plan, sums: Mapping[str, Any], keys, clip: float, noise_seed: tuple | None) -> dict[str, Any]:
    """A client's reply sums with its released keys clipped (unweighted, weight 1), its count bit
    under adaptive clipping, and in local mode its own noise (generator seeded by `noise_seed`)."""
    clipped, within = clip_part(unweighted(sums, keys, plan.weight), part_bound(plan, clip))
    out = {**sums, **clipped, plan.weight: torch.tensor(1.0, dtype=torch.float64)}
    if noise_seed is not None:
        std = plan.update_multiplier * clip
        for k in keys:
            if k in out:
                out[k] = out[k] + gaussian(out[k], std, torch.Generator().manual_seed(derive_seed(*noise_seed, k)))
    if plan.adaptive:
        out[UNCLIPPED] = torch.tensor(0.5 if within else -0.5, dtype=torch.float64)
    return out


class ServerPrivacy:
    """The server's side: the round's clip, the server-computed terms' clipping, the noised release."""

    def __init__(self, plan):
        self.plan = plan
        self.clip = float(plan.clip)
        self._fractions: list[float] = []  # adaptive: the noised unclipped fraction of each part this round

    def wrap(self, phase: str, message: Any, info) -> Any:
        if info.private and self.plan.keys(phase):
            return Broadcast(message, self.clip)
        return message

    def clip_terms(self, terms: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Per-client terms computed on the server, clipped as a worker clips a reply."""
        return client_part(self.plan, dict(terms), tuple(terms), self.clip, None)

    def release(self, phase: str, sums: Mapping[str, Any], zeros: Callable[[], Mapping[str, torch.Tensor]],
                info) -> tuple[dict[str, Any], dict[str, float]]:
        """The phase's sums as released: noise added to each released key (`zeros()` where no client
        contributed), the weight replaced by the fixed denominator; and the round's privacy stats."""
        plan, out = self.plan, dict(sums)
        central = plan.mode == "central"
        std = plan.update_multiplier * self.clip * plan.noise_scale if central else 0.0
        for k in plan.keys(phase):
            total = out[k] if k in out else zeros()[k]
            if std > 0:
                total = total + gaussian(total, std, info.generator("privacy", phase, k))
            out[k] = total
        out[plan.weight] = torch.tensor(float(plan.cohort), dtype=torch.float64)
        stats = {"privacy_clip": self.clip}
        count = out.pop(UNCLIPPED, None)
        if plan.adaptive:
            noised = float(count if count is not None else 0.0)
            noised += float(gaussian(torch.zeros((), dtype=torch.float64), plan.count_stddev * plan.noise_scale,
                                     info.generator("privacy", phase, UNCLIPPED)))
            self._fractions.append(noised / plan.cohort + 0.5)
            stats["privacy_unclipped"] = self._fractions[-1]
            if phase == plan.released[-1][0]:  # the round's last released part: move the clip once
                self.clip = next_clip(self.clip, sum(self._fractions) / len(self._fractions), plan)
                self._fractions = []
        return out, stats

    def state_dict(self) -> dict:
        return {"clip": torch.tensor(self.clip, dtype=torch.float64)} if self.plan.adaptive else {}

    def load_state_dict(self, sd: Mapping[str, Any] | None) -> None:
        if self.plan.adaptive and sd and "clip" in sd:
            self.clip = float(sd["clip"])


def next_clip(clip: float, unclipped: float, plan) -> float:
    """Andrew et al.'s geometric step: grow the clip while fewer than the target quantile fit in it."""
    return clip * math.exp(-plan.clip_lr * (unclipped - plan.target_quantile))
