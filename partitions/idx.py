"""IDX importer (MNIST, EMNIST, Fashion-MNIST), gzipped or not.

SRC is a directory holding the standard files (``train-images-idx3-ubyte[.gz]``,
``train-labels-idx1-ubyte[.gz]``, ``t10k-...``; EMNIST's ``emnist-<set>-train-images-...`` and
``-test-`` names too), or one images file (its labels file is found by replacing "images" with
"labels" and "idx3" with "idx1"), or an explicit (images, labels) pair.

Reconstructed choices:
- The source's train and t10k/test files are pooled, then partitioned by the scheme, then split
  per client into train/val/test (schemes.split_within_clients): client label mixtures are then
  identical across a client's splits, as in pFedHN/PeFLL, where train and test are partitioned
  with the same per-client class proportions.
- EMNIST stores images transposed; files whose name contains "emnist" are transposed back.
- Class names: Fashion-MNIST's ten names when the path says "fashion", otherwise "0".."K-1".
"""

from __future__ import annotations

import gzip
import math
import os
import zlib
from pathlib import Path

import numpy as np

from simfed.core.errors import SimfedError
from simfed.core.safeio import regular_file
from simfed.partitions import pooled, schemes
from simfed.partitions.writer import MAX_CLASSES

_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
FASHION_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
                   "Sneaker", "Bag", "Ankle boot"]


MAX_IDX_BYTES = 4 << 30  # EMNIST byclass, the largest of the family, is ~0.6 GB of pixels


def _read_exact(f, n: int, path: Path) -> bytes:
    try:
        data = f.read(n)
    except (OSError, EOFError, zlib.error) as exc:
        raise SimfedError(f"{path}: corrupt gzip data ({exc})") from None
    return data


def read_idx(path: str | os.PathLike, max_bytes: int = MAX_IDX_BYTES) -> np.ndarray:
    """Parse one IDX file (gzip detected by its magic bytes, not its name).

    The header is read first and the body's size taken from its dims (as Python ints, so a
    product that would overflow int64 is just "too large"); at most that many bytes (+1, to see
    trailing junk) are read or decompressed, so a gzip bomb stops at the size the header promises.
    """
    path = Path(path)
    size = regular_file(path, "IDX file")
    try:
        raw_file = open(path, "rb")
    except OSError as exc:
        raise SimfedError(f"{path}: cannot read ({exc.strerror})") from None
    with raw_file:
        gz = raw_file.read(2) == b"\x1f\x8b"
        raw_file.seek(0)
        f = gzip.GzipFile(fileobj=raw_file, mode="rb") if gz else raw_file
        magic = _read_exact(f, 4, path)
        if len(magic) < 4 or magic[0] != 0 or magic[1] != 0 or magic[2] not in _DTYPES or magic[3] == 0:
            raise SimfedError(f"{path}: not an IDX file (wrong magic number "
                              f"0x{magic.hex() or 'empty'}); expected e.g. 0x00000803 for images")
        ndim = magic[3]
        head = _read_exact(f, 4 * ndim, path)
        if len(head) < 4 * ndim:
            raise SimfedError(f"{path}: truncated IDX header")
        dims = tuple(int.from_bytes(head[4 * i:4 * i + 4], "big") for i in range(ndim))
        dtype = np.dtype(_DTYPES[magic[2]])
        need = math.prod(dims) * dtype.itemsize
        if need > max_bytes:
            raise SimfedError(f"{path}: IDX header promises shape {dims} ({need:,} bytes); at most "
                              f"{max_bytes:,} are accepted, so the header is corrupt or hostile")
        header = 4 + 4 * ndim
        if not gz and size - header != need:
            raise SimfedError(f"{path}: IDX body has {size - header} bytes, header promises "
                              f"{need} for shape {dims}; the file is truncated or corrupt")
        body = _read_exact(f, need + 1, path)
    if len(body) != need:
        got = f"more than {need}" if len(body) > need else str(len(body))
        raise SimfedError(f"{path}: IDX body has {got} bytes, header promises {need} for shape "
                          f"{dims}; the file is truncated or corrupt")
    return np.frombuffer(body, dtype=dtype).reshape(dims)


def _labels_for(images: Path) -> Path:
    name = images.name.replace("images", "labels").replace("idx3", "idx1")
    return images.with_name(name)


