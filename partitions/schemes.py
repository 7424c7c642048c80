"""Split schemes: which client owns each sample, and each client's train/val/test split.

Client assignment (all seeded, all return an int64 client id per sample, ids 0..clients-1):
- ``natural``: the source's own grouping (LEAF writer); ids in order of first appearance.
- ``iid``: a seeded permutation dealt into near-equal shares.
- ``dirichlet``: per class, proportions ~ Dir(alpha * 1) over clients (the NIID-bench/FedLab
  recipe); redrawn (with derived seeds) until every client has >= ``min_samples`` samples, then,
  if still short, the largest clients donate samples (documented re-balance, keeps it total).
- ``classes``: every client gets exactly k distinct classes (pFedHN/PeFLL protocol). Classes are
  dealt from consecutive seeded permutations of the label set so each class is held by
  clients*k/C clients (+-1); each class's samples are then split over its holders with random
  weights U(0.5, 1.5) (pFedHN draws per-client class proportions the same spirit). Raises if a
  class has fewer samples than holders.

Per-client train/val/test split (``split_within_clients``), used when the source has none:
defaults val 0.15, test 0.15 (train 0.7). n_val = floor(n*val), n_test = floor(n*test), the rest
is train; but train always holds >= 1 sample and one sample of every label the client owns (so a
k-classes client sees its k classes in training), taking them from val/test if needed.
"""

from __future__ import annotations

import numpy as np

from simfed.core import validate
from simfed.core.errors import SimfedError

DEFAULT_VAL_FRACTION = 0.15
DEFAULT_TEST_FRACTION = 0.15
SCHEMES = ("natural", "iid", "dirichlet", "classes")
MAX_CLIENTS = 10_000_000  # bounds per-client tables an argument alone could make huge


def natural(groups: np.ndarray) -> np.ndarray:
    """Map arbitrary group keys to client ids 0..K-1 in order of first appearance."""
    groups = np.asarray(groups)
    _, first, inv = np.unique(groups, return_index=True, return_inverse=True)
    rank = np.empty(len(first), dtype=np.int64)
    rank[np.argsort(first, kind="stable")] = np.arange(len(first))
    return rank[inv.reshape(-1)]


def _check_clients(n: int, clients: int) -> None:
    if clients < 1:
        raise SimfedError(f"--clients must be >= 1, got {clients}")
    if clients > n:
        raise SimfedError(f"cannot split {n} samples over {clients} clients (every client needs "
                          ">= 1 sample); use fewer clients")


def iid(n: int, clients: int, seed: int) -> np.ndarray:
    """Uniform shuffle, then equal shares (sizes differ by at most one)."""
    _check_clients(n, clients)
    perm = np.random.default_rng([seed, 1]).permutation(n)
    out = np.empty(n, dtype=np.int64)
    out[perm] = np.arange(n) % clients
    return out


