"""Small generated sources in the real file layouts, with learnable structure: for tests and examples
(no download is possible here). Every function is seeded and deterministic.

- CIFAR: ``cifar10_contents`` / ``cifar100_contents`` give the files' dicts as the official
  pickles hold them (bytes keys; b'data' uint8 (N, 3072), R plane then G then B); ``write_cifar``
  writes them as ``cifar-10-python.tar.gz`` / ``cifar-100-python.tar.gz`` do (a folder
  ``cifar-10-batches-py/`` or ``cifar-100-python/``), or as the extracted folder. Pickles are
  written as Python 2's cPickle wrote the originals (protocol 2, byte strings as BINSTRING,
  ``numpy.core.multiarray._reconstruct``): ``py2_pickle``. Each class is a colour plus a striped
  pattern of its own orientation and frequency, with per-image phase and pixel noise.
- Shakespeare: ``shakespeare_json`` gives LEAF's all_data object (users, hierarchies,
  num_samples, user_data {x: 80-character strings, y: the next character}); each role speaks a
  text from its own word-level Markov chain over a small lexicon, so the next character is
  predictable from the previous ones (a character model beats the most frequent character).
  ``write_shakespeare`` writes it as ``all_data.json`` or as LEAF's ``train/`` and ``test/``.
- Arrays: ``arrays_sample`` gives the members of an npz for ``simfed partition arrays``
  (features, tokens or images, with a ``client`` array); ``write_npz`` saves them.

Example (an example's header): ``python -c "from simfed.partitions.samples import write_cifar,
cifar10_contents; write_cifar('data/cifar10-sample.tar.gz', cifar10_contents())"``, then
``simfed partition cifar data/cifar10-sample.tar.gz data/cifar10 --scheme iid --clients 10``.
"""

from __future__ import annotations

import io
import json
import struct
import tarfile
from pathlib import Path

import numpy as np

from simfed.partitions.shakespeare import ALL_LETTERS, SEQ_LEN

# -- CIFAR


def _images(n: int, num_classes: int, seed: int) -> tuple[np.ndarray, list[int]]:
    """(uint8 (n, 3072) rows R, G, B planes, labels) with a colour and a stripe pattern per class."""
    rng = np.random.default_rng([seed, 0xC1FA])
    crng = np.random.default_rng([num_classes, 0xC1FA])  # the class look is the same in every file
    colour = crng.uniform(40, 215, (num_classes, 3))
    theta, freq = crng.uniform(0, np.pi, num_classes), crng.uniform(0.2, 1.2, num_classes)
    tint = crng.choice([-1.0, 1.0], (num_classes, 3))
    y = rng.permutation(np.arange(n) % num_classes)
    yy, xx = np.mgrid[0:32, 0:32].astype(np.float64)
    phase = rng.uniform(0, 2 * np.pi, n)
    wave = np.sin(freq[y, None, None] * (np.cos(theta[y])[:, None, None] * xx + np.sin(theta[y])[:, None, None] * yy)
                  + phase[:, None, None])
    img = colour[y][:, :, None, None] + 45 * tint[y][:, :, None, None] * wave[:, None] \
        + rng.normal(0, 12, (n, 3, 32, 32))
    return np.clip(np.rint(img), 0, 255).astype(np.uint8).reshape(n, 3072), y.tolist()


def cifar10_contents(per_batch: int = 100, test: int = 100, seed: int = 0) -> dict[str, dict]:
    """{file name: dict} of a CIFAR-10 python archive with `per_batch` rows per train batch."""
    out = {}
    for i, name in enumerate(["data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4", "data_batch_5",
                              "test_batch"]):
        n = test if name == "test_batch" else per_batch
        x, y = _images(n, 10, seed * 10 + i)
        label = "testing batch 1 of 1" if name == "test_batch" else f"training batch {i + 1} of 5"
        out[name] = {b"batch_label": label.encode(), b"labels": y, b"data": x,
                     b"filenames": [f"img_{i}_{j:05d}.png".encode() for j in range(n)]}
    out["batches.meta"] = {b"num_cases_per_batch": per_batch, b"num_vis": 3072,
                           b"label_names": [n.encode() for n in ("airplane", "automobile", "bird", "cat", "deer",
                                                                 "dog", "frog", "horse", "ship", "truck")]}
    return out


