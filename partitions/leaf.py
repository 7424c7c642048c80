"""LEAF JSON importer (FEMNIST as LEAF writes it): natural split, one client per writer.

Accepted layouts of SRC:
- LEAF's own split: ``SRC/train/*.json`` and ``SRC/test/*.json``. LEAF's test rows become the
  store's test split exactly; the store's val split is carved from LEAF's train rows per client
  with ``val_fraction`` (default 0.0, i.e. LEAF's split is kept as is).
- Unsplit: ``SRC/all_data_*.json`` (or ``SRC/all_data/*.json``, any ``SRC/*.json``, or SRC being
  one JSON file); split per client with schemes.split_within_clients (default 0.7/0.15/0.15).

Each file holds {"users": [...], "num_samples": [...], "user_data": {user: {"x": [...],
"y": [...]}}}; x is a list of 784 floats in [0, 1] (28x28 row-major), y an int in 0..61.
Quantization (documented, exact inverse not needed): uint8 = round(x * 255), with round half to
even (numpy.rint). LEAF's FEMNIST keeps a white background (1.0); we store pixels as given.

Files are parsed one at a time and only their uint8 pixels are kept (~640 MB for all of FEMNIST,
not the several GB that parsed JSON floats take). Client ids are 0..U-1 in order of first
appearance (files sorted by name); the clients table keeps the LEAF user id in ``name``.

A user listed twice (in one file, or in two train files, or in two test files) is an error: LEAF
never writes that, and concatenating would double the user's rows (and, after our own split,
leak copies of test rows into train). A user appears at most once among train files and once
among test files. User names must be strings of valid Unicode (a lone surrogate from a JSON
escape cannot be stored). Only regular files are read, each at most safeio.JSON_MAX_BYTES.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from simfed.core import validate
from simfed.core.errors import SimfedError
from simfed.partitions import schemes
from simfed.partitions.natural import Parts, write_by_writer
from simfed.partitions.progress import progress_bar
from simfed.core.safeio import check_output, load_json, regular_file
from simfed.partitions.synthetic import CLASSES as FEMNIST_CLASSES

PIXELS = 784


def find_files(src: str | os.PathLike) -> tuple[list[Path], list[Path]]:
    """(files with train rows or unsplit rows, test files); test list empty when unsplit."""
    src = Path(src)
    if not src.exists():
        raise SimfedError(f"{src}: no such file or directory")
    if not src.is_dir():
        regular_file(src, "LEAF file")
        return [src], []
    if (src / "train").is_dir() and (src / "test").is_dir():
        train, test = sorted((src / "train").glob("*.json")), sorted((src / "test").glob("*.json"))
        if not train or not test:
            raise SimfedError(f"{src}: LEAF train/ and test/ folders must both contain .json files")
        for f in train + test:  # a FIFO named x.json would block the import forever
            regular_file(f, "LEAF file")
        return train, test
    for pattern in ("all_data_*.json", "all_data/*.json", "*.json"):
        files = sorted(src.glob(pattern))
        if files:
            for f in files:
                regular_file(f, "LEAF file")
            return files, []
    raise SimfedError(f"{src}: no LEAF JSON files (all_data_*.json or train/ and test/) found")


def leaf_users(path: Path):
    """Yield (user, entry, num_samples or None) for each user of one LEAF JSON file, after checking
    the file's layout: a 'users' list of distinct string ids, each with non-empty x and y in
    'user_data', and 'num_samples' (if present) a list as long as 'users'."""
    obj = load_json(path, what="LEAF file")
    if not isinstance(obj, dict) or not isinstance(obj.get("users"), list) \
            or not isinstance(obj.get("user_data"), dict):
        raise SimfedError(f"{path}: not a LEAF file (needs 'users' list and 'user_data' object)")
    users, data = obj["users"], obj["user_data"]
    counts = obj.get("num_samples")
    if counts is not None and (not isinstance(counts, list) or len(counts) != len(users)):
        raise SimfedError(f"{path}: 'num_samples' must be a list as long as 'users'")
    seen: set[str] = set()
    for i, user in enumerate(users):
        if not isinstance(user, str):
            raise SimfedError(f"{path}: user ids must be strings, got {user!r} in 'users'")
        validate.text(f"{path}: user id {user!r}", user, max_len=1024)
        if user in seen:
            raise SimfedError(f"{path}: user {user!r} is listed twice in 'users'; each user once")
        seen.add(user)
        entry = data.get(user)
        if not isinstance(entry, dict) or not entry.get("x") or not entry.get("y"):
            raise SimfedError(f"{path}: user {user!r} has no data (missing or empty x/y in "
                              "'user_data')")
        yield user, entry, None if counts is None else counts[i]


def check_count(where: str, count, n: int) -> None:
    """A user's num_samples entry (None: absent) agrees with its rows."""
    if count is not None and (isinstance(count, bool) or count != n):
        raise SimfedError(f"{where}: num_samples says {count} but user_data has {n}")


def _first_bad(values: list, ok: tuple) -> tuple[int, object] | None:
    """(index, value) of the first entry whose type is not exactly one of `ok` (bool is not int)."""
    for i, v in enumerate(values):
        if type(v) not in ok:
            return i, v
    return None


