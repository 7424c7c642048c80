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
import os
from pathlib import Path

import numpy as np

from simfed.engine.errors import SimfedError
from simfed.partitions import schemes
from simfed.partitions.progress import progress_bar
from simfed.partitions.writer import StoreWriter

_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
FASHION_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
                   "Sneaker", "Bag", "Ankle boot"]


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Parse one IDX file (gzip detected by its magic bytes, not its name)."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise SimfedError(f"{path}: file not found") from None
    except OSError as exc:
        raise SimfedError(f"{path}: cannot read ({exc.strerror})") from None
    if raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError) as exc:
            raise SimfedError(f"{path}: corrupt gzip data ({exc})") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _DTYPES or raw[3] == 0:
        raise SimfedError(f"{path}: not an IDX file (wrong magic number "
                          f"0x{raw[:4].hex() or 'empty'}); expected e.g. 0x00000803 for images")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise SimfedError(f"{path}: truncated IDX header")
    dims = tuple(int.from_bytes(raw[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim))
    dtype = np.dtype(_DTYPES[raw[2]])
    need = int(np.prod(dims)) * dtype.itemsize
    if len(raw) - header != need:
        raise SimfedError(f"{path}: IDX body has {len(raw) - header} bytes, header promises "
                          f"{need} for shape {dims}; the file is truncated or corrupt")
    return np.frombuffer(raw, dtype=dtype, offset=header).reshape(dims)


def _labels_for(images: Path) -> Path:
    name = images.name.replace("images", "labels").replace("idx3", "idx1")
    return images.with_name(name)


def find_pairs(src: str | os.PathLike) -> list[tuple[Path, Path]]:
    """(images, labels) file pairs in SRC (directory or one images file)."""
    src = Path(src)
    if not src.exists():
        raise SimfedError(f"{src}: no such file or directory")
    if src.is_file():
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
        if len(y) and y.min() < 0:
            raise SimfedError(f"{lab}: negative label {int(y.min())}")
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
               progress: bool = False) -> str:
    """Partition an IDX dataset into a store at OUT; returns OUT."""
    if scheme == "natural":
        raise SimfedError("IDX files have no writers: use --scheme classes, dirichlet or iid")
    x, y = load_idx(src)
    num = int(y.max()) + 1 if len(y) else 0
    if classes is None:
        classes = FASHION_CLASSES if ("fashion" in str(src).lower() and num <= 10) else \
            [str(i) for i in range(num)]
    if num > len(classes):
        raise SimfedError(f"{src}: label {num - 1} out of range for {len(classes)} classes")
    client_of = schemes.assign(scheme, y, clients=clients, seed=seed,
                               classes_per_client=classes_per_client, alpha=alpha)
    keep = client_of >= 0  # 'classes' drops classes that no client holds
    x, y, client_of = x[keep], y[keep], client_of[keep]
    split = schemes.split_within_clients(client_of, y, seed, val_fraction, test_fraction)
    order = np.argsort(client_of, kind="stable")
    source = {"importer": "idx", "src": str(src), "scheme": scheme, "clients": clients,
              "classes_per_client": classes_per_client, "alpha": alpha, "seed": seed,
              "val_fraction": val_fraction, "test_fraction": test_fraction}
    with StoreWriter(out, classes=classes, sample_shape=x.shape[1:], overwrite=overwrite,
                     source=source) as w:
        # Feed ~100 clients per chunk so the progress bar moves and batches stay moderate.
        ids, starts = np.unique(client_of[order], return_index=True)
        bounds = np.append(starts, len(order))
        step = 100
        with progress_bar(progress, "writing clients", len(ids)) as advance:
            for i in range(0, len(ids), step):
                j = min(i + step, len(ids))
                rows = order[bounds[i]:bounds[j]]
                w.add(x[rows], y[rows], client_of[rows], split[rows])
                advance(j - i)
        return w.finish(unseen_fraction=unseen_fraction, seed=seed)