def find_pairs(src: str | os.PathLike) -> list[tuple[Path, Path]]:
    """(images, labels) file pairs in SRC (directory or one images file)."""
    src = Path(src)
    if not src.exists():
        raise SimfedError(f"{src}: no such file or directory")
    if not src.is_dir():
        regular_file(src, "IDX images file")
        lab = _labels_for(src)
        if lab == src or not lab.exists():
            raise SimfedError(f"{src}: cannot find the matching labels file (looked for {lab})")
        return [(src, lab)]
    pairs = []
    for img in sorted(src.iterdir()):
        if "images" in img.name and ("idx3" in img.name or "ubyte" in img.name):
            lab = _labels_for(img)
            if not lab.exists():
                raise SimfedError(f"{img}: matching labels file {lab.name} is missing in {src}")
            pairs.append((img, lab))
    if not pairs:
        raise SimfedError(f"{src}: no IDX images files (e.g. train-images-idx3-ubyte.gz) found")
    return pairs


def load_idx(src, transpose: bool | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Pooled (x uint8 (N, 1, H, W), y int64) from SRC or an (images, labels) pair."""
    if isinstance(src, (tuple, list)):
        pairs = [(Path(src[0]), Path(src[1]))]
    else:
        pairs = find_pairs(src)
    xs, ys = [], []
    for img, lab in pairs:
        x = read_idx(img)
        y = read_idx(lab)
        if x.ndim != 3 or x.dtype != np.uint8:
            raise SimfedError(f"{img}: expected uint8 images of shape (N, H, W), got "
                              f"{x.dtype} {x.shape}")
        if y.ndim != 1:
            raise SimfedError(f"{lab}: expected a 1-d labels file, got shape {y.shape}")
        if len(x) != len(y):
            raise SimfedError(f"{lab}: has {len(y)} labels but {img.name} has {len(x)} images")
        if y.dtype.kind not in "iu":
            raise SimfedError(f"{lab}: labels must be integers, got IDX type {y.dtype}")
        if len(y) and y.min() < 0:
            raise SimfedError(f"{lab}: negative label {int(y.min())}")
        if len(y) and y.max() >= MAX_CLASSES:
            raise SimfedError(f"{lab}: label {int(y.max())} is beyond the {MAX_CLASSES:,} classes a store "
                              "can hold; the labels file is corrupt")
        t = ("emnist" in img.name.lower()) if transpose is None else transpose
        xs.append(np.ascontiguousarray(x.transpose(0, 2, 1)) if t else x)
        ys.append(y.astype(np.int64))
    shapes = {x.shape[1:] for x in xs}
    if len(shapes) != 1:
        raise SimfedError(f"{src}: image files disagree on image size: {sorted(shapes)}")
    return np.concatenate(xs)[:, None], np.concatenate(ys)


def import_idx(src, out: str, *, scheme: str = "iid", clients: int = 100,
               classes_per_client: int | None = None, alpha: float | None = None,
               unseen_fraction: float = 0.1, seed: int = 0,
               val_fraction: float = schemes.DEFAULT_VAL_FRACTION,
               test_fraction: float = schemes.DEFAULT_TEST_FRACTION,
               classes: list[str] | None = None, overwrite: bool = False,
               progress: bool = False, labels: str | None = None, on_note: pooled.Note | None = None) -> str:
    """Partition an IDX dataset into a store at OUT; returns OUT. `labels` ("keep", "compact" or None)
    and `on_note` (gets the one-line note about empty classes): see pooled.label_space."""
    if scheme == "natural":
        raise SimfedError("IDX files have no writers: use --scheme classes, dirichlet or iid")
    srcs = list(src) if isinstance(src, (tuple, list)) else [src]
    pooled.check_args(out, overwrite, srcs, scheme=scheme, clients=clients, seed=seed, alpha=alpha,
                      classes_per_client=classes_per_client, val_fraction=val_fraction,
                      test_fraction=test_fraction, unseen_fraction=unseen_fraction, labels=labels)
    x, y = load_idx(src)
    num = int(y.max()) + 1 if len(y) else 0
    derived = classes is None and not ("fashion" in str(src).lower() and num <= 10)
    if classes is None:
        classes = [str(i) for i in range(num)] if derived else FASHION_CLASSES
    if num > len(classes):
        raise SimfedError(f"{src}: label {num - 1} out of range for {len(classes)} classes")
    y, classes = pooled.label_space(y, list(classes), derived=derived, labels=labels, where=str(src), note=on_note)
    source = {"importer": "idx", "src": str(src), "scheme": scheme, "clients": clients,
              "classes_per_client": classes_per_client, "alpha": alpha, "seed": seed,
              "val_fraction": val_fraction, "test_fraction": test_fraction,
              **({"labels": labels} if labels else {})}
    return pooled.write_by_scheme(out, x, y, classes=classes, scheme=scheme, clients=clients, seed=seed,
                                  classes_per_client=classes_per_client, alpha=alpha,
                                  unseen_fraction=unseen_fraction, val_fraction=val_fraction,
                                  test_fraction=test_fraction, source=source, overwrite=overwrite,
                                  progress=progress)