def dirichlet(labels: np.ndarray, clients: int, alpha: float, seed: int,
              min_samples: int = 1, max_tries: int = 100) -> np.ndarray:
    """Label skew: for each class, its samples go to clients with Dir(alpha) proportions."""
    labels = np.asarray(labels)
    n = len(labels)
    _check_clients(n, clients)
    validate.number("--alpha", alpha, 0.0, 1e6, lo_open=True)
    min_samples = min(min_samples, n // clients)
    classes = np.unique(labels)
    by_class = [np.flatnonzero(labels == c) for c in classes]
    for attempt in range(max_tries):
        rng = np.random.default_rng([seed, 2, attempt])
        out = np.empty(n, dtype=np.int64)
        for idx in by_class:
            idx = rng.permutation(idx)
            p = rng.dirichlet(np.full(clients, alpha))
            cuts = (np.cumsum(p)[:-1] * len(idx)).astype(np.int64)
            out[idx] = np.repeat(np.arange(clients), np.diff(np.concatenate(([0], cuts,
                                                                             [len(idx)]))))
        if np.bincount(out, minlength=clients).min() >= min_samples:
            return out
    # Small alpha with many clients rarely fills everyone: move samples from the largest clients.
    counts = np.bincount(out, minlength=clients)
    for c in np.flatnonzero(counts < min_samples):
        while counts[c] < min_samples:
            donor = int(np.argmax(counts))
            i = rng.choice(np.flatnonzero(out == donor))
            out[i] = c
            counts[donor] -= 1
            counts[c] += 1
    return out


def classes(labels: np.ndarray, clients: int, k: int, seed: int) -> np.ndarray:
    """Every client gets exactly k distinct classes; each class is split over its holders."""
    labels = np.asarray(labels)
    n = len(labels)
    _check_clients(n, clients)
    label_set = np.unique(labels)
    C = len(label_set)
    if not 1 <= k <= C:
        raise SimfedError(f"--classes-per-client must be in 1..{C} (classes present), got {k}")
    rng = np.random.default_rng([seed, 3])
    # Deal classes from a stream of permutations; skip a class the client already holds.
    stream: list[int] = []
    held = np.zeros((clients, k), dtype=np.int64)
    for client in range(clients):
        got: list[int] = []
        while len(got) < k:
            if not stream:
                stream = list(rng.permutation(C))
            for j, c in enumerate(stream):
                if c not in got:
                    got.append(int(stream.pop(j)))
                    break
            else:  # every remaining class in the stream is already held: refill
                stream.extend(rng.permutation(C).tolist())
        held[client] = got
    out = np.empty(n, dtype=np.int64)
    for ci, c in enumerate(label_set):
        holders = np.flatnonzero((held == ci).any(axis=1))
        idx = rng.permutation(np.flatnonzero(labels == c))
        if len(holders) == 0:
            # A class nobody holds (clients*k < C) is dropped from the federation: mark it.
            out[idx] = -1
            continue
        if len(idx) < len(holders):
            raise SimfedError(f"class {c} has {len(idx)} samples but {len(holders)} clients "
                              "hold it; use fewer clients or classes per client")
        w = rng.uniform(0.5, 1.5, len(holders))
        # One sample per holder first, the rest by weight: every holder really has the class.
        extra = len(idx) - len(holders)
        cuts = (np.cumsum(w / w.sum())[:-1] * extra).astype(np.int64)
        sizes = 1 + np.diff(np.concatenate(([0], cuts, [extra])))
        out[idx] = np.repeat(holders, sizes)
    return out


def check_fractions(val_fraction: float, test_fraction: float, unseen_fraction: float | None = None) -> None:
    """Finite fractions in [0, 1) with val + test < 1 (NaN would silently mean 'none')."""
    validate.fraction("--val-fraction", val_fraction)
    validate.fraction("--test-fraction", test_fraction)
    if val_fraction + test_fraction >= 1:
        raise SimfedError(f"val/test fractions must sum to < 1, got {val_fraction} and {test_fraction}")
    if unseen_fraction is not None:
        validate.fraction("--unseen-fraction", unseen_fraction)


def check_assign_args(scheme: str, *, clients: int, seed: int, alpha: float | None = None,
                      classes_per_client: int | None = None) -> None:
    """Everything `assign` needs that can be checked before the data is read."""
    if scheme not in SCHEMES:
        raise SimfedError(f"unknown scheme {scheme!r}; choose one of {', '.join(SCHEMES)}")
    validate.integer("--clients", clients, 1, MAX_CLIENTS)
    validate.seed("--seed", seed)
    if scheme == "dirichlet":
        if alpha is None:
            raise SimfedError("--scheme dirichlet needs --alpha (e.g. 0.1 strong skew, 100 ~iid)")
        validate.number("--alpha", alpha, 0.0, 1e6, lo_open=True)
    if scheme == "classes":
        if classes_per_client is None:
            raise SimfedError("--scheme classes needs --classes-per-client K")
        validate.integer("--classes-per-client", classes_per_client, 1, MAX_CLIENTS)


def split_within_clients(client_of: np.ndarray, labels: np.ndarray, seed: int,
                         val_fraction: float = DEFAULT_VAL_FRACTION,
                         test_fraction: float = DEFAULT_TEST_FRACTION) -> np.ndarray:
    """Per-client seeded train/val/test split; returns codes 0=train, 1=val, 2=test."""
    check_fractions(val_fraction, test_fraction)
    client_of = np.asarray(client_of, dtype=np.int64)
    labels = np.asarray(labels, dtype=np.int64)
    n = len(client_of)
    if n == 0:
        return np.zeros(0, dtype=np.int8)
    rng = np.random.default_rng([seed, 4])
    r1, r2 = rng.random(n), rng.random(n)
    # A random representative of each (client, label) goes first so train covers every label.
    o = np.lexsort((r1, labels, client_of))
    rep = np.zeros(n, dtype=bool)
    rep[o[np.r_[True, (client_of[o][1:] != client_of[o][:-1]) |
                (labels[o][1:] != labels[o][:-1])]]] = True
    order = np.lexsort((r2, ~rep, client_of))
    ids, start, count = np.unique(client_of[order], return_index=True, return_counts=True)
    distinct = np.bincount(np.searchsorted(ids, client_of[rep]), minlength=len(ids))
    n_val = np.floor(count * val_fraction).astype(np.int64)
    n_test = np.floor(count * test_fraction).astype(np.int64)
    n_train = np.maximum(count - n_val - n_test, np.minimum(count, np.maximum(distinct, 1)))
    n_val = np.minimum(n_val, count - n_train)
    cid = np.searchsorted(ids, client_of[order])
    rank = np.arange(n) - start[cid]
    codes = np.where(rank < n_train[cid], 0, np.where(rank < (n_train + n_val)[cid], 1, 2))
    out = np.empty(n, dtype=np.int8)
    out[order] = codes
    return out


def assign(scheme: str, labels: np.ndarray, *, clients: int, seed: int,
           classes_per_client: int | None = None, alpha: float | None = None,
           groups: np.ndarray | None = None) -> np.ndarray:
    """Dispatch by scheme name (the CLI's --scheme)."""
    if scheme == "natural":
        if groups is None:
            raise SimfedError("scheme 'natural' needs a source with writers (e.g. LEAF)")
        return natural(groups)
    if scheme == "iid":
        return iid(len(labels), clients, seed)
    if scheme == "dirichlet":
        if alpha is None:
            raise SimfedError("--scheme dirichlet needs --alpha (e.g. 0.1 strong skew, 100 ~iid)")
        return dirichlet(labels, clients, alpha, seed)
    if scheme == "classes":
        if classes_per_client is None:
            raise SimfedError("--scheme classes needs --classes-per-client K")
        return classes(labels, clients, classes_per_client, seed)
    raise SimfedError(f"unknown scheme {scheme!r}; choose one of {', '.join(SCHEMES)}")
