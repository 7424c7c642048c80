"""LEAF JSON import: both layouts round-trip exactly (after uint8 quantization); bad input."""

from __future__ import annotations

import json

import numpy as np
import pytest

from simfed.core.errors import SimfedError
from simfed.partitions.leaf import import_leaf
from simfed.partitions.store import PartitionStore


def make_users(n_users=6, seed=0, prefix="f"):
    rng = np.random.default_rng(seed)
    users = {}
    for u in range(n_users):
        n = int(rng.integers(3, 15))
        users[f"{prefix}{u:04d}_{u % 3}"] = (rng.random((n, 784)).round(4),
                                             rng.integers(0, 62, n))
    return users


def write_leaf(path, users):
    obj = {"users": list(users), "num_samples": [len(v[1]) for v in users.values()],
           "user_data": {u: {"x": x.tolist(), "y": y.tolist()} for u, (x, y) in users.items()}}
    path.write_text(json.dumps(obj))


def quant(x):
    return np.rint(x * 255).astype(np.uint8).reshape(-1, 1, 28, 28)


def test_all_data_layout_round_trip(tmp_path):
    src = tmp_path / "leaf"
    src.mkdir()
    a, b = make_users(5, 0, "f"), make_users(4, 1, "g")
    write_leaf(src / "all_data_0.json", a)
    write_leaf(src / "all_data_1.json", b)
    store = PartitionStore.open(import_leaf(src, tmp_path / "out", seed=0))
    users = {**a, **b}
    t = store.clients.to_pydict()
    assert t["name"] == list(users)  # order of first appearance, files sorted by name
    for cid, name in zip(t["client_id"], t["name"]):
        x, y = users[name]
        total = sum(store.num_samples(cid, s) for s in ("train", "val", "test"))
        assert total == len(y)
        xs = np.concatenate([store.read(cid, s)[0] for s in ("train", "val", "test")])
        ys = np.concatenate([store.read(cid, s)[1] for s in ("train", "val", "test")])
        # Splits reorder rows; compare as multisets of (label, pixels).
        got = sorted(zip(ys.tolist(), map(bytes, xs)))
        want = sorted(zip(y.tolist(), map(bytes, quant(x))))
        assert got == want
    assert store.num_classes == 62 and store.classes[10] == "A"


def test_leaf_train_test_layout_keeps_leaf_split(tmp_path):
    src = tmp_path / "leaf"
    (src / "train").mkdir(parents=True)
    (src / "test").mkdir()
    tr, te = make_users(6, 2), make_users(6, 3)
    te = {u: v for u, v in zip(tr, te.values())}  # same writers, other samples
    write_leaf(src / "train" / "all_data_0_train_9.json", tr)
    write_leaf(src / "test" / "all_data_0_test_9.json", te)
    store = PartitionStore.open(import_leaf(src, tmp_path / "out"))
    for cid, name in zip(store.client_ids().tolist(), store.clients.column("name").to_pylist()):
        assert store.num_samples(cid, "train") == len(tr[name][1])
        assert store.num_samples(cid, "val") == 0
        assert store.num_samples(cid, "test") == len(te[name][1])
        x, y = store.read(cid, "train")
        np.testing.assert_array_equal(x, quant(tr[name][0]))  # LEAF order kept within a split
        np.testing.assert_array_equal(y, tr[name][1])
        x, y = store.read(cid, "test")
        np.testing.assert_array_equal(x, quant(te[name][0]))


@pytest.mark.parametrize("mutate, message", [
    (lambda o: o["user_data"].pop("f0001_1"), "user 'f0001_1' has no data"),
    (lambda o: o["user_data"]["f0002_2"].update(x=[[0.5] * 783]), "x row 0 has the wrong length"),
    (lambda o: o["user_data"]["f0000_0"]["y"].__setitem__(0, 62), "label 62 out of range"),
    (lambda o: o["num_samples"].__setitem__(0, 999), "num_samples says 999"),
    (lambda o: o["user_data"]["f0000_0"]["x"][0].__setitem__(3, 1.5), r"in \[0, 1\]"),
])
def test_bad_leaf_files_name_file_and_problem(tmp_path, mutate, message):
    src = tmp_path / "leaf"
    src.mkdir()
    users = make_users(3)
    obj = {"users": list(users), "num_samples": [len(v[1]) for v in users.values()],
           "user_data": {u: {"x": x.tolist(), "y": y.tolist()} for u, (x, y) in users.items()}}
    mutate(obj)
    (src / "all_data_0.json").write_text(json.dumps(obj))
    with pytest.raises(SimfedError, match=message) as err:
        import_leaf(src, tmp_path / "out")
    assert "all_data_0.json" in str(err.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["leaf"]


def test_malformed_json_and_missing_source(tmp_path):
    (tmp_path / "all_data_0.json").write_text('{"users": [')
    with pytest.raises(SimfedError, match="all_data_0.json: malformed JSON"):
        import_leaf(tmp_path, tmp_path / "out")
    with pytest.raises(SimfedError, match="no such file or directory"):
        import_leaf(tmp_path / "missing", tmp_path / "out")
    assert not (tmp_path / "out").exists()
