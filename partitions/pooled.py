"""Writing a store from pooled in-memory samples split over clients by a scheme: shared by the IDX,
CIFAR and arrays importers.

The source's own train/test files are pooled by the importer; here the scheme (schemes.assign)
gives each sample a client, a sample of a class no client holds ('classes' with clients * k < C)
is dropped, each client's samples are split into train/val/test (schemes.split_within_clients),
and the rows are written ~100 clients per chunk (so the progress bar moves and batches stay
moderate). ``check_args`` is everything that can be refused before the source is read.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from simfed.core.errors import SimfedError
from simfed.core.safeio import check_output
from simfed.partitions import schemes
from simfed.partitions.progress import progress_bar
from simfed.partitions.writer import StoreWriter

CHUNK_CLIENTS = 100
LABELS = ("keep", "compact")
Note = Callable[[str], None]


def check_args(out, overwrite: bool, sources, *, scheme: str, clients: int, seed: int, alpha: float | None,
               classes_per_client: int | None, val_fraction: float, test_fraction: float,
               unseen_fraction: float, labels: str | None = None) -> None:
    """Every argument and the output path, checked before the (possibly large) source is read."""
    if labels is not None and labels not in LABELS:
        raise SimfedError(f"labels must be 'keep' or 'compact' (--keep-labels / --compact-labels), got {labels!r}")
    schemes.check_assign_args(scheme, clients=clients, seed=seed, alpha=alpha,
                              classes_per_client=classes_per_client)
    schemes.check_fractions(val_fraction, test_fraction, unseen_fraction)
    check_output(out, overwrite, sources)


def label_space(y: np.ndarray, classes: list[str], *, derived: bool, labels: str | None, where: str,
                note: Note | None) -> tuple[np.ndarray, list[str]]:
    """The classes a store gets when some of 0..K-1 have no sample: `labels` "compact" renumbers the
    labels that occur 0..k-1 (class names keep the original labels), "keep" keeps all K. Unset, a
    label space taken from max(y) (`derived`) that is mostly empty is refused: one label of 255 among
    ten classes is far likelier a corrupt or foreign file than 246 classes. One note either way."""
    used = np.unique(y)
    empty = len(classes) - len(used)
    say = note or (lambda text: None)
    if empty == 0:
        return y, classes
    span = f"{len(used)} of the {len(classes)} labels 0..{len(classes) - 1} occur"
    if labels == "compact":
        say(f"{where}: {span}; renumbered them 0..{len(used) - 1} (--compact-labels), class names keep the "
            "original labels")
        return np.searchsorted(used, y).astype(np.int64), [classes[int(i)] for i in used]
    if labels is None and derived and 2 * empty > len(classes):
        raise SimfedError(f"{where}: {span} ({empty} classes would be empty); pass --compact-labels to renumber "
                          f"them 0..{len(used) - 1}, or --keep-labels to keep all {len(classes)}")
    missing = np.setdiff1d(np.arange(len(classes)), used)[:5].tolist()
    hint = "" if labels == "keep" else f"; --compact-labels renumbers the {len(used)} that occur"
    say(f"{where}: {span}; the store keeps all {len(classes)} classes, {empty} of them empty (e.g. "
        f"{', '.join(map(str, missing))}){hint}")
    return y, classes


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
