"""CIFAR-10 / CIFAR-100 import from generated archives in the official pickle layout: per-class
counts, pixels (R, G, B planes), class names, both source layouts, the schemes, bad archives."""

from __future__ import annotations

import numpy as np
import pytest

from simfed.core.errors import SimfedError
from simfed.partitions import samples
from simfed.partitions.cifar import import_cifar, load_cifar, load_pickle
from simfed.partitions.store import PartitionStore

TRAIN10 = ["data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4", "data_batch_5"]


@pytest.fixture(scope="module")
def c10():
    return samples.cifar10_contents(per_batch=60, test=40, seed=1)


@pytest.fixture(scope="module")
def c100():
    return samples.cifar100_contents(train=400, test=200, seed=2)


def all_rows(store: PartitionStore):
    """Every stored (x, y) over all clients and splits."""
    xs, ys = [], []
    for cid in store.client_ids():
        for s in ("train", "val", "test"):
            x, y = store.read(int(cid), s)
            xs.append(x)
            ys.append(y)
    return np.concatenate(xs), np.concatenate(ys)


def as_sorted(x: np.ndarray, y: np.ndarray):
    """Rows with their labels in a canonical order (by pixel bytes, then label)."""
    keys = [bytes(r) + int(v).to_bytes(2, "little") for r, v in zip(x.reshape(len(x), -1), y)]
    order = sorted(range(len(keys)), key=keys.__getitem__)
    return x[order], y[order]


def test_cifar10_archive_pixels_planes_and_counts(tmp_path, c10):
    src = samples.write_cifar(tmp_path / "cifar-10-python.tar.gz", c10)
    x, y, classes, kind = load_cifar(src)
    assert kind == "cifar10" and x.shape == (340, 3, 32, 32) and x.dtype == np.uint8
    assert classes == [n.decode() for n in c10["batches.meta"][b"label_names"]]
    start = 0
    for name in TRAIN10 + ["test_batch"]:  # pooled in file order: train batches, then test
        data, labels = c10[name][b"data"], c10[name][b"labels"]
        for j in (0, 7, len(labels) - 1):
            row = data[j]
            assert np.array_equal(x[start + j, 0], row[:1024].reshape(32, 32))  # R plane
            assert np.array_equal(x[start + j, 1], row[1024:2048].reshape(32, 32))  # G plane
            assert np.array_equal(x[start + j, 2], row[2048:].reshape(32, 32))  # B plane
        assert y[start:start + len(labels)].tolist() == labels
        start += len(labels)

    out = import_cifar(src, tmp_path / "store", scheme="iid", clients=6, seed=3)
    store = PartitionStore.open(out, verify=True)
    store.check_contents()
    assert store.sample_shape == (3, 32, 32) and store.dtype == "uint8" and store.input == "unit"
    assert store.classes == classes
    sx, sy = all_rows(store)
    gen_x = np.concatenate([c10[n][b"data"] for n in TRAIN10 + ["test_batch"]]).reshape(-1, 3, 32, 32)
    gen_y = np.concatenate([c10[n][b"labels"] for n in TRAIN10 + ["test_batch"]])
    assert np.bincount(sy, minlength=10).tolist() == np.bincount(gen_y, minlength=10).tolist()
    for a, b in zip(as_sorted(sx, sy), as_sorted(gen_x, gen_y)):
        assert np.array_equal(a, b)  # every generated image stored once, with its label
    assert store.manifest["source"]["dataset"] == "cifar10"


def test_cifar10_extracted_folders_give_the_same_store(tmp_path, c10):
    tar = import_cifar(samples.write_cifar(tmp_path / "c.tar.gz", c10), tmp_path / "a", scheme="iid", clients=4)
    parent = samples.write_cifar(tmp_path / "extracted", c10)  # holds cifar-10-batches-py/
    b = import_cifar(parent, tmp_path / "b", scheme="iid", clients=4)
    c = import_cifar(parent / "cifar-10-batches-py", tmp_path / "c", scheme="iid", clients=4)
    files = [PartitionStore.open(p).manifest["files"] for p in (tar, b, c)]
    assert files[0] == files[1] == files[2]


def test_cifar100_fine_and_coarse(tmp_path, c100):
    src = samples.write_cifar(tmp_path / "cifar-100-python.tar.gz", c100)
    fine = np.concatenate([c100["train"][b"fine_labels"], c100["test"][b"fine_labels"]])
    coarse = np.concatenate([c100["train"][b"coarse_labels"], c100["test"][b"coarse_labels"]])
    s = PartitionStore.open(import_cifar(src, tmp_path / "fine", scheme="iid", clients=5))
    assert s.num_classes == 100 and s.classes == [f"fine_{i:02d}" for i in range(100)]
    assert np.bincount(all_rows(s)[1], minlength=100).tolist() == np.bincount(fine, minlength=100).tolist()
    s = PartitionStore.open(import_cifar(src, tmp_path / "coarse", scheme="iid", clients=5, label="coarse"))
    assert s.num_classes == 20 and s.classes[0] == "coarse_00"
    sx, sy = all_rows(s)
    assert np.bincount(sy, minlength=20).tolist() == np.bincount(coarse, minlength=20).tolist()
    gen_x = np.concatenate([c100["train"][b"data"], c100["test"][b"data"]]).reshape(-1, 3, 32, 32)
    for a, b in zip(as_sorted(sx, sy), as_sorted(gen_x, coarse)):
        assert np.array_equal(a, b)


