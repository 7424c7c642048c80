"""CIFAR-10 / CIFAR-100 importer (the official "python version"), split over clients by a scheme.

SRC is ``cifar-10-python.tar.gz`` or ``cifar-100-python.tar.gz`` (any tar compression), or the
extracted folder (``cifar-10-batches-py/``, ``cifar-100-python/``, or a directory holding one).

Format facts (https://www.cs.toronto.edu/~kriz/cifar.html):
- CIFAR-10: ``data_batch_1`` .. ``data_batch_5`` (train) and ``test_batch``, pickles (protocol 2,
  written by Python 2: keys and names load as bytes) of dicts with b'data', a uint8 array
  (N, 3072) whose row is the 1024 red values, then 1024 green, then 1024 blue, each plane 32x32
  row-major; b'labels', N ints in 0..9; b'batch_label' and b'filenames'. ``batches.meta`` holds
  b'label_names' (10 names), b'num_cases_per_batch', b'num_vis'.
- CIFAR-100: ``train`` and ``test`` with b'data' as above, b'fine_labels' (0..99) and
  b'coarse_labels' (0..19); ``meta`` holds b'fine_label_names' (100) and b'coarse_label_names' (20).

Ours:
- A row reshaped to (3, 32, 32) is the sample (its R, G, B planes are the C axis): uint8, input
  "unit" (x / 255), as the IDX images. ``label`` picks CIFAR-100's fine or coarse labels.
- The official train and test files are pooled, then partitioned and split per client exactly as
  the IDX importer does (simfed.partitions.pooled): same schemes, options and defaults.
- Row counts are whatever the files hold (a subset archive is read as is); every file must have
  3072-byte rows and one label per row.
- Safety: a pickle is loaded by an Unpickler that resolves only the three globals a numpy array
  needs (numpy's _reconstruct, ndarray, dtype); anything else (os.system, builtins.eval) is refused
  with one line before it can run. Tar members are read into memory (never extracted to disk),
  regular files only, each at most MAX_MEMBER_BYTES and all together at most MAX_ARCHIVE_BYTES
  (checked from the headers before the data is decompressed), at most MAX_MEMBERS of them.
"""

from __future__ import annotations

import io
import os
import pickle
import tarfile
import zlib
from pathlib import Path, PurePosixPath

import numpy as np

from simfed.core.errors import SimfedError
from simfed.core.safeio import read_bytes
from simfed.partitions import pooled, schemes

ROW = 3 * 32 * 32
MAX_MEMBER_BYTES = 256 << 20  # CIFAR-100's train, the largest file, is ~155 MB
MAX_ARCHIVE_BYTES = 1 << 30
MAX_MEMBERS = 256
CIFAR10 = ("data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4", "data_batch_5", "test_batch",
           "batches.meta")
