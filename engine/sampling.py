"""Cohort sampling and the deterministic, size-aware assignment of clients to workers."""

from __future__ import annotations

import heapq
from typing import Mapping, Sequence

import numpy as np

from simfed.algorithms.base import derive_seed


def sample_cohort(seed: int, round: int, client_ids: Sequence[int], k: int) -> list[int]:
    """k clients drawn without replacement from (seed, round) alone; sorted for stable order."""
    ids = np.asarray(client_ids, dtype=np.int64)
    if k >= len(ids):
        return sorted(int(c) for c in ids)
    rng = np.random.default_rng(derive_seed(seed, round, "cohort"))
    return sorted(int(c) for c in rng.choice(ids, size=k, replace=False))


def sample_eval(seed: int, round: int, cohort: str, client_ids: Sequence[int], k: int) -> list[int]:
    if k <= 0 or k >= len(client_ids):
        return sorted(int(c) for c in client_ids)
    rng = np.random.default_rng(derive_seed(seed, round, "eval", cohort))
    return sorted(int(c) for c in rng.choice(np.asarray(client_ids), size=k, replace=False))


def assign(client_ids: Sequence[int], sizes: Mapping[int, float], n_workers: int) -> list[list[int]]:
    """Most expensive client first to the least-loaded worker (ties: lower worker index, lower client id).
    `sizes` is each client's relative cost (Algorithm.cost)."""
    order = sorted(client_ids, key=lambda c: (-float(sizes.get(c, 0)), c))
    heap = [(0, w) for w in range(n_workers)]
    out: list[list[int]] = [[] for _ in range(n_workers)]
    for c in order:
        load, w = heapq.heappop(heap)
        out[w].append(c)
        heapq.heappush(heap, (load + max(float(sizes.get(c, 0)), 1e-9), w))
    return out


def chunked(items: Sequence[int], size: int) -> list[list[int]]:
    return [list(items[i:i + size]) for i in range(0, len(items), size)]


def chunk_size(cohort: int, n_workers: int, requested: int) -> int:
    """Enough chunks per worker to stream results and balance retries, few enough to keep overhead low."""
    if requested > 0:
        return requested
    per_worker = -(-cohort // max(n_workers, 1))
    return int(min(64, max(1, -(-per_worker // 4))))
