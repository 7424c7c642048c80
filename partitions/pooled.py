"""Writing a store from pooled in-memory samples split over clients by a scheme: shared by the IDX,
CIFAR and arrays importers.

The source's own train/test files are pooled by the importer; here the scheme (schemes.assign)
gives each sample a client, a sample of a class no client holds ('classes' with clients * k < C)
is dropped, each client's samples are split into train/val/test (schemes.split_within_clients),
and the rows are written ~100 clients per chunk (so the progress bar moves and batches stay
moderate). ``check_args`` is everything that can be refused before the source is read.
"""

from __future__ import annotations

import numpy as np

from simfed.core.safeio import check_output
from simfed.partitions import schemes
from simfed.partitions.progress import progress_bar
from simfed.partitions.writer import StoreWriter

CHUNK_CLIENTS = 100


def check_args(out, overwrite: bool, sources, *, scheme: str, clients: int, seed: int, alpha: float | None,
               classes_per_client: int | None, val_fraction: float, test_fraction: float,
               unseen_fraction: float) -> None:
    """Every argument and the output path, checked before the (possibly large) source is read."""
    schemes.check_assign_args(scheme, clients=clients, seed=seed, alpha=alpha,
                              classes_per_client=classes_per_client)
    schemes.check_fractions(val_fraction, test_fraction, unseen_fraction)
    check_output(out, overwrite, sources)


def write_by_scheme(out, x: np.ndarray, y: np.ndarray, *, classes: list[str], scheme: str, clients: int,
                    seed: int, classes_per_client: int | None = None, alpha: float | None = None,
                    groups: np.ndarray | None = None, names: dict[int, str] | None = None,
                    unseen_fraction: float = 0.1, val_fraction: float = schemes.DEFAULT_VAL_FRACTION,
                    test_fraction: float = schemes.DEFAULT_TEST_FRACTION, source: dict | None = None,
                    overwrite: bool = False, progress: bool = False, dtype: str = "uint8",
                    input: str | None = None, vocab: list[str] | None = None) -> str:
    """Assign clients, split each client, write the store at OUT; returns OUT."""
    client_of = schemes.assign(scheme, y, clients=clients, seed=seed, classes_per_client=classes_per_client,
                               alpha=alpha, groups=groups)
    keep = client_of >= 0  # 'classes' drops classes that no client holds
    if not keep.all():
        x, y, client_of = x[keep], y[keep], client_of[keep]
    split = schemes.split_within_clients(client_of, y, seed, val_fraction, test_fraction)
    order = np.argsort(client_of, kind="stable")
    with StoreWriter(out, classes=classes, sample_shape=x.shape[1:], dtype=dtype, input=input, vocab=vocab,
                     overwrite=overwrite, source=source) as w:
        ids, starts = np.unique(client_of[order], return_index=True)
        bounds = np.append(starts, len(order))
        with progress_bar(progress, "writing clients", len(ids)) as advance:
            for i in range(0, len(ids), CHUNK_CLIENTS):
                j = min(i + CHUNK_CLIENTS, len(ids))
                rows = order[bounds[i]:bounds[j]]
                w.add(x[rows], y[rows], client_of[rows], split[rows], names)
                advance(j - i)
        return w.finish(unseen_fraction=unseen_fraction, seed=seed)