def _shown(v: object) -> str:
    text = repr(v)
    return f"{type(v).__name__} {text if len(text) <= 24 else text[:21] + '...'}"


def check_types(x: object, y: object, where: str) -> None:
    """x is a list of rows of PIXELS JSON numbers and y a list of JSON numbers: a string, a boolean or
    null would otherwise be converted silently by numpy ("0.5" -> 0.5, true -> 1)."""
    if type(x) is not list:
        raise SimfedError(f"{where}: x must be a list of rows, got {_shown(x)}")
    kinds: set[type] = set()
    for i, row in enumerate(x):
        if type(row) is not list or len(row) != PIXELS:
            got = f"the wrong length ({len(row)} values)" if type(row) is list else f"no list but {_shown(row)}"
            raise SimfedError(f"{where}: x row {i} has {got}; expected {PIXELS} numbers (28x28) per sample")
        kinds.update(map(type, row))
    if not kinds <= {float, int}:
        i, (j, v) = next((i, bad) for i, row in enumerate(x) if (bad := _first_bad(row, (float, int))))
        raise SimfedError(f"{where}: x row {i} value {j} is {_shown(v)}; LEAF pixels are numbers in [0, 1]")
    if type(y) is not list:
        raise SimfedError(f"{where}: y must be a list of integer labels, got {_shown(y)}")
    bad = _first_bad(y, (int, float))
    if bad is not None:
        raise SimfedError(f"{where}: y row {bad[0]} is {_shown(bad[1])}; LEAF labels are integers")


def parse_file(path: Path, num_classes: int):
    """Yield (user, x uint8 (n, 784), y int64) for each user of one LEAF JSON file."""
    for user, entry, count in leaf_users(path):
        where = f"{path}: user {user!r}"
        check_types(entry["x"], entry["y"], where)
        x = np.asarray(entry["x"], dtype=np.float32).reshape(-1, PIXELS)
        if not np.isfinite(x).all() or x.min() < 0 or x.max() > 1:
            raise SimfedError(f"{where}: x values must be finite and in [0, 1]")
        yf = np.asarray(entry["y"], dtype=np.float64)
        if not np.all(yf == np.round(yf)):
            raise SimfedError(f"{where}: y must be a list of integers")
        if len(yf) != len(x):
            raise SimfedError(f"{where}: {len(x)} x rows but {len(yf)} labels")
        bad = yf[(yf < 0) | (yf >= num_classes)]
        if len(bad):
            raise SimfedError(f"{where}: label {int(bad[0])} out of range 0..{num_classes - 1}")
        check_count(where, count, len(yf))
        yield str(user), np.rint(x * 255).astype(np.uint8), yf.astype(np.int64)


def collect_parts(train_files: list[Path], test_files: list[Path], parse, progress: bool) -> Parts:
    """Per user, in order of first appearance (client ids follow it), the (x, y, code) parts of every
    file: code 0 for a train file, 2 for a test file. `parse(path)` yields (user, x, y)."""
    parts: Parts = {}
    files = [(f, 0) for f in train_files] + [(f, 2) for f in test_files]
    first_file: dict[tuple[str, int], Path] = {}
    with progress_bar(progress, "reading LEAF files", len(files)) as advance:
        for path, code in files:
            for user, x, y in parse(path):
                other = first_file.setdefault((user, code), path)
                if other != path:
                    raise SimfedError(f"{path}: user {user!r} is also in {other.name}; a user may "
                                      "appear in one train file and one test file only")
                parts.setdefault(user, []).append((x, y, code))
            advance(1)
    return parts


def import_leaf(src: str | os.PathLike, out: str | os.PathLike, *, unseen_fraction: float = 0.1,
                seed: int = 0, val_fraction: float | None = None, test_fraction: float | None = None,
                classes: list[str] | None = None, overwrite: bool = False,
                progress: bool = False) -> str:
    """Import LEAF JSON from SRC into a store at OUT; returns OUT.

    val/test fractions default to 0.0/LEAF's own test when SRC has train/ and test/, and to
    0.15/0.15 otherwise (test_fraction is ignored when LEAF's split is present).
    """
    classes = list(classes or FEMNIST_CLASSES)
    # Every argument is checked before parsing gigabytes of JSON.
    validate.seed("--seed", seed)
    validate.fraction("--unseen-fraction", unseen_fraction)
    schemes.check_fractions(schemes.DEFAULT_VAL_FRACTION if val_fraction is None else val_fraction,
                            0.0 if test_fraction is None else test_fraction)
    check_output(out, overwrite, [src])
    train_files, test_files = find_files(src)
    split_layout = bool(test_files)
    parts = collect_parts(train_files, test_files, lambda path: parse_file(path, len(classes)), progress)
    source = {"importer": "leaf", "src": str(src), "leaf_split": split_layout, "seed": seed,
              "quantization": "uint8 = rint(x * 255)"}
    return write_by_writer(out, parts, src=str(src), classes=classes, split_layout=split_layout,
                           val_fraction=val_fraction, test_fraction=test_fraction,
                           unseen_fraction=unseen_fraction, seed=seed, overwrite=overwrite, source=source)
