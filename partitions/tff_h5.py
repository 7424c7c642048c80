"""FEMNIST as TensorFlow Federated users have it: `fed_emnist*.h5`, natural split by writer.

Layout of each file: group `examples/<client id>/` with datasets `pixels` (n, 28, 28) float32 in
[0, 1] and `label` (n,) integers (62 classes in fed_emnist_*.h5, 10 in fed_emnist_digitsonly_*.h5).
TFF ships a train and a test file over the same writers. Accepted SRC:
- a directory holding one `*train.h5` and one `*test.h5` with the same prefix (TFF's split): the
  test file's rows are the store's test split exactly; val is carved from the train rows per writer
  with `val_fraction` (default 0);
- one .h5 file (or a directory with exactly one): rows are split per writer (0.7/0.15/0.15).
One client per writer, ids in order of first appearance (the train file's group order), the TFF
client id kept as the client's name. Quantization as the LEAF importer: uint8 = rint(x * 255)
(uint8 pixels are taken as they are). h5py is an optional extra: `pip install 'simfed[h5]'`.
"""

from __future__ import annotations

import os
import string
from pathlib import Path

import numpy as np

from simfed.core.errors import SimfedError
from simfed.partitions.natural import Parts, check_labels, refuse_existing, write_by_writer
from simfed.partitions.progress import progress_bar
from simfed.partitions.synthetic import CLASSES as FEMNIST_CLASSES

LAYOUT = "examples/<client>/pixels (n, 28, 28) and examples/<client>/label (n,)"


def find_files(src: str | os.PathLike) -> tuple[list[Path], list[Path]]:
    """([train or unsplit file], [test file] or [])."""
    src = Path(src)
    if not src.exists():
        raise SimfedError(f"{src}: no such file or directory")
    if src.is_file():
        return [src], []
    files = sorted(src.glob("*.h5"))
    if not files:
        raise SimfedError(f"{src}: no .h5 files found; pass TFF's fed_emnist_train.h5 and fed_emnist_test.h5 "
                          "directory or one .h5 file")
    if len(files) == 1:
        return files, []
    train = [f for f in files if f.stem.endswith("train")]
    test = [f for f in files if f.stem.endswith("test")]
    if len(train) == 1 and len(test) == 1 and train[0].stem[:-5] == test[0].stem[:-4] and len(files) == 2:
        return train, test
    raise SimfedError(f"{src}: {len(files)} .h5 files ({', '.join(f.name for f in files)}); expect one *train.h5 "
                      "and one *test.h5 with the same prefix, or pass one file")


def _h5py():
    try:
        import h5py
    except ImportError:
        raise SimfedError("simfed partition tff-h5 needs h5py: pip install 'simfed[h5]'") from None
    return h5py


def _pixels(ds, where: str) -> np.ndarray:
    if ds.ndim != 3 or tuple(ds.shape[1:]) != (28, 28):
        raise SimfedError(f"{where}: pixels has shape {tuple(ds.shape)}, expected (n, 28, 28)")
    x = np.asarray(ds[()])
    if x.dtype == np.uint8:
        return x
    if x.dtype.kind not in "fiu":
        raise SimfedError(f"{where}: pixels must be numbers in [0, 1], got {x.dtype}")
    x = x.astype(np.float32)
    if x.size and (not np.isfinite(x).all() or x.min() < 0 or x.max() > 1):
        raise SimfedError(f"{where}: pixels must be finite and in [0, 1]")
    return np.rint(x * 255).astype(np.uint8)


def read_file(path: Path, parts: Parts, code: int, num_classes: int) -> int:
    """Append one file's writers to `parts` with split code `code`; returns its sample count."""
    h5py = _h5py()
    try:
        f = h5py.File(path, "r")
    except OSError:
        raise SimfedError(f"{path}: not an HDF5 file (TFF's fed_emnist*.h5 expected)") from None
    total = 0
    with f:
        examples = f.get("examples")
        if not isinstance(examples, h5py.Group):
            raise SimfedError(f"{path}: not TFF's federated EMNIST layout: no 'examples' group (has "
                              f"{', '.join(sorted(f.keys())) or 'nothing'}); expected {LAYOUT}")
        for client in examples:
            group = examples[client]
            where = f"{path}: examples/{client}"
            if not isinstance(group, h5py.Group):
                raise SimfedError(f"{where} is not a group; expected {LAYOUT}")
            missing = [k for k in ("pixels", "label") if not isinstance(group.get(k), h5py.Dataset)]
            if missing:
                raise SimfedError(f"{where}: missing {' and '.join(missing)}; expected {LAYOUT}")
            x = _pixels(group["pixels"], where)
            y = check_labels(np.asarray(group["label"][()]).reshape(-1), num_classes, f"{where}/label")
            if len(y) != len(x):
                raise SimfedError(f"{where}: {len(x)} images but {len(y)} labels")
            if len(y):
                parts.setdefault(str(client), []).append((x, y, code))
            total += len(y)
    return total


def import_tff_h5(src: str | os.PathLike, out: str | os.PathLike, *, unseen_fraction: float = 0.1, seed: int = 0,
                  val_fraction: float | None = None, test_fraction: float | None = None, overwrite: bool = False,
                  progress: bool = False) -> str:
    """Import TFF's federated EMNIST HDF5 from SRC into a store at OUT; returns OUT."""
    refuse_existing(out, overwrite)
    train, test = find_files(src)
    _h5py()
    digits = "digitsonly" in train[0].name
    classes = list(string.digits) if digits else list(FEMNIST_CLASSES)
    parts: Parts = {}
    counts = {}
    with progress_bar(progress, "reading HDF5 files", len(train) + len(test)) as advance:
        for path, code in [(p, 0) for p in train] + [(p, 2) for p in test]:
            counts[path.name] = read_file(path, parts, code, len(classes))
            advance(1)
    source = {"importer": "tff-h5", "src": str(src), "tff_split": bool(test), "samples": counts, "seed": seed,
              "quantization": "uint8 = rint(x * 255)"}
    return write_by_writer(out, parts, src=str(src), classes=classes, split_layout=bool(test),
                           val_fraction=val_fraction, test_fraction=test_fraction, unseen_fraction=unseen_fraction,
                           seed=seed, overwrite=overwrite, source=source)
