"""Importer for a user's own data: one ``.npz`` file of numpy arrays.

Format facts (numpy.lib.format): an .npz is a zip archive of ``NAME.npy`` members (numpy.savez,
stored; savez_compressed, deflated); each .npy is a magic string and version, a header dict
{'descr', 'fortran_order', 'shape'}, then the raw values.

Members read (others are ignored):
- ``x`` (required): (N, *sample_shape), uint8, int32 or float32 (either byte order); any fixed
  sample shape of 1 to 8 dimensions: images (C, H, W), sequences (L,), features (D,).
- ``y`` (required): (N,) integer labels >= 0; num_classes = max(y) + 1 unless ``classes`` is given.
- ``client`` (optional): (N,) integers or strings; one client per distinct value, in order of
  first appearance (the natural partition, the default when present; the value is the client's name).
- ``classes`` (optional): class names (strings), at least max(y) + 1 of them.
- ``vocab`` (optional): token strings; x then holds token ids (input "tokens").

Ours:
- How the model sees x (``input``): "tokens" with a vocabulary (``vocab`` member or
  ``vocab_size``, then tokens are named "0".."V-1"), else "unit" (x / 255) for uint8 and "raw"
  (float32 values) otherwise; ``input`` overrides it ("raw" for uint8 features, say).
- Without ``client`` (or with an explicit scheme) samples are split over clients like the IDX
  importer (simfed.partitions.pooled): classes, dirichlet or iid; each client split 0.7/0.15/0.15.
- Safety: nothing is unpickled (object arrays are refused); each member's header is read first,
  and a shape whose size exceeds what the member holds (or MAX_ARRAY_BYTES) is refused before any
  allocation, so a forged 1e9-element header costs nothing. float32 x must be finite and tokens
  within the vocabulary (one line naming the row).
"""

from __future__ import annotations

import math
import os
import zipfile
import zlib
from pathlib import Path

import numpy as np

from simfed.core import validate
from simfed.core.errors import SimfedError
from simfed.core.safeio import regular_file
from simfed.partitions import dtypes, pooled, schemes
from simfed.partitions.writer import MAX_CLASSES

MAX_ARRAY_BYTES = 4 << 30
MEMBERS = ("x", "y", "client", "classes", "vocab")


def _read_member(zf: zipfile.ZipFile, info: zipfile.ZipInfo, where: str) -> np.ndarray:
    """One .npy member: header first, then exactly the bytes its shape needs."""
    with zf.open(info) as f:
        version = np.lib.format.read_magic(f)
        if version == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
        elif version in ((2, 0), (3, 0)):
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
        else:
            raise ValueError(f"unsupported .npy version {version}")
        if dtype.hasobject:
            raise SimfedError(f"{where}: an object array (it would need pickle, which is refused); save plain "
                              "numbers or strings")
        need = math.prod(shape) * dtype.itemsize
        if need > min(info.file_size, MAX_ARRAY_BYTES):
            raise SimfedError(f"{where}: the header promises shape {shape} of {dtype} ({need:,} bytes) but the "
                              f"member holds {info.file_size:,}; the file is corrupt or forged")
        data = f.read(need + 1)
    if len(data) != need:
        raise SimfedError(f"{where}: {len(data):,} bytes of data, the header promises {need:,} for shape {shape}")
    arr = np.frombuffer(data, dtype=dtype)
    return arr.reshape(shape[::-1]).T if fortran else arr.reshape(shape)


def load_npz(src: str | os.PathLike) -> dict[str, np.ndarray]:
    """The members of MEMBERS that SRC holds, each read safely (see the module docstring)."""
    src = Path(src)
    regular_file(src, "npz file")
    out = {}
    try:
        with zipfile.ZipFile(src) as zf:
            infos = {i.filename[:-4]: i for i in zf.infolist() if i.filename.endswith(".npy")}
            for name in MEMBERS:
                if name in infos:
                    out[name] = _read_member(zf, infos[name], f"{src}: {name}")
    except SimfedError:
        raise
    except (zipfile.BadZipFile, zlib.error, EOFError, OSError, ValueError, TypeError,
            SyntaxError, NotImplementedError) as exc:
        text = str(exc).splitlines()[0][:160] if str(exc) else type(exc).__name__
        raise SimfedError(f"{src}: not a readable .npz file ({text}); save it with numpy.savez") from None
    for name in ("x", "y"):
        if name not in out:
            raise SimfedError(f"{src}: no '{name}' array (members: {', '.join(sorted(out)) or 'none'}); save "
                              "numpy.savez(path, x=..., y=...)")
    return out


def _strings(a: np.ndarray, what: str, where: str) -> list[str]:
    if a.ndim != 1 or a.dtype.kind not in "US" or len(a) == 0:
        raise SimfedError(f"{where}: '{what}' must be a 1-d array of strings, got {a.dtype} {a.shape}")
    return [v.decode("utf-8", "replace") if isinstance(v, bytes) else str(v) for v in a.tolist()]


