"""Partition store: round trip, zero-copy views, pickling, checksums, atomic writes."""

from __future__ import annotations

import json
import pickle

import numpy as np
import pyarrow.parquet as pq
import pytest

from simfed.core.errors import SimfedError
from simfed.partitions import writer as writer_mod
from simfed.partitions.store import PartitionStore, write_store


def _arrays(n=3000, clients=40, seed=0, shape=(1, 28, 28)):
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 256, (n, *shape), dtype=np.uint8)
    y = rng.integers(0, 10, n)
    c = rng.integers(0, clients, n) * 7 + 3  # non-contiguous ids on purpose
    split = rng.choice(np.array(["train", "val", "test"]), n, p=[0.7, 0.15, 0.15])
    split[np.unique(c, return_index=True)[1]] = "train"  # every client >= 1 train row
    return x, y, c, split


@pytest.fixture()
def small(tmp_path, monkeypatch):
    # Tiny batches so clients are spread over many record batches (boundary handling).
    monkeypatch.setattr(writer_mod, "BATCH_BYTES", 20_000)
    x, y, c, split = _arrays()
    path = write_store(tmp_path / "s", x, y, c, split, classes=[str(i) for i in range(10)],
                       unseen_fraction=0.25, seed=1)
    return PartitionStore.open(path), (x, y, c, split)


def test_round_trip_every_client_and_split(small):
    store, (x, y, c, split) = small
    assert store.num_classes == 10 and store.sample_shape == (1, 28, 28)
    assert store.manifest["counts"]["total"] == len(y)
    assert store.client_ids().tolist() == sorted(set(c.tolist()))
    for cid in store.client_ids():
        for s in ("train", "val", "test"):
            xs, ys = store.read(int(cid), s)
            m = (c == cid) & (split == s)
            assert store.num_samples(int(cid), s) == m.sum()
            np.testing.assert_array_equal(xs, x[m])
            np.testing.assert_array_equal(ys, y[m])
            assert xs.dtype == np.uint8 and ys.dtype == np.int64


def test_clients_table_columns(small):
    store, (x, y, c, split) = small
    t = store.clients.to_pydict()
    for i, cid in enumerate(t["client_id"]):
        m = (c == cid) & (split == "train")
        assert t["n_train"][i] == m.sum()
        assert t["n_classes"][i] == len(np.unique(y[m]))
    assert set(t["cohort"]) == {"seen", "unseen"}
    assert len(store.client_ids("unseen")) == round(0.25 * 40)
    assert len(store.client_ids("seen")) + len(store.client_ids("unseen")) == 40


def test_reads_are_zero_copy_views(small):
    store, _ = small
    x, y = store.read(int(store.client_ids()[5]), "train")
    assert not x.flags.owndata and not x.flags.writeable
    assert not y.flags.owndata
    x2, _ = store.read(int(store.client_ids()[5]), "train")
    assert np.shares_memory(x, x2)  # the same mapped bytes, not a fresh copy


def test_pickle_sends_only_the_path(small):
    store, _ = small
    blob = pickle.dumps(store)
    assert len(blob) < 300
    clone = pickle.loads(blob)
    cid = int(store.client_ids()[3])
    np.testing.assert_array_equal(clone.read(cid, "val")[0], store.read(cid, "val")[0])


def test_seen_unseen_split_is_seeded(tmp_path):
    x, y, c, split = _arrays()
    a = write_store(tmp_path / "a", x, y, c, split, classes=list("0123456789"), seed=5)
    b = write_store(tmp_path / "b", x, y, c, split, classes=list("0123456789"), seed=5)
    d = write_store(tmp_path / "d", x, y, c, split, classes=list("0123456789"), seed=6)
    ua, ub, ud = (PartitionStore.open(p).client_ids("unseen").tolist() for p in (a, b, d))
    assert ua == ub and ua != ud
    e = write_store(tmp_path / "e", x, y, c, split, classes=list("0123456789"), unseen={3, 10})
    assert PartitionStore.open(e).client_ids("unseen").tolist() == [3, 10]


def test_manifest_checksums_and_verify(small):
    store, _ = small
    m = json.loads(open(f"{store.path}/manifest.json").read())
    assert set(m["files"]) == {"clients.parquet", "train.arrow", "val.arrow", "test.arrow"}
    PartitionStore.open(store.path, verify=True)
    with open(f"{store.path}/val.arrow", "r+b") as f:
        f.seek(100)
        b = f.read(1)
        f.seek(100)
        f.write(bytes([b[0] ^ 0xFF]))
    PartitionStore.open(store.path)  # cheap open does not read the data
    with pytest.raises(SimfedError, match="val.arrow: checksum mismatch"):
        PartitionStore.open(store.path, verify=True)


def test_client_without_train_rows_leaves_nothing(tmp_path):
    x, y, c, split = _arrays()
    split[c == c[0]] = "test"
    with pytest.raises(SimfedError, match="no training samples"):
        write_store(tmp_path / "s", x, y, c, split, classes=list("0123456789"))
    assert list(tmp_path.iterdir()) == []


def test_bad_labels_and_existing_output(tmp_path):
    x, y, c, split = _arrays()
    with pytest.raises(SimfedError, match="labels out of range"):
        write_store(tmp_path / "s", x, y, c, split, classes=list("01234"))
    assert list(tmp_path.iterdir()) == []
    write_store(tmp_path / "s", x, y, c, split, classes=list("0123456789"))
    with pytest.raises(SimfedError, match="already exists"):
        write_store(tmp_path / "s", x, y, c, split, classes=list("0123456789"))
    write_store(tmp_path / "s", x[:100], y[:100], c[:100], np.zeros(100, int),
                classes=list("0123456789"), overwrite=True)
    assert PartitionStore.open(tmp_path / "s").manifest["counts"]["total"] == 100


def test_open_errors_name_the_file(tmp_path):
    with pytest.raises(SimfedError, match="no such partition store"):
        PartitionStore.open(str(tmp_path / "nope"))
    (tmp_path / "s").mkdir()
    with pytest.raises(SimfedError, match="manifest.json: missing"):
        PartitionStore.open(str(tmp_path / "s"))
    (tmp_path / "s" / "manifest.json").write_text("{not json")
    with pytest.raises(SimfedError, match="manifest.json: malformed JSON"):
        PartitionStore.open(str(tmp_path / "s"))


def test_unknown_client_and_split(small):
    store, _ = small
    with pytest.raises(SimfedError, match="no client with id 1"):
        store.read(1, "train")
    with pytest.raises(SimfedError, match="split must be"):
        store.read(3, "dev")


def test_file_uri_and_multichannel(tmp_path):
    x, y, c, split = _arrays(n=500, clients=5, shape=(3, 8, 8))
    p = write_store(tmp_path / "rgb", x, y, c, split, classes=list("0123456789"))
    store = PartitionStore.open(f"file://{p}")
    assert store.sample_shape == (3, 8, 8)
    cid = int(store.client_ids()[0])
    m = (c == cid) & (split == "train")
    np.testing.assert_array_equal(store.read(cid, "train")[0], x[m])
    assert pq.read_table(f"{p}/clients.parquet").num_rows == 5


def test_tiny_store_fixture(tiny_store):
    store = PartitionStore.open(tiny_store)
    assert len(store.client_ids()) == 24
    assert store.num_classes == 62
    x, y = store.read(int(store.client_ids()[0]), "train")
    assert x.shape[1:] == (1, 28, 28) and len(x) == len(y) > 0
