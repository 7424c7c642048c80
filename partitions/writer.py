"""Writing a partition store: streamed by whole clients, atomic (temp dir + rename).

The layout is described in ``simfed.partitions.store``. ``StoreWriter`` takes chunks of whole
clients in increasing id order (so no global sort and no full materialization is needed: the
synthetic generator streams 128 writers at a time); ``write_store`` is the one-shot wrapper for
in-memory arrays. Every client must have >= 1 train row; violations raise SimfedError and leave
nothing behind. Batches in the split files are cut only at client boundaries, which is what makes
reads zero-copy slices of one batch. Samples are any fixed shape of uint8, int32 or float32
(simfed.partitions.dtypes): a row is the sample's little-endian bytes.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import uuid
from pathlib import Path
from typing import Iterable

import numpy as np
import pyarrow as pa
import pyarrow.ipc as ipc
import pyarrow.parquet as pq

from simfed.core import validate
from simfed.core.errors import SimfedError
from simfed.core.safeio import check_output, missing_parents
from simfed.partitions import dtypes
from simfed.partitions.dtypes import MAX_SAMPLE_BYTES  # noqa: F401  (kept importable from here)

FORMAT_VERSION = 1
SPLITS = ("train", "val", "test")
SPLIT_FILES = {s: f"{s}.arrow" for s in SPLITS}
MANIFEST = "manifest.json"
CLIENTS = "clients.parquet"
# Batches are cut at the first client boundary after this many pixel bytes: big enough that
# per-batch metadata is negligible, small enough to stream the synthetic build.
BATCH_BYTES = 32 << 20
# Bound on what a store (and so an importer) may describe: a label of 2e9 would otherwise make
# 2e9 class names (the bound on bytes per sample is dtypes.MAX_SAMPLE_BYTES).
MAX_CLASSES = 100_000


def _split_codes(split_of: np.ndarray) -> np.ndarray:
    """Accept "train"/"val"/"test" strings or codes 0/1/2; return int8 codes."""
    s = np.asarray(split_of)
    if s.dtype.kind in "USO":
        codes = np.full(s.shape, -1, dtype=np.int8)
        for i, name in enumerate(SPLITS):
            codes[s == name] = i
    else:
        codes = s.astype(np.int8)
    if codes.size and (codes.min() < 0 or codes.max() > 2):
        raise SimfedError("split_of must contain only 'train', 'val', 'test' (or codes 0, 1, 2)")
    return codes


def choose_unseen(client_ids: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """Seeded shuffle of the clients; the first round(fraction * K) are unseen (>= 1 stays seen)."""
    validate.fraction("--unseen-fraction", fraction)
    validate.seed("--seed", seed)
    ids = np.asarray(client_ids, dtype=np.int64)
    k = min(int(round(fraction * len(ids))), max(len(ids) - 1, 0))
    order = np.random.default_rng([seed, 0x5EE4]).permutation(len(ids))
    return np.sort(ids[order[:k]])


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(8 << 20):
            h.update(chunk)
    return h.hexdigest()


class StoreWriter:
    """Streams whole clients into a new store; ``finish`` writes tables and renames into place.

    Chunks passed to ``add`` must hold *whole* clients whose ids are all larger than any id of an
    earlier chunk (the files are sorted by client without a global sort). Use as a context
    manager: on an exception the temp dir is removed and OUT is untouched.

    ``dtype`` ("uint8", "int32", "float32"), ``input`` ("unit", "raw", "tokens"; default from the
    dtype and vocab, dtypes.default_input) and ``vocab`` (token strings, with "tokens") are
    recorded in the manifest; the defaults describe the (C, H, W) uint8 images of old stores.
    """

    def __init__(self, out: str | os.PathLike, *, classes: list[str], sample_shape=(1, 28, 28),
                 dtype: str = "uint8", input: str | None = None, vocab: list[str] | None = None,
                 overwrite: bool = False, source: dict | None = None):
        self.out = check_output(out, overwrite)
        self.classes = [str(c) for c in classes]
        if not 1 <= len(self.classes) <= MAX_CLASSES:
            raise SimfedError(f"{out}: {len(self.classes)} classes; a store holds 1 to {MAX_CLASSES}")
        self.sample_shape = tuple(int(v) for v in sample_shape)
        self.vocab = [str(t) for t in vocab] if vocab is not None else None
        self.input = dtypes.default_input(dtype, self.vocab) if input is None else input
        dtypes.check_kind(self.sample_shape, dtype, self.input, self.vocab, str(out))
        self.dtype = dtype
        self.row_bytes = dtypes.row_bytes(self.sample_shape, dtype)
        self.overwrite = overwrite
        self.source = dict(source or {})
        self.tmp = self.out.parent / f".{self.out.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        # The output's missing parents, created now as mkdir -p would; abort() removes them again
        # (if still empty), so a failed import leaves the filesystem as it found it.
        self._made = missing_parents(self.out.absolute())
        try:
            for d in reversed(self._made):
                d.mkdir(exist_ok=True)
            self.tmp.mkdir()
        except OSError as exc:  # read-only directory or filesystem, quota, ...
            self._remove_made()
            raise SimfedError(f"{self.out.parent}: cannot create the output there ({exc.strerror}); "
                              "choose a directory you can write") from None
        self.schema = pa.schema([("x", pa.binary(self.row_bytes)), ("y", pa.int64())])
        self._sinks = {}
        self._writers = {}
        for s in SPLITS:
            self._sinks[s] = pa.OSFile(str(self.tmp / SPLIT_FILES[s]), "wb")
            self._writers[s] = ipc.new_file(self._sinks[s], self.schema)
        self._rows = {s: 0 for s in SPLITS}
        self._meta: list[dict[str, np.ndarray]] = []
        self._names: list[np.ndarray] = []
        self._last_id = None
        self._done = False

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None:
            self.abort()
        return False

    def abort(self) -> None:
        """Close and remove everything written so far."""
        for w in self._writers.values():
            try:
                w.close()
            except Exception:  # already failed: cleanup must not mask the original error
                pass
        for s in self._sinks.values():
            try:
                s.close()
            except Exception:
                pass
        shutil.rmtree(self.tmp, ignore_errors=True)
        self._remove_made()
        self._done = True

    def _remove_made(self) -> None:
        for d in self._made:  # innermost first; a parent that something else wrote into stays
            try:
                d.rmdir()
            except OSError:
                break

    def add(self, x: np.ndarray, y: np.ndarray, client_of: np.ndarray, split_of: np.ndarray,
            names: dict[int, str] | None = None) -> None:
        """Append rows of whole clients (ids greater than every earlier chunk's)."""
        x = np.asarray(x)
        y = np.asarray(y)
        client_of = np.asarray(client_of).astype(np.int64, copy=False)
        codes = _split_codes(split_of)
        n = len(y)
        x = dtypes.as_dtype(x, self.dtype, "StoreWriter.add")
        if not (len(x) == n == len(client_of) == len(codes)):
            raise SimfedError("x, y, client_of and split_of must have the same length")
        if math.prod(x.shape[1:]) != math.prod(self.sample_shape):
            raise SimfedError(f"x has sample shape {x.shape[1:]}, expected {self.sample_shape}")
        if n == 0:
            return
        bad = dtypes.first_bad_row(x, self.input, len(self.vocab or ()))
        if bad is not None:
            raise SimfedError(f"{self.out}: sample {bad[0]} of this chunk: {bad[1]}; a store holds finite "
                              "values and in-vocabulary tokens only")
        if y.dtype.kind not in "iu":
            raise SimfedError(f"labels must be integers, got {y.dtype}")
        if y.min() < 0 or y.max() >= len(self.classes):
            raise SimfedError(f"labels out of range: found {y.min()}..{y.max()}, expected "
                              f"0..{len(self.classes) - 1}")
        if self._last_id is not None and client_of.min() <= self._last_id:
            raise SimfedError("StoreWriter.add: client ids must increase from chunk to chunk")
        # Sort by (client, split) stable so each split's rows are grouped by client in order.
        order = np.lexsort((codes, client_of))
        x = np.ascontiguousarray(x.reshape(n, -1)[order]).view(np.uint8)  # (n, row_bytes), little-endian
        y = y[order].astype(np.int64)
        client_of = client_of[order]
        codes = codes[order]
        ids, first = np.unique(client_of, return_index=True)
        self._last_id = int(ids[-1])
        local = np.searchsorted(ids, client_of)
        meta = {"client_id": ids}
        for i, s in enumerate(SPLITS):
            sel = codes == i
            cnt = np.bincount(local[sel], minlength=len(ids)).astype(np.int64)
            meta[f"n_{s}"] = cnt
            meta[f"{s}_offset"] = self._rows[s] + np.concatenate(([0], np.cumsum(cnt)[:-1]))
            if sel.any():
                self._write_rows(s, x[sel], y[sel], np.cumsum(cnt))
            self._rows[s] += int(cnt.sum())
            if s == "train":
                pairs = np.unique(local[sel] * len(self.classes) + y[sel])
                meta["n_classes"] = np.bincount(pairs // len(self.classes),
                                                minlength=len(ids)).astype(np.int64)
        self._meta.append(meta)
        nm = np.array([str(names.get(int(c), c)) if names else str(c) for c in ids], dtype=object)
        self._names.append(nm)

    def _write_rows(self, split: str, x: np.ndarray, y: np.ndarray, ends: np.ndarray) -> None:
        """Write rows as record batches cut only at client ends (``ends`` = cumulative rows)."""
        per_row = self.row_bytes
        start = 0
        while start < len(y):
            # Smallest client end past the byte budget (or the last one).
            limit = start + max(BATCH_BYTES // per_row, 1)
            k = np.searchsorted(ends, limit, side="left")
            stop = int(ends[min(k, len(ends) - 1)])
            xb = pa.FixedSizeBinaryArray.from_buffers(
                pa.binary(per_row), stop - start, [None, pa.py_buffer(x[start:stop])])
            batch = pa.record_batch([xb, pa.array(y[start:stop], type=pa.int64())],
                                    schema=self.schema)
            self._writers[split].write_batch(batch)
            start = stop

    def _manifest(self, clients: int, unseen: int, names: list[str]) -> dict:
        return {
            "format_version": FORMAT_VERSION,
            "classes": self.classes,
            "num_classes": len(self.classes),
            "sample_shape": list(self.sample_shape),
            "dtype": self.dtype,
            "input": self.input,
            **({"vocab": self.vocab} if self.input == "tokens" else {}),
            "counts": {**{s: self._rows[s] for s in SPLITS}, "total": sum(self._rows.values()),
                       "clients": int(clients), "unseen": int(unseen), "seen": int(clients - unseen)},
            "files": {n: _sha256(self.tmp / n) for n in names},
            "file_sizes": {n: (self.tmp / n).stat().st_size for n in names},
            "source": self.source,
        }

    def finish(self, *, unseen: Iterable[int] | None = None, unseen_fraction: float = 0.1,
               seed: int = 0) -> str:
        """Write clients.parquet and manifest.json, then move the store into place."""
        try:
            for w in self._writers.values():
                w.close()
            for s in self._sinks.values():
                s.close()
            if not self._meta:
                raise SimfedError(f"{self.out}: no samples to write")
            cols = {k: np.concatenate([m[k] for m in self._meta]) for k in self._meta[0]}
            ids = cols["client_id"]
            bad = ids[cols["n_train"] < 1]
            if len(bad):
                raise SimfedError(f"{self.out}: client(s) {bad[:5].tolist()} have no training "
                                  "samples; every client needs >= 1 (lower val/test fractions "
                                  "or use fewer clients)")
            if unseen is None:
                unseen_ids = choose_unseen(ids, unseen_fraction, seed)
            else:
                unseen_ids = np.asarray(sorted(set(int(u) for u in unseen)), dtype=np.int64)
                missing = np.setdiff1d(unseen_ids, ids)
                if len(missing):
                    raise SimfedError(f"unseen client ids {missing[:5].tolist()} are not clients")
            cohort = np.where(np.isin(ids, unseen_ids), "unseen", "seen")
            table = pa.table({
                "client_id": pa.array(ids, pa.int64()),
                "name": pa.array(np.concatenate(self._names).tolist(), pa.string()),
                "cohort": pa.array(cohort.tolist(), pa.string()),
                **{f"n_{s}": pa.array(cols[f"n_{s}"], pa.int64()) for s in SPLITS},
                "n_classes": pa.array(cols["n_classes"], pa.int64()),
                **{f"{s}_offset": pa.array(cols[f"{s}_offset"], pa.int64()) for s in SPLITS},
            })
            pq.write_table(table, self.tmp / CLIENTS)
            names = [CLIENTS, *SPLIT_FILES.values()]
            manifest = self._manifest(len(ids), len(unseen_ids), names)
            (self.tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
            if self.out.exists():  # only reachable with overwrite=True
                shutil.rmtree(self.out)
            os.replace(self.tmp, self.out)
            self._done = True
            return str(self.out)
        except BaseException:
            self.abort()
            raise


def write_store(out: str | os.PathLike, x: np.ndarray, y: np.ndarray, client_of: np.ndarray,
                split_of: np.ndarray, *, classes: list[str], unseen: Iterable[int] | None = None,
                unseen_fraction: float = 0.1, seed: int = 0, names: dict[int, str] | None = None,
                overwrite: bool = False, source: dict | None = None, dtype: str | None = None,
                input: str | None = None, vocab: list[str] | None = None) -> str:
    """Write a store from in-memory arrays; returns its path.

    x: (N, *sample_shape) of uint8, int32 or float32 (``dtype`` defaults to x's); uint8 images are
    (N, C, H, W), and (N, H, W) is taken as one channel; ``input``/``vocab`` as in StoreWriter. y: int labels in
    [0, len(classes)); client_of: int client id per row (any ids, need not be contiguous);
    split_of: "train"/"val"/"test" or 0/1/2 per row. ``unseen`` lists unseen client ids
    explicitly; otherwise round(unseen_fraction * clients) are drawn with ``seed``.
    Every client needs >= 1 train row (SimfedError otherwise).
    """
    x = np.asarray(x)
    dtype = dtype or next((k for k, d in dtypes.DTYPES.items() if d == x.dtype.newbyteorder("<")), str(x.dtype))
    if x.ndim == 3 and x.dtype == np.uint8 and (input or dtypes.default_input(dtype, vocab)) == "unit":
        x = x[:, None]  # (N, H, W) grey images: one channel
    if x.ndim < 2:
        raise SimfedError(f"x must have shape (N, *sample_shape), got {x.shape}")
    client_of = np.asarray(client_of).astype(np.int64)
    order = np.argsort(client_of, kind="stable")
    ids, starts = np.unique(client_of[order], return_index=True)
    bounds = np.append(starts, len(order))
    with StoreWriter(out, classes=classes, sample_shape=x.shape[1:], dtype=dtype, input=input, vocab=vocab,
                     overwrite=overwrite, source=source) as w:
        row_bytes = w.row_bytes
        chunk_rows = max(BATCH_BYTES * 4 // max(row_bytes, 1), 1)
        i = 0
        while i < len(ids):
            j = int(np.searchsorted(bounds, bounds[i] + chunk_rows, side="right")) - 1
            j = min(max(j, i + 1), len(ids))
            idx = order[bounds[i]:bounds[j]]
            w.add(x[idx], np.asarray(y)[idx], client_of[idx], np.asarray(split_of)[idx], names)
            i = j
        return w.finish(unseen=unseen, unseen_fraction=unseen_fraction, seed=seed)
