"""LEAF Shakespeare importer: next-character prediction, one client per speaking role.

Format facts (LEAF, github.com/TalwalkarLab/leaf, data/shakespeare): JSON files {"users": [...],
"num_samples": [...], "user_data": {user: {"x": [...], "y": [...]}}} (plus "hierarchies", the
plays, which we do not need); a user is one speaking role of one play; x is a string of 80
characters, y the one character that follows it. LEAF's models map a character to its index in
ALL_LETTERS (80 characters) with ``ALL_LETTERS.find(c)``, which gives -1 for any other character.
Accepted layouts of SRC are those of the LEAF importer (simfed.partitions.leaf.find_files):
``SRC/all_data*.json`` (or ``SRC/all_data/*.json``, any ``SRC/*.json``, SRC one file), or LEAF's
split ``SRC/train/*.json`` and ``SRC/test/*.json``.

Ours:
- A sample is the 80 character ids (uint8, shape [80], input "tokens", vocab = ALL_LETTERS as 80
  one-character strings) and its label is the id of y (80 classes named by their character).
- A character outside ALL_LETTERS is refused (one line naming file, user, row and character)
  rather than becoming LEAF's -1; ``unknown="c"`` maps every such character to c's id instead.
- Splits follow the LEAF importer's conventions: with train/ and test/, LEAF's test rows are the
  test split exactly and val is carved from the train rows (default 0); unsplit, each role is
  split 0.7/0.15/0.15. Unlike the image importers, a role's rows are split in their order (train
  first, then val, then test), never shuffled: consecutive rows share 79 of their 80 characters,
  so a random split would put near-copies of test rows in train. Every row is kept.
- Client ids are 0..U-1 in order of first appearance (files sorted by name); the clients table
  keeps the role (LEAF user id) in ``name``. A role listed twice among train files, or twice among
  test files, is an error (as in the LEAF importer).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from simfed.core import validate
from simfed.core.errors import SimfedError
from simfed.core.safeio import check_output
from simfed.partitions import schemes
from simfed.partitions.leaf import check_count, collect_parts, find_files, leaf_users
from simfed.partitions.natural import write_by_writer

ALL_LETTERS = "\n !\"&'(),-.0123456789:;>?ABCDEFGHIJKLMNOPQRSTUVWXYZ[]abcdefghijklmnopqrstuvwxyz}"
SEQ_LEN = 80
CHUNK_ROLES = 200


def _lut(unknown: str | None) -> np.ndarray:
    """Code point (< 128) -> id; -1 for a character outside ALL_LETTERS (or unknown's id)."""
    lut = np.full(128, -1 if unknown is None else ALL_LETTERS.index(unknown), dtype=np.int16)
    for i, c in enumerate(ALL_LETTERS):
        lut[ord(c)] = i
    return lut


def _ids(text: str, lut: np.ndarray, fill: int) -> np.ndarray:
    """Ids of every character of text (-1 where unknown and not mapped)."""
    cp = np.frombuffer(text.encode("utf-32-le", "surrogatepass"), dtype="<u4")
    ids = np.full(len(cp), fill, dtype=np.int16)
    small = cp < 128
    ids[small] = lut[cp[small]]
    return ids


def _rows(values, width: int, what: str, where: str) -> str:
    """The strings of `values` joined, each checked to have `width` characters."""
    if not isinstance(values, list):
        raise SimfedError(f"{where}: {what} must be a list of strings")
    for i, v in enumerate(values):
        if not isinstance(v, str) or len(v) != width:
            got = f"{len(v)} characters ({v[:20]!r})" if isinstance(v, str) else type(v).__name__
            need = "one character" if width == 1 else f"a string of {width} characters"
            raise SimfedError(f"{where}: {what} row {i} is {got}, not {need}; not LEAF Shakespeare data")
    return "".join(values)


def _encode(text: str, width: int, lut: np.ndarray, fill: int, what: str, where: str) -> np.ndarray:
    ids = _ids(text, lut, fill)
    bad = np.flatnonzero(ids < 0)
    if len(bad):
        row, col = divmod(int(bad[0]), width)
        raise SimfedError(f"{where}: {what} row {row} holds {text[bad[0]]!r} (position {col}), not one of "
                          "LEAF's 80 characters; pass --unknown-char C to map such characters to C")
    return ids.astype(np.uint8).reshape(-1, width)


def parse_file(path: Path, lut: np.ndarray, fill: int):
    """Yield (role, x uint8 (n, 80), y int64 (n,)) for each user of one LEAF Shakespeare file."""
    for user, entry, count in leaf_users(path):
        where = f"{path}: user {user!r}"
        x = _encode(_rows(entry["x"], SEQ_LEN, "x", where), SEQ_LEN, lut, fill, "x", where)
        y = _encode(_rows(entry["y"], 1, "y", where), 1, lut, fill, "y", where)[:, 0].astype(np.int64)
        if len(x) != len(y):
            raise SimfedError(f"{where}: {len(x)} x rows but {len(y)} y rows")
        check_count(where, count, len(y))
        yield user, x, y


def ordered_split(n: int, val_fraction: float, test_fraction: float) -> np.ndarray:
    """Codes for one role's n rows in order: the first rows train, then val, then test (train >= 1)."""
    n_val, n_test = int(np.floor(n * val_fraction)), int(np.floor(n * test_fraction))
    n_train = max(n - n_val - n_test, min(n, 1))
    n_val = min(n_val, n - n_train)
    return np.repeat(np.array([0, 1, 2], np.int8), [n_train, n_val, n - n_train - n_val])


def _role_codes(parts: list[tuple[np.ndarray, np.ndarray, int]], split_layout: bool, val: float,
                test: float) -> np.ndarray:
    if not split_layout:
        return ordered_split(sum(len(p[1]) for p in parts), val, test)
    return np.concatenate([ordered_split(len(p[1]), val, 0.0) if code == 0 else np.full(len(p[1]), 2, np.int8)
                           for p in parts for code in [p[2]]])


def import_shakespeare(src: str | os.PathLike, out: str | os.PathLike, *, unseen_fraction: float = 0.1,
                       seed: int = 0, val_fraction: float | None = None, test_fraction: float | None = None,
                       unknown: str | None = None, overwrite: bool = False, progress: bool = False) -> str:
    """Import LEAF Shakespeare JSON from SRC into a store at OUT; returns OUT.

    val/test fractions default to 0.0/LEAF's own test with train/ and test/, and to 0.15/0.15
    otherwise (test_fraction is ignored when LEAF's split is present)."""
    validate.seed("--seed", seed)
    validate.fraction("--unseen-fraction", unseen_fraction)
    schemes.check_fractions(schemes.DEFAULT_VAL_FRACTION if val_fraction is None else val_fraction,
                            0.0 if test_fraction is None else test_fraction)
    if unknown is not None and (not isinstance(unknown, str) or len(unknown) != 1 or unknown not in ALL_LETTERS):
        raise SimfedError(f"--unknown-char must be one of LEAF's 80 characters (e.g. ' '), got {unknown!r}")
    check_output(out, overwrite, [src])
    train_files, test_files = find_files(src)
    split_layout = bool(test_files)
    val = (0.0 if split_layout else schemes.DEFAULT_VAL_FRACTION) if val_fraction is None else val_fraction
    test = schemes.DEFAULT_TEST_FRACTION if test_fraction is None else test_fraction
    lut, fill = _lut(unknown), -1 if unknown is None else ALL_LETTERS.index(unknown)
    parts = collect_parts(train_files, test_files, lambda path: parse_file(path, lut, fill), progress)
    source = {"importer": "shakespeare", "src": str(src), "leaf_split": split_layout, "seed": seed,
              "val_fraction": val, "test_fraction": None if split_layout else test, "unknown_char": unknown,
              "split": "ordered per role (train, val, test), not shuffled"}
    return _write(out, parts, split_layout=split_layout, val=val, test=test, src=str(src), seed=seed,
                  unseen_fraction=unseen_fraction, overwrite=overwrite, source=source)


def _write(out, parts, *, split_layout: bool, val: float, test: float, src: str, seed: int,
           unseen_fraction: float, overwrite: bool, source: dict) -> str:
    vocab = list(ALL_LETTERS)
    return write_by_writer(out, parts, src=src, classes=vocab, split_layout=split_layout, val_fraction=val,
                           test_fraction=test, unseen_fraction=unseen_fraction, seed=seed, overwrite=overwrite,
                           source=source, what="role", step=CHUNK_ROLES,
                           layout={"sample_shape": (SEQ_LEN,), "dtype": "uint8", "input": "tokens", "vocab": vocab},
                           client_codes=lambda role_parts: _role_codes(role_parts, split_layout, val, test))
