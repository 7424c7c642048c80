"""FEMNIST as Flower users have it: the Hugging Face dataset flwrlabs/femnist (Parquet), natural split.

Layout (one `train` split, any number of Parquet files, e.g. data/train-0000x-of-0000y.parquet):
  image      struct {bytes: binary, path: string}: a 28x28 PNG (grayscale; other modes are converted
             to 8-bit grey with Pillow's "L" conversion)
  writer_id  string (8 characters in the published files): the client
  hsf_id     int 0-7, the NIST collection (kept in no column of ours; not required)
  character  int 0-61: the class (digits, then upper-case, then lower-case letters, as LEAF)

SRC is a directory (searched recursively for *.parquet, files sorted by path) or one file. One
client per writer, ids in order of first appearance, the writer_id kept as the client's name;
each writer's rows are split train/val/test per writer (0.7/0.15/0.15 by default), since the
dataset has no test split of its own. Pixels are stored as decoded (no inversion). Decoding needs
Pillow (`pip install 'simfed[hf]'`). Only the three needed columns are read, one record batch at
a time; decoded images are kept as uint8 (784 bytes a sample, ~640 MB for all 817,851).
"""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np

from simfed.core.errors import SimfedError
from simfed.partitions.natural import Parts, check_labels, refuse_existing, write_by_writer
from simfed.partitions.progress import progress_bar
from simfed.partitions.synthetic import CLASSES as FEMNIST_CLASSES

COLUMNS = ("image", "writer_id", "character")
LAYOUT = "image (struct of bytes, path), writer_id, hsf_id, character"


def find_files(src: str | os.PathLike) -> list[Path]:
    src = Path(src)
    if not src.exists():
        raise SimfedError(f"{src}: no such file or directory")
    files = [src] if src.is_file() else sorted(src.rglob("*.parquet"))
    if not files:
        raise SimfedError(f"{src}: no .parquet files found; pass the directory of flwrlabs/femnist's Parquet files")
    return files


def _decoder():
    try:
        from PIL import Image
    except ImportError:
        raise SimfedError("simfed partition hf-femnist needs Pillow to decode the PNG images: "
                          "pip install 'simfed[hf]'") from None
    return Image


def _image_bytes(column, path: Path):
    """The PNG bytes of an `image` column: a struct with a `bytes` field (or plain binary)."""
    import pyarrow as pa

    if pa.types.is_struct(column.type):
        names = [column.type.field(i).name for i in range(column.type.num_fields)]
        if "bytes" not in names:
            raise SimfedError(f"{path}: column 'image' is a struct without a 'bytes' field (has {', '.join(names)}); "
                              f"expected the flwrlabs/femnist layout: {LAYOUT}")
        column = column.field("bytes")
    if not (pa.types.is_binary(column.type) or pa.types.is_large_binary(column.type)):
        raise SimfedError(f"{path}: column 'image' holds {column.type}, not PNG bytes; expected {LAYOUT}")
    return column.to_pylist()


def decode(images: list, path: Path, first_row: int, image_cls) -> np.ndarray:
    out = np.empty((len(images), 28, 28), dtype=np.uint8)
    for i, blob in enumerate(images):
        if blob is None:
            raise SimfedError(f"{path}: row {first_row + i}: image has no bytes")
        try:
            with image_cls.open(io.BytesIO(blob)) as img:
                if img.size != (28, 28):
                    raise SimfedError(f"{path}: row {first_row + i}: image is {img.size[0]}x{img.size[1]}, "
                                      "expected 28x28")
                out[i] = np.asarray(img.convert("L"), dtype=np.uint8)
        except SimfedError:
            raise
        except Exception as exc:  # Pillow raises several types for undecodable bytes
            raise SimfedError(f"{path}: row {first_row + i}: image bytes are not a readable PNG "
                              f"({type(exc).__name__})") from None
    return out


def read_file(path: Path, parts: Parts, num_classes: int, image_cls) -> int:
    """Append one Parquet file's rows to `parts` (writer -> [(x, y, 0)]); returns its row count."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except (pa.ArrowInvalid, OSError) as exc:
        raise SimfedError(f"{path}: not a readable Parquet file ({str(exc).splitlines()[0]})") from None
    have = set(pf.schema_arrow.names)
    missing = [c for c in COLUMNS if c not in have]
    if missing:
        raise SimfedError(f"{path}: not the flwrlabs/femnist layout: missing column(s) {', '.join(missing)} "
                          f"(has {', '.join(sorted(have)) or 'none'}); expected {LAYOUT}")
    rows = 0
    try:
        batches = list(pf.iter_batches(batch_size=8192, columns=list(COLUMNS)))
    except (pa.ArrowInvalid, OSError) as exc:
        raise SimfedError(f"{path}: cannot read ({str(exc).splitlines()[0]})") from None
    for batch in batches:
        writers = batch.column("writer_id")
        if writers.null_count:
            raise SimfedError(f"{path}: writer_id has empty values; every row needs its writer")
        writers = np.asarray([str(w) for w in writers.to_pylist()], dtype=object)
        labels = batch.column("character")
        if labels.null_count:
            raise SimfedError(f"{path}: character has empty values; every row needs its class")
        y = check_labels(labels.to_numpy(zero_copy_only=False), num_classes, f"{path}: character")
        x = decode(_image_bytes(batch.column("image"), path), path, rows, image_cls)
        uniq, first, inverse = np.unique(writers, return_index=True, return_inverse=True)
        for k in np.argsort(first):  # writers in order of first appearance within the batch
            sel = inverse == k
            parts.setdefault(str(uniq[k]), []).append((x[sel], y[sel], 0))
        rows += batch.num_rows
    return rows


def import_hf_femnist(src: str | os.PathLike, out: str | os.PathLike, *, unseen_fraction: float = 0.1,
                      seed: int = 0, val_fraction: float | None = None, test_fraction: float | None = None,
                      overwrite: bool = False, progress: bool = False) -> str:
    """Import flwrlabs/femnist Parquet files from SRC into a store at OUT; returns OUT."""
    refuse_existing(out, overwrite)
    files = find_files(src)
    image_cls = _decoder()
    parts: Parts = {}
    total = 0
    with progress_bar(progress, "reading Parquet files", len(files)) as advance:
        for path in files:
            total += read_file(path, parts, len(FEMNIST_CLASSES), image_cls)
            advance(1)
    source = {"importer": "hf-femnist", "src": str(src), "files": len(files), "rows": total, "seed": seed}
    return write_by_writer(out, parts, src=str(src), classes=list(FEMNIST_CLASSES), split_layout=False,
                           val_fraction=val_fraction, test_fraction=test_fraction,
                           unseen_fraction=unseen_fraction, seed=seed, overwrite=overwrite, source=source)
