"""Writing a natural (one client per writer) store from per-writer arrays: shared by the importers of
FEMNIST as Flower (Hugging Face Parquet) and TFF (HDF5) distribute it.

An importer collects, per writer name, a list of (x uint8 (n, 28, 28), y int64, code) parts, with
code 0 for rows of a train file and 2 for rows of a test file. Client ids are 0..W-1 in order of
first appearance; the clients table keeps the writer's name. Without a source test split, rows are
split per writer with schemes.split_within_clients (0.7/0.15/0.15 by default); with one, the source's
test rows are the store's test split exactly and val is carved from the train rows (default 0), as
the LEAF importer does.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

import numpy as np

from simfed.core.errors import SimfedError
from simfed.partitions import schemes
from simfed.partitions.writer import StoreWriter

Parts = dict[str, list[tuple[np.ndarray, np.ndarray, int]]]


def refuse_existing(out: str | os.PathLike, overwrite: bool) -> None:
    """Fail before reading any input when OUT exists (inputs can be gigabytes)."""
    if Path(out).exists() and not overwrite:
        raise SimfedError(f"{out}: output already exists; remove it, choose another path or pass --overwrite")


def write_by_writer(out: str | os.PathLike, parts: Parts, *, src: str, classes: list[str], split_layout: bool,
                    val_fraction: float | None, test_fraction: float | None, unseen_fraction: float, seed: int,
                    overwrite: bool, source: dict, what: str = "writer", layout: dict | None = None,
                    client_codes: Callable[[list], np.ndarray] | None = None, step: int = 200) -> str:
    """One client per key of `parts` (a writer, a role), ids in order of first appearance.
    `layout`: the StoreWriter's sample keywords (default 28x28 grey images); `client_codes`: a
    client's split codes from its parts (default: the seeded per-client split described above)."""
    if not parts:
        raise SimfedError(f"{src}: no samples found")
    no_train = [w for w, p in parts.items() if not any(code == 0 for _, _, code in p)]
    if no_train:
        raise SimfedError(f"{src}: {what} {no_train[0]!r} has test rows but no train rows; every client needs "
                          ">= 1 train sample")
    writers = list(parts)
    names = dict(enumerate(writers))
    with StoreWriter(out, classes=classes, overwrite=overwrite, source=source,
                     **(layout or {"sample_shape": (1, 28, 28)})) as w:
        for lo in range(0, len(writers), step):
            chunk = range(lo, min(lo + step, len(writers)))
            items = [(c, p) for c in chunk for p in parts[writers[c]]]
            x = np.concatenate([p[0] for _, p in items])
            y = np.concatenate([p[1] for _, p in items])
            client = np.concatenate([np.full(len(p[1]), c) for c, p in items])
            if client_codes is not None:
                code = np.concatenate([client_codes(parts[writers[c]]) for c in chunk])
            else:
                code = _seeded_codes(items, client, y, split_layout, seed + lo, val_fraction, test_fraction)
            w.add(x.reshape(-1, *w.sample_shape), y, client, code, names)
            for c in chunk:  # free as we go: the store now holds these rows
                del parts[writers[c]]
        return w.finish(unseen_fraction=unseen_fraction, seed=seed)


def _seeded_codes(items, client: np.ndarray, y: np.ndarray, split_layout: bool, seed: int,
                  val_fraction: float | None, test_fraction: float | None) -> np.ndarray:
    """Split codes of a chunk's rows: the source's train/test kept (val carved from train), or a
    seeded per-client split."""
    code = np.concatenate([np.full(len(p[1]), p[2], np.int8) for _, p in items])
    if split_layout:
        tr = code == 0
        code[tr] = schemes.split_within_clients(client[tr], y[tr], seed, val_fraction or 0.0, 0.0)
        return code
    return schemes.split_within_clients(
        client, y, seed, schemes.DEFAULT_VAL_FRACTION if val_fraction is None else val_fraction,
        schemes.DEFAULT_TEST_FRACTION if test_fraction is None else test_fraction)


def check_labels(y: np.ndarray, num_classes: int, where: str) -> np.ndarray:
    """Integer labels in 0..num_classes-1, as int64; one SimfedError line otherwise."""
    y = np.asarray(y)
    if y.dtype.kind not in "iu":
        if y.dtype.kind != "f" or not np.all(np.isfinite(y)) or not np.all(y == np.round(y)):
            raise SimfedError(f"{where}: labels must be integers, got {y.dtype}")
    bad = y[(y < 0) | (y >= num_classes)]
    if len(bad):
        raise SimfedError(f"{where}: label {int(bad[0])} out of range 0..{num_classes - 1}")
    return y.astype(np.int64)
