"""Checks of a store's metadata at open: manifest.json and clients.parquet, field by field.

A store is read by many processes long after it was written; anything it says (a class count, a
sample shape, a client's offsets) sizes allocations and slices memory maps. So every field is
checked for presence, type and range, and the clients table against the manifest, before any
worker sees it. Each failure names the file, the field and the fix (re-create the store).
"""

from __future__ import annotations

import re

import numpy as np
import pyarrow as pa

from simfed.core import validate
from simfed.core.errors import SimfedError
from simfed.partitions import dtypes
from simfed.partitions.writer import CLIENTS, MAX_CLASSES, SPLIT_FILES, SPLITS

MANIFEST_MAX_BYTES = 256 << 20  # names of 100k classes fit easily
CLIENTS_MAX_BYTES = 2 << 30
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
COLUMNS = {"client_id": pa.int64(), "name": pa.string(), "cohort": pa.string(),
           **{f"n_{s}": pa.int64() for s in SPLITS}, "n_classes": pa.int64(),
           **{f"{s}_offset": pa.int64() for s in SPLITS}}
FILES = (CLIENTS, *SPLIT_FILES.values())


def _field(m: dict, key: str, where: str, kind: type | tuple):
    if key not in m:
        raise SimfedError(f"{where}: key {key!r} is missing; re-create the store")
    v = m[key]
    if isinstance(v, bool) or not isinstance(v, kind):
        raise SimfedError(f"{where}: {key} has the wrong type ({type(v).__name__}); re-create the store")
    return v


def check_manifest(m: dict, where: str) -> None:
    classes = _field(m, "classes", where, list)
    k = _field(m, "num_classes", where, int)
    validate.integer(f"{where}: num_classes", k, 1, MAX_CLASSES)
    if len(classes) != k or not all(isinstance(c, str) for c in classes):
        raise SimfedError(f"{where}: classes must be {k} strings (num_classes); re-create the store")
    shape = _field(m, "sample_shape", where, list)
    # Stores written before dtype/input/vocab existed are uint8 images read as x / 255.
    dtypes.check_kind(shape, m.get("dtype", "uint8"), m.get("input", "unit"), m.get("vocab"), where)
    counts = _field(m, "counts", where, dict)
    for key in (*SPLITS, "total", "clients", "seen", "unseen"):
        validate.integer(f"{where}: counts.{key}", _field(counts, key, f"{where}: counts", int), 0)
    if counts["total"] != sum(counts[s] for s in SPLITS) or \
            counts["clients"] != counts["seen"] + counts["unseen"]:
        raise SimfedError(f"{where}: counts do not add up; re-create the store")
    files = _field(m, "files", where, dict)
    sizes = _field(m, "file_sizes", where, dict)
    if set(files) != set(FILES) or set(sizes) != set(FILES):
        raise SimfedError(f"{where}: files and file_sizes must list exactly {', '.join(FILES)}")
    for name in FILES:
        if not isinstance(files[name], str) or not _SHA256.match(files[name]):
            raise SimfedError(f"{where}: files.{name} is not a sha256 hex digest; re-create the store")
        validate.integer(f"{where}: file_sizes.{name}", sizes[name], 0)


def check_clients(t: pa.Table, m: dict, where: str) -> None:
    """Columns, types and consistency of clients.parquet with the manifest."""
    for name, typ in COLUMNS.items():
        if name not in t.column_names:
            raise SimfedError(f"{where}: column {name!r} is missing; re-create the store")
        col = t.column(name)
        if not col.type.equals(typ):
            raise SimfedError(f"{where}: column {name!r} is {col.type}, expected {typ}; re-create the store")
        if col.null_count:
            raise SimfedError(f"{where}: column {name!r} has missing values; re-create the store")
    counts = m["counts"]
    if t.num_rows == 0:
        raise SimfedError(f"{where}: no clients; re-create the store")
    if t.num_rows != counts["clients"]:
        raise SimfedError(f"{where}: {t.num_rows} clients, the manifest records {counts['clients']}")
    ids = dtypes.numeric(t.column("client_id"))
    if (ids < 0).any() or (np.diff(ids) <= 0).any():
        raise SimfedError(f"{where}: client_id must be non-negative and strictly increasing")
    cohort = np.asarray(t.column("cohort").to_pylist(), dtype=object)
    if not np.isin(cohort, ["seen", "unseen"]).all():
        raise SimfedError(f"{where}: cohort must be 'seen' or 'unseen'")
    if int((cohort == "seen").sum()) != counts["seen"] or counts["seen"] < 1:
        raise SimfedError(f"{where}: {int((cohort == 'seen').sum())} seen clients, the manifest records "
                          f"{counts['seen']} (at least one is needed)")
    if (dtypes.numeric(t.column("n_train")) < 1).any():
        raise SimfedError(f"{where}: every client needs >= 1 train sample; re-create the store")
    for s in SPLITS:
        n = dtypes.numeric(t.column(f"n_{s}"))
        off = dtypes.numeric(t.column(f"{s}_offset"))
        if (n < 0).any() or int(n.sum()) != counts[s]:
            raise SimfedError(f"{where}: n_{s} does not add up to counts.{s} = {counts[s]}")
        if len(n) and (off[0] != 0 or (off[1:] != off[:-1] + n[:-1]).any()):
            raise SimfedError(f"{where}: {s}_offset does not follow n_{s} (rows sorted by client); "
                              "re-create the store")
    nc = dtypes.numeric(t.column("n_classes"))
    if (nc < 0).any() or (nc > m["num_classes"]).any():
        raise SimfedError(f"{where}: n_classes out of range 0..{m['num_classes']}")
