"""What a store's samples are: shape, element type and how the model sees them.

A sample is a fixed-shape array (a (C, H, W) image, a sequence of token ids, a feature vector),
stored row-major, little-endian, as one fixed_size_binary row of prod(shape) * itemsize bytes.
The manifest records it with three keys (all optional for stores written before they existed):

- ``dtype``: "uint8", "int32" or "float32" (absent: "uint8").
- ``input``: how the model sees ``x`` (absent: "unit", so older stores read exactly as before):
  - "unit": uint8 divided by 255 into float32 in [0, 1] (images);
  - "raw": the values as float32 (features; any dtype);
  - "tokens": integer ids handed to the model as int64 for an embedding (uint8 or int32), each
    in 0..len(vocab)-1.
- ``vocab``: with "tokens" only, the list of token strings (id i is vocab[i]).

Values are checked where data enters a store (the writer) and where a store is opened
(``PartitionStore.check_contents``): float32 must be finite, tokens within the vocabulary.
"""

from __future__ import annotations

import math

import numpy as np

from simfed.core.errors import SimfedError

DTYPES = {"uint8": np.dtype("u1"), "int32": np.dtype("<i4"), "float32": np.dtype("<f4")}
INPUTS = ("unit", "raw", "tokens")
MAX_DIMS = 8
MAX_VOCAB = 1 << 20  # a byte-level or word-piece vocabulary fits; a hostile manifest does not
MAX_SAMPLE_BYTES = 64 << 20  # bytes per sample: a shape from a hostile header could ask for terabytes


def default_input(dtype: str, vocab) -> str:
    """"unit" for uint8 images, "tokens" when a vocabulary is given, "raw" otherwise."""
    if vocab:
        return "tokens"
    return "unit" if dtype == "uint8" else "raw"


def row_bytes(shape, dtype: str) -> int:
    return math.prod(shape) * DTYPES[dtype].itemsize


def check_kind(shape, dtype, input, vocab, where: str) -> None:
    """The (sample shape, dtype, input, vocab) combination is one a store can hold."""
    if not isinstance(shape, (list, tuple)) or not 1 <= len(shape) <= MAX_DIMS or \
            not all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) and v >= 1 for v in shape):
        raise SimfedError(f"{where}: sample_shape must be 1 to {MAX_DIMS} positive integers (e.g. [3, 32, 32], "
                          f"[80]), got {shape}")
    if not isinstance(dtype, str) or dtype not in DTYPES:
        raise SimfedError(f"{where}: dtype {dtype!r} is not supported; use one of {', '.join(DTYPES)}")
    if row_bytes(shape, dtype) > MAX_SAMPLE_BYTES:
        raise SimfedError(f"{where}: sample shape {list(shape)} of {dtype} is {row_bytes(shape, dtype):,} bytes "
                          f"per sample; at most {MAX_SAMPLE_BYTES:,} are supported")
    if not isinstance(input, str) or input not in INPUTS:
        raise SimfedError(f"{where}: input {input!r} is not one of {', '.join(INPUTS)}")
    if input == "unit" and dtype != "uint8":
        raise SimfedError(f"{where}: input 'unit' (x / 255) needs uint8 data, not {dtype}; use input 'raw'")
    if input == "tokens":
        if dtype == "float32":
            raise SimfedError(f"{where}: input 'tokens' needs integer data (uint8 or int32), not float32")
        if not isinstance(vocab, (list, tuple)) or not 1 <= len(vocab) <= MAX_VOCAB or \
                not all(isinstance(t, str) for t in vocab):
            raise SimfedError(f"{where}: input 'tokens' needs a vocab of 1 to {MAX_VOCAB:,} strings")
        if dtype == "uint8" and len(vocab) > 256:
            raise SimfedError(f"{where}: a vocabulary of {len(vocab)} tokens does not fit uint8 ids; use int32")
    elif vocab:
        raise SimfedError(f"{where}: a vocab is only meaningful with input 'tokens', not {input!r}")


def as_dtype(x: np.ndarray, dtype: str, where: str) -> np.ndarray:
    """x in the store's exact (little-endian) dtype; another byte order of the same type is converted."""
    want = DTYPES[dtype]
    if x.dtype != want:
        if x.dtype.kind != want.kind or x.dtype.itemsize != want.itemsize:
            raise SimfedError(f"{where}: x must be {dtype}, got {x.dtype}")
        x = x.astype(want)
    return x


def first_bad_row(x: np.ndarray, input: str, vocab_size: int) -> tuple[int, str] | None:
    """(row, what) of the first sample a store must not hold (non-finite float, token out of range)."""
    if len(x) == 0 or (x.dtype.kind != "f" and input != "tokens"):
        return None
    flat = x.reshape(len(x), -1)
    if x.dtype.kind == "f":
        bad = ~np.isfinite(flat).all(axis=1)
        if bad.any():
            i = int(np.argmax(bad))
            return i, f"value {flat[i][~np.isfinite(flat[i])][0]} is not finite"
    if input == "tokens":
        bad = ((flat < 0) | (flat >= vocab_size)).any(axis=1)
        if bad.any():
            i = int(np.argmax(bad))
            v = flat[i][(flat[i] < 0) | (flat[i] >= vocab_size)][0]
            return i, f"token id {int(v)} is outside the vocabulary 0..{vocab_size - 1}"
    return None


# Arrow's fixed-width numeric types, as numpy reads their value buffers (little-endian hosts).
_ARROW_NUMPY = {f"{k}{b}": np.dtype(f"<{c}{b // 8}") for k, c in (("int", "i"), ("uint", "u")) for b in (8, 16, 32, 64)}
_ARROW_NUMPY.update({"float": np.dtype("<f4"), "double": np.dtype("<f8")})


def numeric(col) -> np.ndarray:
    """A null-free numeric pyarrow Array or ChunkedArray as numpy: a read-only view of its values
    buffer when it is one chunk. pyarrow's own to_numpy goes through its pandas conversion and
    imports pandas when pandas is installed (0.26 s in every process that opens a store)."""
    dtype = _ARROW_NUMPY.get(str(col.type))
    if dtype is None:
        raise TypeError(f"numeric() takes int/uint/float columns, not {col.type}")
    parts = []
    for chunk in getattr(col, "chunks", [col]):
        if chunk.null_count:
            raise ValueError("numeric() takes columns without missing values")
        if len(chunk):
            parts.append(np.frombuffer(chunk.buffers()[1], dtype=dtype)[chunk.offset:chunk.offset + len(chunk)])
    if not parts:
        return np.empty(0, dtype=dtype)
    return parts[0] if len(parts) == 1 else np.concatenate(parts)