def check_arrays(a: dict[str, np.ndarray], src: str, input: str | None, vocab_size: int | None):
    """(x, y, client or None, classes, dtype, input, vocab) from the npz members, or one error line."""
    x, y = a["x"], a["y"]
    dtype = next((k for k, d in dtypes.DTYPES.items() if x.dtype.kind == d.kind and x.dtype.itemsize == d.itemsize),
                 None)
    if dtype is None:
        raise SimfedError(f"{src}: x has dtype {x.dtype}; supported: uint8, int32, float32 (convert with "
                          "x.astype(np.float32), say)")
    if x.ndim < 2:
        raise SimfedError(f"{src}: x has shape {x.shape}; it must be (N, *sample_shape), e.g. (N, 1) for one feature")
    if y.ndim != 1 or y.dtype.kind not in "iu":
        raise SimfedError(f"{src}: y must be 1-d integer labels, got {y.dtype} of shape {y.shape}")
    if len(y) != len(x):
        raise SimfedError(f"{src}: x has {len(x)} samples but y has {len(y)} labels; they must match")
    if len(y) == 0:
        raise SimfedError(f"{src}: no samples")
    if y.min() < 0 or y.max() >= MAX_CLASSES:
        raise SimfedError(f"{src}: label {int(y.min() if y.min() < 0 else y.max())} out of range 0..{MAX_CLASSES - 1}")
    num = int(y.max()) + 1
    classes = _strings(a["classes"], "classes", src) if "classes" in a else [str(i) for i in range(num)]
    if len(classes) < num:
        raise SimfedError(f"{src}: label {num - 1} but only {len(classes)} class names")
    client = a.get("client")
    if client is not None and (client.ndim != 1 or client.dtype.kind not in "iuUS" or len(client) != len(y)):
        raise SimfedError(f"{src}: client must be {len(y)} integers or strings (one per sample), got "
                          f"{client.dtype} of shape {client.shape}")
    if "vocab" in a and vocab_size is not None:
        raise SimfedError(f"{src}: has a vocab array; --vocab-size is only for files without one")
    vocab = _strings(a["vocab"], "vocab", src) if "vocab" in a else \
        [str(i) for i in range(vocab_size)] if vocab_size else None
    input = input or dtypes.default_input(dtype, vocab)
    dtypes.check_kind(x.shape[1:], dtype, input, vocab, src)
    x = dtypes.as_dtype(x, dtype, src)
    bad = dtypes.first_bad_row(x, input, len(vocab or ()))
    if bad is not None:
        raise SimfedError(f"{src}: x row {bad[0]}: {bad[1]}; clean or drop that row")
    return x, y.astype(np.int64), client, classes, dtype, input, vocab


def import_arrays(src, out, *, scheme: str | None = None, clients: int | None = None,
                  classes_per_client: int | None = None, alpha: float | None = None, input: str | None = None,
                  vocab_size: int | None = None, unseen_fraction: float = 0.1, seed: int = 0,
                  val_fraction: float = schemes.DEFAULT_VAL_FRACTION,
                  test_fraction: float = schemes.DEFAULT_TEST_FRACTION, overwrite: bool = False,
                  progress: bool = False, labels: str | None = None, on_note: pooled.Note | None = None) -> str:
    """Import an npz (x, y, optional client/classes/vocab) into a store at OUT; returns OUT. `labels`
    and `on_note`: empty classes, as in pooled.label_space (class names from the file count as given)."""
    if input is not None and input not in dtypes.INPUTS:
        raise SimfedError(f"--input must be one of {', '.join(dtypes.INPUTS)}, got {input!r}")
    if vocab_size is not None:
        validate.integer("--vocab-size", vocab_size, 1, dtypes.MAX_VOCAB)
    if scheme is not None and scheme != "natural" and clients is None:
        raise SimfedError(f"--scheme {scheme} needs --clients N")
    pooled.check_args(out, overwrite, [src], scheme=scheme or "natural", clients=clients or 1, seed=seed,
                      alpha=alpha, classes_per_client=classes_per_client, val_fraction=val_fraction,
                      test_fraction=test_fraction, unseen_fraction=unseen_fraction, labels=labels)
    members = load_npz(src)
    x, y, client, classes, dtype, input, vocab = check_arrays(members, str(src), input, vocab_size)
    y, classes = pooled.label_space(y, classes, derived="classes" not in members, labels=labels, where=str(src),
                                    note=on_note)
    scheme = scheme or ("natural" if client is not None else None)
    if scheme is None:
        raise SimfedError(f"{src}: no 'client' array, so give --scheme classes, dirichlet or iid and --clients N")
    if scheme == "natural" and client is None:
        raise SimfedError(f"{src}: --scheme natural needs a 'client' array in the file (one value per sample)")
    names = None
    if scheme == "natural":
        _, first = np.unique(client, return_index=True)
        names = {i: str(client[j]) for i, j in enumerate(np.sort(first))}
        if len(names) > schemes.MAX_CLIENTS:
            raise SimfedError(f"{src}: {len(names):,} distinct clients; at most {schemes.MAX_CLIENTS:,}")
    source = {"importer": "arrays", "src": str(src), "scheme": scheme, "clients": len(names) if names else clients,
              "classes_per_client": classes_per_client, "alpha": alpha, "seed": seed,
              "val_fraction": val_fraction, "test_fraction": test_fraction,
              **({"labels": labels} if labels else {})}
    return pooled.write_by_scheme(out, x, y, classes=classes, scheme=scheme, clients=clients or len(names or ()),
                                  seed=seed, classes_per_client=classes_per_client, alpha=alpha, groups=client,
                                  names=names, unseen_fraction=unseen_fraction, val_fraction=val_fraction,
                                  test_fraction=test_fraction, source=source, overwrite=overwrite,
                                  progress=progress, dtype=dtype, input=input, vocab=vocab)