def test_cifar_schemes(tmp_path, c10, c100):
    src10 = samples.write_cifar(tmp_path / "c10.tar.gz", c10)
    s = PartitionStore.open(import_cifar(src10, tmp_path / "k2", scheme="classes", classes_per_client=2,
                                         clients=10, seed=1))
    assert s.clients.column("n_classes").to_pylist() == [2] * 10
    s = PartitionStore.open(import_cifar(src10, tmp_path / "dir", scheme="dirichlet", alpha=0.3, clients=8,
                                         unseen_fraction=0.25))
    assert len(s.client_ids("unseen")) == 2 and s.manifest["counts"]["total"] == 340
    src100 = samples.write_cifar(tmp_path / "c100", c100)
    s = PartitionStore.open(import_cifar(src100, tmp_path / "k5", scheme="classes", classes_per_client=5,
                                         clients=20, seed=2))
    assert set(s.clients.column("n_classes").to_pylist()) == {5}


def test_restricted_unpickler_runs_nothing(tmp_path):
    marker = tmp_path / "pwned"
    evil = b"\x80\x02cos\nsystem\nX" + len(f"touch {marker}").to_bytes(4, "little") + f"touch {marker}".encode() \
        + b"\x85R."
    with pytest.raises(SimfedError, match="os.system, refused without running it"):
        load_pickle(evil, "data_batch_1")
    evil2 = b"\x80\x02cbuiltins\neval\nX\x04\x00\x00\x001+1\x85R."
    with pytest.raises(SimfedError, match="builtins.eval"):
        load_pickle(evil2, "x")
    assert not marker.exists()
    with pytest.raises(SimfedError, match="not a readable CIFAR pickle"):
        load_pickle(b"\x80\x02(((", "x")
    with pytest.raises(SimfedError, match="not a CIFAR file"):
        load_pickle(samples.py2_pickle([1, 2]), "x")


def _members(contents: dict) -> dict[str, bytes]:
    return {f"cifar-10-batches-py/{k}": samples.py2_pickle(v) for k, v in contents.items()}


@pytest.mark.parametrize("case", ["missing", "width", "labels", "meta", "both", "none", "not-tar"])
def test_bad_archives(tmp_path, c10, case):
    m = _members(c10)
    src = tmp_path / "bad.tar.gz"
    if case == "missing":
        del m["cifar-10-batches-py/data_batch_3"]
        message = "data_batch_3 is missing"
    elif case == "width":
        m["cifar-10-batches-py/data_batch_2"] = samples.py2_pickle(
            {**c10["data_batch_2"], b"data": c10["data_batch_2"][b"data"][:, :3071].copy()})
        message = "rows are 3071 bytes wide"
    elif case == "labels":
        m["cifar-10-batches-py/test_batch"] = samples.py2_pickle({**c10["test_batch"], b"labels": [0, 1]})
        message = "must be 40 integers"
    elif case == "meta":
        m["cifar-10-batches-py/batches.meta"] = samples.py2_pickle({b"label_names": [b"a"] * 9})
        message = "label_names must be a list of 10 names"
    elif case == "both":
        m["cifar-100-python/meta"] = b""
        message = "both CIFAR-10"
    elif case == "none":
        m = {"photos/readme.txt": b"hello"}
        message = "not a CIFAR archive"
    else:
        src.write_bytes(b"\x1f\x8b" + b"garbage" * 10)
        message = "not a readable tar archive"
    if case != "not-tar":
        samples.write_cifar(src, members=m)
    with pytest.raises(SimfedError, match=message):
        import_cifar(src, tmp_path / "out", scheme="iid", clients=3)
    assert not (tmp_path / "out").exists()


def test_bad_options(tmp_path, c10):
    src = samples.write_cifar(tmp_path / "c.tar.gz", c10)
    with pytest.raises(SimfedError, match="--label coarse is for CIFAR-100"):
        import_cifar(src, tmp_path / "o", scheme="iid", clients=3, label="coarse")
    with pytest.raises(SimfedError, match="--label must be fine or coarse"):
        import_cifar(src, tmp_path / "o", scheme="iid", clients=3, label="medium")
    with pytest.raises(SimfedError, match="no natural clients"):
        import_cifar(src, tmp_path / "o", scheme="natural", clients=3)
    with pytest.raises(SimfedError, match="--alpha"):
        import_cifar(src, tmp_path / "o", scheme="dirichlet", clients=3)


def test_generated_classes_are_learnable(c10):
    """Each class has its own colour and pattern: nearest mean colour on the test batch beats chance by far."""
    def colour(data):
        return data.reshape(len(data), 3, 1024).mean(axis=2)

    x = np.concatenate([c10[n][b"data"] for n in TRAIN10])
    y = np.concatenate([c10[n][b"labels"] for n in TRAIN10])
    means = np.stack([colour(x[y == k]).mean(axis=0) for k in range(10)])
    pred = np.argmin(((colour(c10["test_batch"][b"data"])[:, None] - means) ** 2).sum(axis=2), axis=1)
    assert (pred == np.array(c10["test_batch"][b"labels"])).mean() > 0.8
