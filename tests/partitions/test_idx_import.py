"""IDX importer on generated files (gzip and plain) and error handling."""

from __future__ import annotations

import gzip

import numpy as np
import pytest

from simfed.core.errors import SimfedError
from simfed.partitions.idx import import_idx, read_idx
from simfed.partitions.store import PartitionStore


def write_idx(path, arr, gz=False):
    codes = {np.uint8: 0x08}
    header = bytes([0, 0, codes[arr.dtype.type], arr.ndim])
    header += b"".join(int(d).to_bytes(4, "big") for d in arr.shape)
    data = header + arr.tobytes()
    path.write_bytes(gzip.compress(data) if gz else data)


@pytest.fixture(params=[False, True], ids=["plain", "gzip"])
def mnist_dir(tmp_path, request):
    rng = np.random.default_rng(0)
    gz = request.param
    ext = ".gz" if gz else ""
    data = {}
    for part, n in (("train", 1500), ("t10k", 500)):
        x = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        y = rng.integers(0, 10, n).astype(np.uint8)
        write_idx(tmp_path / f"{part}-images-idx3-ubyte{ext}", x, gz)
        write_idx(tmp_path / f"{part}-labels-idx1-ubyte{ext}", y, gz)
        data[part] = (x, y)
    return tmp_path, data


def test_read_idx_round_trip(mnist_dir):
    d, data = mnist_dir
    f = next(d.glob("train-images*"))
    np.testing.assert_array_equal(read_idx(f), data["train"][0])


def test_import_pools_train_and_test_and_preserves_samples(mnist_dir, tmp_path_factory):
    d, data = mnist_dir
    out = tmp_path_factory.mktemp("o") / "s"
    store = PartitionStore.open(import_idx(d, out, scheme="iid", clients=20, seed=0))
    assert store.manifest["counts"]["total"] == 2000
    x = np.concatenate([store.read(int(c), s)[0] for c in store.client_ids()
                        for s in ("train", "val", "test")])
    y = np.concatenate([store.read(int(c), s)[1] for c in store.client_ids()
                        for s in ("train", "val", "test")])
    xs = np.concatenate([data["train"][0], data["t10k"][0]])[:, None]
    ys = np.concatenate([data["train"][1], data["t10k"][1]])
    # Same multiset of (label, image) as the source.
    key = lambda a, b: sorted(zip(b.tolist(), map(bytes, a)))  # noqa: E731
    assert key(x, y) == key(xs, ys)
    assert store.classes == [str(i) for i in range(10)]


def test_import_single_images_file(mnist_dir, tmp_path_factory):
    d, _ = mnist_dir
    img = next(d.glob("t10k-images*"))
    store = PartitionStore.open(import_idx(img, tmp_path_factory.mktemp("o") / "s",
                                           scheme="classes", clients=10, classes_per_client=2))
    assert store.manifest["counts"]["total"] == 500
    assert store.clients.column("n_classes").to_pylist() == [2] * 10


def test_wrong_magic_names_the_file(mnist_dir, tmp_path_factory):
    d, _ = mnist_dir
    f = next(d.glob("train-labels*"))
    f.write_bytes(b"\x12\x34\x56\x78" + b"\x00" * 100)
    out = tmp_path_factory.mktemp("o") / "s"
    with pytest.raises(SimfedError, match="wrong magic number") as err:
        import_idx(d, out, scheme="iid", clients=5)
    assert f.name in str(err.value)
    assert not out.exists()


def test_truncated_and_missing(tmp_path):
    x = np.zeros((10, 28, 28), np.uint8)
    write_idx(tmp_path / "train-images-idx3-ubyte", x)
    raw = (tmp_path / "train-images-idx3-ubyte").read_bytes()
    (tmp_path / "train-images-idx3-ubyte").write_bytes(raw[:-5])
    with pytest.raises(SimfedError, match="truncated or corrupt"):
        read_idx(tmp_path / "train-images-idx3-ubyte")
    with pytest.raises(SimfedError, match="labels file train-labels-idx1-ubyte is missing"):
        import_idx(tmp_path, tmp_path / "out", scheme="iid", clients=2)
    with pytest.raises(SimfedError, match="no such file"):
        import_idx(tmp_path / "nope", tmp_path / "out", scheme="iid", clients=2)


def _sparse(tmp_path, labels):
    rng = np.random.default_rng(1)
    write_idx(tmp_path / "train-images-idx3-ubyte", rng.integers(0, 256, (len(labels), 28, 28), dtype=np.uint8))
    write_idx(tmp_path / "train-labels-idx1-ubyte", np.asarray(labels, np.uint8))
    return tmp_path


def test_a_mostly_empty_label_space_is_refused_compacted_or_kept_with_one_note(tmp_path):
    """Labels reaching 255 while 11 values occur: refused by default (naming both options);
    --compact-labels renumbers them 0..10 with the original labels as class names; --keep-labels
    keeps 256 classes. Each written store comes with exactly one note."""
    labels = np.arange(60) % 10
    labels[::6] = 255
    (tmp_path / "src").mkdir()
    src = _sparse(tmp_path / "src", labels)
    with pytest.raises(SimfedError, match="11 of the 256 labels.*--compact-labels.*--keep-labels"):
        import_idx(src, str(tmp_path / "refused"), scheme="iid", clients=3)
    assert not (tmp_path / "refused").exists()
    notes: list[str] = []
    store = PartitionStore.open(import_idx(src, str(tmp_path / "compact"), scheme="iid", clients=3,
                                           labels="compact", on_note=notes.append))
    assert store.num_classes == 11 and store.manifest["classes"] == [*map(str, range(10)), "255"]
    ys = np.concatenate([store.read(c, s)[1] for c in store.client_ids() for s in ("train", "val", "test")])
    assert sorted(np.bincount(ys).tolist()) == sorted(np.bincount(np.searchsorted(np.unique(labels), labels)).tolist())
    assert len(notes) == 1 and "renumbered them 0..10" in notes[0]
    notes.clear()
    store = PartitionStore.open(import_idx(src, str(tmp_path / "keep"), scheme="iid", clients=3, labels="keep",
                                           on_note=notes.append))
    assert store.num_classes == 256 and len(notes) == 1 and "245 of them empty" in notes[0]


def test_a_few_empty_classes_are_kept_with_a_note(tmp_path):
    labels = np.arange(60) % 10
    labels[labels == 7] = 3  # class 7 never occurs
    notes: list[str] = []
    store = PartitionStore.open(import_idx(_sparse(tmp_path, labels), str(tmp_path / "out"), scheme="iid",
                                           clients=3, on_note=notes.append))
    assert store.num_classes == 10
    assert len(notes) == 1 and "9 of the 10 labels" in notes[0] and "e.g. 7" in notes[0] and "--compact-labels" in notes[0]