CIFAR100 = ("train", "test", "meta")
FOLDERS = ("cifar-10-batches-py", "cifar-100-python")
_RECONSTRUCT = np.zeros(1).__reduce__()[0]
_ALLOWED = {("numpy.core.multiarray", "_reconstruct"): _RECONSTRUCT,
            ("numpy._core.multiarray", "_reconstruct"): _RECONSTRUCT,
            ("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): np.dtype}


class _Refused(Exception):
    pass


class _NumpyOnly(pickle.Unpickler):
    """Resolves numpy's array-rebuilding globals and nothing else (no code of the file's choosing)."""

    def find_class(self, module, name):
        found = _ALLOWED.get((module, name))
        if found is None:
            raise _Refused(f"{module}.{name}")
        return found


def load_pickle(data: bytes, where: str) -> dict:
    """A CIFAR pickle's dict, keys as str; one SimfedError line for anything else."""
    try:
        obj = _NumpyOnly(io.BytesIO(data), encoding="bytes").load()
    except _Refused as exc:
        raise SimfedError(f"{where}: the pickle asks for {exc}, refused without running it (only numpy "
                          "arrays are allowed); not a CIFAR file") from None
    except RecursionError:
        raise SimfedError(f"{where}: pickle nested too deeply to be a CIFAR file") from None
    except Exception as exc:  # noqa: BLE001 (untrusted bytes: the pickle machinery raises many types)
        text = str(exc).splitlines()[0][:120] if str(exc) else type(exc).__name__
        raise SimfedError(f"{where}: not a readable CIFAR pickle ({text})") from None
    if not isinstance(obj, dict) or not all(isinstance(k, (bytes, str)) for k in obj):
        raise SimfedError(f"{where}: not a CIFAR file (expected a dict of named entries)")
    return {k.decode("latin-1") if isinstance(k, bytes) else k: v for k, v in obj.items()}


def _from_tar(src: Path) -> dict[str, tuple[bytes, str]]:
    """{name: (bytes, where)} of the CIFAR files in a tar archive, read member by member."""
    wanted = set(CIFAR10) | set(CIFAR100)
    found: dict[str, tuple[bytes, str]] = {}
    total = 0
    try:
        with tarfile.open(src, mode="r|*") as tar:
            for count, ti in enumerate(tar, 1):
                where = f"{src}:{ti.name}"
                if count > MAX_MEMBERS:
                    raise SimfedError(f"{src}: more than {MAX_MEMBERS} archive members; not a CIFAR archive")
                total += max(ti.size, 0)
                if ti.size > MAX_MEMBER_BYTES or total > MAX_ARCHIVE_BYTES:
                    raise SimfedError(f"{where}: {ti.size:,} bytes (archive {total:,} so far); a CIFAR file is "
                                      f"at most {MAX_MEMBER_BYTES:,}, an archive {MAX_ARCHIVE_BYTES:,}: not CIFAR")
                parts = PurePosixPath(ti.name).parts
                if not ti.isfile() or not parts or parts[-1] not in wanted:
                    continue
                if parts[-1] in found:
                    raise SimfedError(f"{where}: {parts[-1]} appears twice in the archive; not an official one")
                f = tar.extractfile(ti)
                data = f.read(ti.size + 1) if f is not None else b""
                if len(data) != ti.size:
                    raise SimfedError(f"{where}: truncated ({len(data):,} of {ti.size:,} bytes)")
                found[parts[-1]] = (data, where)
    except (tarfile.TarError, EOFError, OSError, zlib.error) as exc:
        raise SimfedError(f"{src}: not a readable tar archive ({str(exc) or type(exc).__name__}); pass "
                          "cifar-10-python.tar.gz, cifar-100-python.tar.gz or the extracted folder") from None
    return found


def _from_dir(src: Path) -> dict[str, tuple[bytes, str]]:
    for folder in FOLDERS:
        if (src / folder).is_dir():
            src = src / folder
            break
    found = {}
    for name in (*CIFAR10, *CIFAR100):
        path = src / name
        if os.path.lexists(path):
            found[name] = (read_bytes(path, MAX_MEMBER_BYTES, "CIFAR file"), str(path))
    return found


def read_source(src: str | os.PathLike) -> tuple[str, dict[str, tuple[bytes, str]]]:
    """("cifar10" | "cifar100", {file name: (bytes, where)}) with every file of that layout present."""
    src = Path(src)
    if not src.exists():
        raise SimfedError(f"{src}: no such file or directory")
    found = _from_dir(src) if src.is_dir() else _from_tar(src)
    has10, has100 = [n for n in CIFAR10 if n in found], [n for n in CIFAR100 if n in found]
    if has10 and has100:
        raise SimfedError(f"{src}: holds both CIFAR-10 ({has10[0]}) and CIFAR-100 ({has100[0]}) files; pass one")
    if not has10 and not has100:
        raise SimfedError(f"{src}: not a CIFAR archive (no data_batch_1..5, test_batch, batches.meta or "
                          "train, test, meta); pass cifar-10-python.tar.gz, cifar-100-python.tar.gz or the "
                          "extracted folder")
    kind, names = ("cifar10", CIFAR10) if has10 else ("cifar100", CIFAR100)
    missing = [n for n in names if n not in found]
    if missing:
        raise SimfedError(f"{src}: {missing[0]} is missing; a {'CIFAR-10' if has10 else 'CIFAR-100'} archive "
                          f"holds {', '.join(names)} (is the download complete?)")
    return kind, found


def _names(meta: dict, key: str, count: int, where: str) -> list[str]:
    names = meta.get(key)
    if not isinstance(names, list) or len(names) != count or \
            not all(isinstance(n, (bytes, str)) for n in names):
        raise SimfedError(f"{where}: {key} must be a list of {count} names; not a CIFAR meta file")
    return [n.decode("utf-8", "replace") if isinstance(n, bytes) else n for n in names]


def _batch(data: bytes, where: str, label_key: str, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """(x uint8 (N, 3, 32, 32), y int64) of one data file."""
    d = load_pickle(data, where)
    x = d.get("data")
    if not isinstance(x, np.ndarray) or x.dtype != np.uint8 or x.ndim != 2:
        got = f"{x.dtype} array of shape {x.shape}" if isinstance(x, np.ndarray) else type(x).__name__
        raise SimfedError(f"{where}: 'data' must be a uint8 array (N, {ROW}), got {got}; not a CIFAR file")
    if x.shape[1] != ROW:
        raise SimfedError(f"{where}: rows are {x.shape[1]} bytes wide, CIFAR's are {ROW} (3 x 32 x 32); "
                          "not a CIFAR file")
    labels = d.get(label_key)
    if not isinstance(labels, (list, np.ndarray)):
        raise SimfedError(f"{where}: no '{label_key}' list; not a CIFAR file of this kind")
    odd = next(((i, v) for i, v in enumerate(labels) if type(v) is not int), None) if isinstance(labels, list) else None
    if odd is not None:  # numpy would turn True into 1 and a mix of ints and strings into strings
        raise SimfedError(f"{where}: '{label_key}' row {odd[0]} is {type(odd[1]).__name__} {odd[1]!r:.24}, not an "
                          "integer; not a CIFAR file")
    y = np.asarray(labels)
    if y.ndim != 1 or y.dtype.kind not in "iu" or len(y) != len(x):
        raise SimfedError(f"{where}: '{label_key}' must be {len(x)} integers (one per row), got "
                          f"{len(y) if y.ndim == 1 else y.shape} of {y.dtype}")
    bad = y[(y < 0) | (y >= num_classes)]
    if len(bad):
        raise SimfedError(f"{where}: label {int(bad[0])} out of range 0..{num_classes - 1}")
    return np.ascontiguousarray(x).reshape(-1, 3, 32, 32), y.astype(np.int64)


def load_cifar(src, label: str = "fine") -> tuple[np.ndarray, np.ndarray, list[str], str]:
    """Pooled (x uint8 (N, 3, 32, 32), y int64, class names, kind), train files first, then test."""
    if label not in ("fine", "coarse"):
        raise SimfedError(f"--label must be fine or coarse, got {label!r}")
    kind, found = read_source(src)
    if kind == "cifar10":
        if label != "fine":
            raise SimfedError(f"{src}: CIFAR-10 has one set of labels; --label coarse is for CIFAR-100")
        meta, where = found["batches.meta"]
        classes = _names(load_pickle(meta, where), "label_names", 10, where)
        files, key = CIFAR10[:6], "labels"
    else:
        meta, where = found["meta"]
        count = 100 if label == "fine" else 20
        classes = _names(load_pickle(meta, where), f"{label}_label_names", count, where)
        files, key = CIFAR100[:2], f"{label}_labels"
    parts = [_batch(*found.pop(name), key, len(classes)) for name in files]
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]), classes, kind


def import_cifar(src, out, *, scheme: str = "iid", clients: int = 100, classes_per_client: int | None = None,
                 alpha: float | None = None, label: str = "fine", unseen_fraction: float = 0.1, seed: int = 0,
                 val_fraction: float = schemes.DEFAULT_VAL_FRACTION,
                 test_fraction: float = schemes.DEFAULT_TEST_FRACTION, overwrite: bool = False,
                 progress: bool = False) -> str:
    """Partition CIFAR-10 or CIFAR-100 into a store at OUT; returns OUT."""
    if scheme == "natural":
        raise SimfedError("CIFAR has no natural clients: use --scheme classes, dirichlet or iid")
    if label not in ("fine", "coarse"):
        raise SimfedError(f"--label must be fine or coarse, got {label!r}")
    pooled.check_args(out, overwrite, [src], scheme=scheme, clients=clients, seed=seed, alpha=alpha,
                      classes_per_client=classes_per_client, val_fraction=val_fraction,
                      test_fraction=test_fraction, unseen_fraction=unseen_fraction)
    x, y, classes, kind = load_cifar(src, label)
    source = {"importer": "cifar", "dataset": kind, "src": str(src), "label": label if kind == "cifar100" else None,
              "scheme": scheme, "clients": clients, "classes_per_client": classes_per_client, "alpha": alpha,
              "seed": seed, "val_fraction": val_fraction, "test_fraction": test_fraction,
              "pooled": "official train + test"}
    return pooled.write_by_scheme(out, x, y, classes=classes, scheme=scheme, clients=clients, seed=seed,
                                  classes_per_client=classes_per_client, alpha=alpha,
                                  unseen_fraction=unseen_fraction, val_fraction=val_fraction,
                                  test_fraction=test_fraction, source=source, overwrite=overwrite,
                                  progress=progress)
