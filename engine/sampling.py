"""Cohort sampling, and cutting a cohort into the chunks whose order fixes every reduction."""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np

from simfed.core.seeds import derive_seed


def sample_cohort(seed: int, round: int, client_ids: Sequence[int], k: int) -> list[int]:
    """k clients drawn without replacement from (seed, round) alone; sorted for stable order."""
    ids = np.asarray(client_ids, dtype=np.int64)
    if k >= len(ids):
        return sorted(int(c) for c in ids)
    rng = np.random.default_rng(derive_seed(seed, round, "cohort"))
    return sorted(int(c) for c in rng.choice(ids, size=k, replace=False))


def sample_poisson(seed: int, round: int, client_ids: Sequence[int], rate: float) -> list[int]:
    """Each client independently with probability `rate`, from (seed, round) alone; sorted. The
    cohort size varies (it may be 0): what the subsampled-Gaussian accounting of [privacy] assumes."""
    ids = np.sort(np.asarray(client_ids, dtype=np.int64))
    rng = np.random.default_rng(derive_seed(seed, round, "cohort", "poisson"))
    return [int(c) for c in ids[rng.random(len(ids)) < rate]]


def sample_eval(seed: int, round: int, cohort: str, client_ids: Sequence[int], k: int) -> list[int]:
    if k <= 0 or k >= len(client_ids):
        return sorted(int(c) for c in client_ids)
    rng = np.random.default_rng(derive_seed(seed, round, "eval", cohort))
    return sorted(int(c) for c in rng.choice(np.asarray(client_ids), size=k, replace=False))


def chunk_size(cohort: int, requested: int = 0) -> int:
    """Clients per chunk, from the cohort size alone: the pool size must not change how a cohort is
    cut, since the cut fixes the order of every float sum. 0 asks for about 64 chunks (enough to
    stream results and balance up to a few dozen workers), at most 64 clients each."""
    if requested > 0:
        return int(requested)
    return int(min(64, max(1, -(-cohort // 64))))


def plan_chunks(client_ids: Sequence[int], sizes: Mapping[int, float], requested: int = 0) -> list[list[int]]:
    """The cohort cut into consecutive chunks of `chunk_size`, most expensive chunk first (ties: cohort
    order). `sizes` is each client's relative cost (Algorithm.cost). This list order is both the
    order chunks are handed out and the order the server folds their results, on every backend, so a
    phase's result depends only on the cohort; costly chunks first keep the last ones short."""
    ids = list(client_ids)
    size = chunk_size(len(ids), requested)
    chunks = [ids[i:i + size] for i in range(0, len(ids), size)]
    cost = [sum(max(float(sizes.get(c, 0)), 1e-9) for c in ch) for ch in chunks]
    return [chunks[i] for i in sorted(range(len(chunks)), key=lambda i: (-cost[i], i))]
