"""LEAF Shakespeare import: per-role counts, x/y decode back to the same strings, both layouts, the
ordered split, unknown characters, bad rows."""

from __future__ import annotations

import json

import numpy as np
import pytest

from simfed.core.errors import SimfedError
from simfed.partitions import samples
from simfed.partitions.shakespeare import ALL_LETTERS, import_shakespeare
from simfed.partitions.store import PartitionStore


@pytest.fixture(scope="module")
def obj():
    return samples.shakespeare_json(roles=7, min_rows=40, max_rows=90, seed=4)


def decode(store: PartitionStore, cid: int, split: str) -> tuple[list[str], list[str]]:
    vocab = store.vocab
    x, y = store.read(cid, split)
    return ["".join(vocab[i] for i in row) for row in x], [vocab[i] for i in y]


def by_name(store: PartitionStore) -> dict[str, int]:
    t = store.clients.to_pydict()
    return dict(zip(t["name"], t["client_id"]))


def test_all_data_round_trip_and_ordered_split(tmp_path, obj):
    src = samples.write_shakespeare(tmp_path / "shk", obj)
    store = PartitionStore.open(import_shakespeare(src, tmp_path / "out", unseen_fraction=0.3, seed=1), verify=True)
    store.check_contents()
    assert store.sample_shape == (80,) and store.dtype == "uint8" and store.input == "tokens"
    assert store.vocab == list(ALL_LETTERS) and store.classes == list(ALL_LETTERS) and len(store.vocab) == 80
    assert store.task_fields() == {"input_shape": (80,), "num_classes": 80, "dtype": "uint8", "input": "tokens",
                                   "vocab": tuple(ALL_LETTERS)}
    ids = by_name(store)
    assert list(ids) == obj["users"]  # client ids in order of first appearance
    assert len(store.client_ids("unseen")) == 2
    for user, n in zip(obj["users"], obj["num_samples"]):
        cid = ids[user]
        counts = [store.num_samples(cid, s) for s in ("train", "val", "test")]
        assert sum(counts) == n  # per-role counts: every row kept
        assert counts[1] == int(n * 0.15) and counts[2] == int(n * 0.15)
        xs, ys = [], []
        for s in ("train", "val", "test"):
            x, y = decode(store, cid, s)
            xs += x
            ys += y
        assert xs == obj["user_data"][user]["x"] and ys == obj["user_data"][user]["y"]  # in order


def test_leaf_split_layout_keeps_test_and_carves_val(tmp_path, obj):
    src = samples.write_shakespeare(tmp_path / "shk", obj, layout="split", seed=2)
    train = json.loads(next((src / "train").glob("*.json")).read_text())
    test = json.loads(next((src / "test").glob("*.json")).read_text())
    s0 = PartitionStore.open(import_shakespeare(src, tmp_path / "a"))
    s1 = PartitionStore.open(import_shakespeare(src, tmp_path / "b", val_fraction=0.2))
    for store, val in ((s0, 0.0), (s1, 0.2)):
        ids = by_name(store)
        for user, n_tr, n_te in zip(train["users"], train["num_samples"], test["num_samples"]):
            cid = ids[user]
            assert store.num_samples(cid, "test") == n_te
            assert store.num_samples(cid, "val") == int(n_tr * val)
            assert store.num_samples(cid, "train") + store.num_samples(cid, "val") == n_tr
            assert decode(store, cid, "test") == (test["user_data"][user]["x"], test["user_data"][user]["y"])
            tx, ty = decode(store, cid, "train")
            vx, vy = decode(store, cid, "val")
            assert tx + vx == train["user_data"][user]["x"] and ty + vy == train["user_data"][user]["y"]


def test_generated_text_is_learnable(obj):
    """The next character depends on the previous ones: the best guess from the last 3 characters beats
    the most frequent character by a wide margin."""
    from collections import Counter, defaultdict

    xs = [x for u in obj["users"] for x in obj["user_data"][u]["x"]]
    ys = [y for u in obj["users"] for y in obj["user_data"][u]["y"]]
    table = defaultdict(Counter)
    for x, y in zip(xs, ys):
        table[x[-3:]][y] += 1
    ctx_acc = sum(c.most_common(1)[0][1] for c in table.values()) / len(ys)
    base_acc = Counter(ys).most_common(1)[0][1] / len(ys)
    assert ctx_acc > base_acc + 0.3, (ctx_acc, base_acc)


def _one_file(tmp_path, obj, mutate) -> object:
    o = json.loads(json.dumps(obj))
    mutate(o)
    src = tmp_path / "src"
    src.mkdir()
    (src / "all_data.json").write_text(json.dumps(o))
    return src


def test_unknown_character_refused_or_mapped(tmp_path, obj):
    user = obj["users"][1]

    def put_tilde(o):
        o["user_data"][user]["x"][3] = "~" + o["user_data"][user]["x"][3][1:]

    src = _one_file(tmp_path, obj, put_tilde)
    with pytest.raises(SimfedError, match=rf"user '{user}': x row 3 holds '~' \(position 0\), not one of LEAF's"):
        import_shakespeare(src, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    store = PartitionStore.open(import_shakespeare(src, tmp_path / "out", unknown=" "))
    x, _ = decode(store, by_name(store)[user], "train")
    assert x[3] == " " + obj["user_data"][user]["x"][3][1:]
    with pytest.raises(SimfedError, match="--unknown-char must be one of"):
        import_shakespeare(src, tmp_path / "o2", unknown="~")


@pytest.mark.parametrize("mutate, message", [
    (lambda o, u: o["user_data"][u]["y"].__setitem__(2, "ab"), "y row 2 is 2 characters ('ab'), not one character"),
    (lambda o, u: o["user_data"][u]["y"].__setitem__(0, ""), "y row 0 is 0 characters"),
    (lambda o, u: o["user_data"][u]["x"].__setitem__(5, "short"), "x row 5 is 5 characters"),
    (lambda o, u: o["user_data"][u]["x"].__setitem__(1, 17), "x row 1 is int"),
    (lambda o, u: o["user_data"][u]["y"].pop(), "x rows but"),
    (lambda o, u: o["num_samples"].__setitem__(0, 3), "num_samples says 3"),
    (lambda o, u: o["user_data"][u]["y"].__setitem__(0, "\u00e9"), "y row 0 holds 'é'"),
])
def test_bad_rows(tmp_path, obj, mutate, message):
    src = _one_file(tmp_path, obj, lambda o: mutate(o, o["users"][0]))
    with pytest.raises(SimfedError, match=message.replace("(", r"\(").replace(")", r"\)")):
        import_shakespeare(src, tmp_path / "out")
    assert not (tmp_path / "out").exists()