def cifar100_contents(train: int = 500, test: int = 200, seed: int = 0) -> dict[str, dict]:
    """{file name: dict} of a CIFAR-100 python archive; coarse label = fine // 5 (ours, not CIFAR's map)."""
    out = {}
    for i, (name, n) in enumerate([("train", train), ("test", test)]):
        x, fine = _images(n, 100, seed * 10 + i)
        out[name] = {b"filenames": [f"img_{name}_{j:05d}.png".encode() for j in range(n)],
                     b"batch_label": f"{'training' if name == 'train' else 'testing'} batch 1 of 1".encode(),
                     b"fine_labels": fine, b"coarse_labels": [f // 5 for f in fine], b"data": x}
    out["meta"] = {b"fine_label_names": [f"fine_{i:02d}".encode() for i in range(100)],
                   b"coarse_label_names": [f"coarse_{i:02d}".encode() for i in range(20)]}
    return out


def _emit(obj, out: list[bytes]) -> None:
    """Protocol-2 opcodes for obj, as Python 2's cPickle writes them (no memo: CIFAR shares nothing)."""
    if obj is None:
        out.append(b"N")
    elif isinstance(obj, bool):
        out.append(b"\x88" if obj else b"\x89")
    elif isinstance(obj, int):
        out.append(b"K" + bytes([obj]) if 0 <= obj < 256 else
                   b"M" + struct.pack("<H", obj) if 0 <= obj < 65536 else b"J" + struct.pack("<i", obj))
    elif isinstance(obj, bytes):
        out.append(b"U" + bytes([len(obj)]) + obj if len(obj) < 256 else b"T" + struct.pack("<I", len(obj)) + obj)
    elif isinstance(obj, str):
        data = obj.encode("utf-8")
        out.append(b"X" + struct.pack("<I", len(data)) + data)
    elif isinstance(obj, tuple):
        out.append(b"(")
        for v in obj:
            _emit(v, out)
        out.append(b"t")
    elif isinstance(obj, list):
        out.append(b"](")
        for v in obj:
            _emit(v, out)
        out.append(b"e")
    elif isinstance(obj, dict):
        out.append(b"}(")
        for k, v in obj.items():
            _emit(k, out)
            _emit(v, out)
        out.append(b"u")
    elif isinstance(obj, np.ndarray):  # numpy.core.multiarray._reconstruct(ndarray, (0,), b"b"), then its state
        out.append(b"cnumpy.core.multiarray\n_reconstruct\n(cnumpy\nndarray\n")
        _emit((0,), out)
        _emit(b"b", out)
        out.append(b"tR")
        _emit((1, tuple(int(v) for v in obj.shape), obj.dtype, False, np.ascontiguousarray(obj).tobytes()), out)
        out.append(b"b")
    elif isinstance(obj, np.dtype):  # numpy.dtype("u1", 0, 1) with its state, as numpy 1.x under Python 2
        out.append(b"cnumpy\ndtype\n")
        _emit((obj.str[1:].encode(), 0, 1), out)
        out.append(b"R")
        _emit((3, obj.str[:1].encode(), None, None, None, -1, -1, 0), out)
        out.append(b"b")
    else:
        raise TypeError(f"py2_pickle: cannot write {type(obj).__name__}")


def py2_pickle(obj) -> bytes:
    """obj as a protocol-2 pickle the way Python 2 wrote CIFAR's files (loads with encoding="bytes")."""
    out: list[bytes] = [b"\x80\x02"]
    _emit(obj, out)
    out.append(b".")
    return b"".join(out)


def write_cifar(path, contents: dict[str, dict] | None = None, members: dict[str, bytes] | None = None) -> Path:
    """Write CIFAR files: a tar archive when PATH ends in .tar.gz/.tgz/.tar, else the extracted folder.

    `contents` ({file name: dict}) are pickled with py2_pickle under the official folder name;
    `members` ({path in the archive: bytes}) are written as given (for damaged archives in tests).
    """
    path = Path(path)
    files = dict(members or {})
    if contents is not None:
        folder = "cifar-10-batches-py" if "batches.meta" in contents or "data_batch_1" in contents \
            else "cifar-100-python"
        files = {f"{folder}/{name}": py2_pickle(d) for name, d in contents.items()} | files
        if folder == "cifar-10-batches-py":
            files.setdefault(f"{folder}/readme.html", b"<html>generated sample, not CIFAR-10</html>\n")
    if path.name.endswith((".tar.gz", ".tgz", ".tar")):
        path.parent.mkdir(parents=True, exist_ok=True)
        with tarfile.open(path, "w:gz" if not path.name.endswith(".tar") else "w") as tar:
            for name, data in files.items():
                ti = tarfile.TarInfo(name)
                ti.size, ti.mtime, ti.mode = len(data), 1_262_304_000, 0o644
                tar.addfile(ti, io.BytesIO(data))
        return path
    for name, data in files.items():
        (path / name).parent.mkdir(parents=True, exist_ok=True)
        (path / name).write_bytes(data)
    return path


# -- Shakespeare (LEAF JSON)

_PLAYS = ("THE_TEMPEST", "HAMLET", "KING_LEAR", "OTHELLO", "MACBETH", "TWELFTH_NIGHT")
_ROLES = ("PROSPERO", "MIRANDA", "ARIEL", "CALIBAN", "GONZALO", "FERDINAND", "HORATIO", "OPHELIA", "EDGAR",
          "KENT", "IAGO", "EMILIA", "BANQUO", "VIOLA", "MALVOLIO", "FESTE")


def _role_text(rng: np.random.Generator, lexicon: list[str], length: int) -> str:
    """A role's text: words from its own Markov chain (2 likely successors per word), with punctuation."""
    words = [lexicon[i] for i in rng.choice(len(lexicon), 10, replace=False)]
    succ = rng.integers(0, len(words), (len(words), 2))
    out, w, cap = [], int(rng.integers(len(words))), True
    while sum(map(len, out)) < length:
        word = words[w]
        out.append((word.capitalize() if cap else word))
        r = rng.random()
        out.append(".\n" if r < 0.08 else ", " if r < 0.2 else " ")
        cap = r < 0.08
        w = int(succ[w, int(rng.random() < 0.3)])
    return "".join(out)[:length]


def shakespeare_json(roles: int = 8, min_rows: int = 60, max_rows: int = 160, seed: int = 0) -> dict:
    """LEAF's all_data object: one user per role, x = 80 characters, y = the next one."""
    rng = np.random.default_rng([seed, 0x5A4E])
    letters = "abcdefghijklmnoprstuvwy"
    lexicon = ["".join(rng.choice(list(letters), int(rng.integers(2, 7)))) for _ in range(40)]
    users, plays, counts, data = [], [], [], {}
    for r in range(roles):
        play = _PLAYS[r % len(_PLAYS)]
        user = f"{play}_{_ROLES[r % len(_ROLES)]}" + (f"_{r // len(_ROLES)}" if r >= len(_ROLES) else "")
        n = int(rng.integers(min_rows, max_rows + 1))
        text = _role_text(rng, lexicon, n + SEQ_LEN)
        assert set(text) <= set(ALL_LETTERS)
        data[user] = {"x": [text[i:i + SEQ_LEN] for i in range(n)], "y": [text[i + SEQ_LEN] for i in range(n)]}
        users.append(user)
        plays.append(play)
        counts.append(n)
    return {"users": users, "hierarchies": plays, "num_samples": counts, "user_data": data}


def write_shakespeare(path, obj: dict, layout: str = "all_data", train_fraction: float = 0.8,
                      seed: int = 0) -> Path:
    """Write `obj` as PATH/all_data.json, or (layout "split") as LEAF's by-sample split: PATH/train/ and
    PATH/test/ with each role's rows drawn at random (LEAF's split_data.py), kept in their order."""
    path = Path(path)
    if layout == "all_data":
        path.mkdir(parents=True, exist_ok=True)
        (path / "all_data.json").write_text(json.dumps(obj))
        return path
    rng = np.random.default_rng([seed, 0x5B11])
    parts = {"train": {"users": [], "num_samples": [], "user_data": {}},
             "test": {"users": [], "num_samples": [], "user_data": {}}}
    for user in obj["users"]:
        d = obj["user_data"][user]
        n = len(d["y"])
        k = max(1, int(train_fraction * n))
        is_train = np.zeros(n, bool)
        is_train[rng.choice(n, k, replace=False)] = True
        for name, mask in (("train", is_train), ("test", ~is_train)):
            rows = np.flatnonzero(mask)
            parts[name]["users"].append(user)
            parts[name]["num_samples"].append(len(rows))
            parts[name]["user_data"][user] = {"x": [d["x"][i] for i in rows], "y": [d["y"][i] for i in rows]}
    for name, part in parts.items():
        (path / name).mkdir(parents=True, exist_ok=True)
        (path / name / f"all_data_niid_0_keep_0_{name}_8.json").write_text(json.dumps(part))
    return path


# -- arrays (npz)


def arrays_sample(kind: str = "features", n: int = 600, clients: int = 6, num_classes: int = 4,
                  seed: int = 0) -> dict[str, np.ndarray]:
    """Members of an npz for `simfed partition arrays`: x, y, client (names "user_k") and, for tokens, vocab.

    features: float32 (n, 16), class mean + client shift + noise; tokens: int32 (n, 12) ids into a
    30-token vocabulary, each class favouring its own tokens; images: uint8 (n, 1, 8, 8), a bright
    class-specific square on noise."""
    rng = np.random.default_rng([seed, 0xA77A])
    y = rng.integers(0, num_classes, n)
    client = np.array([f"user_{c}" for c in rng.integers(0, clients, n)])
    if kind == "features":
        means = rng.normal(0, 2, (num_classes, 16))
        shift = rng.normal(0, 0.5, (clients, 16))[np.searchsorted(np.unique(client), client)]
        x = (means[y] + shift + rng.normal(0, 1, (n, 16))).astype(np.float32)
        return {"x": x, "y": y, "client": client}
    if kind == "tokens":
        favourite = rng.integers(0, 30, (num_classes, 4))
        common = rng.random((n, 12)) < 0.6
        x = np.where(common, favourite[y][np.arange(n)[:, None], rng.integers(0, 4, (n, 12))],
                     rng.integers(0, 30, (n, 12))).astype(np.int32)
        vocab = np.array([f"tok{i}" for i in range(30)])
        return {"x": x, "y": y, "client": client, "vocab": vocab}
    if kind == "images":
        x = rng.integers(0, 60, (n, 1, 8, 8))
        for k in range(num_classes):
            r, c = divmod(k % 9, 3)
            x[y == k, 0, 2 * r:2 * r + 3, 2 * c:2 * c + 3] += 180
        return {"x": np.clip(x, 0, 255).astype(np.uint8), "y": y, "client": client}
    raise ValueError(f"arrays_sample: kind must be features, tokens or images, got {kind!r}")


def write_npz(path, arrays: dict[str, np.ndarray], compressed: bool = True) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        (np.savez_compressed if compressed else np.savez)(f, **arrays)
    return path
