"""Split schemes on generated labels (always run) and on real Fashion-MNIST (if installed)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from simfed.core.errors import SimfedError
from simfed.partitions import schemes
from simfed.partitions.store import PartitionStore

FASHION = Path("/usr/share/datasets/fashion-mnist")


def _labels(n=20000, k=10, seed=0):
    return np.random.default_rng(seed).integers(0, k, n)


def _entropy(client_of, labels, k=10):
    out = []
    for c in np.unique(client_of):
        p = np.bincount(labels[client_of == c], minlength=k) / (client_of == c).sum()
        p = p[p > 0]
        out.append(-(p * np.log(p)).sum())
    return float(np.mean(out))


def test_iid_equal_shares_and_seeded():
    y = _labels()
    a = schemes.iid(len(y), 30, seed=1)
    counts = np.bincount(a)
    assert len(counts) == 30 and counts.max() - counts.min() <= 1
    assert np.array_equal(a, schemes.iid(len(y), 30, seed=1))
    assert not np.array_equal(a, schemes.iid(len(y), 30, seed=2))


def test_classes_gives_exactly_k_distinct_classes():
    y = _labels()
    for k in (1, 2, 5):
        a = schemes.classes(y, 50, k, seed=3)
        assert (a >= 0).all()  # 50*k >= 10 classes: every class held by someone
        per_client = [len(np.unique(y[a == c])) for c in range(50)]
        assert per_client == [k] * 50
    holders = [len(np.unique(a[y == c])) for c in range(10)]
    assert max(holders) - min(holders) <= 1  # classes are dealt evenly


def test_classes_rejects_impossible_k():
    with pytest.raises(SimfedError, match="classes-per-client must be in 1..10"):
        schemes.classes(_labels(), 10, 11, seed=0)


def test_dirichlet_skew_decreases_entropy():
    y = _labels()
    iid_h = _entropy(schemes.iid(len(y), 50, 0), y)
    skew = schemes.dirichlet(y, 50, alpha=0.1, seed=0)
    mild = schemes.dirichlet(y, 50, alpha=100.0, seed=0)
    assert np.bincount(skew, minlength=50).min() >= 1
    assert _entropy(skew, y) < 0.5 * iid_h
    assert _entropy(mild, y) > 0.95 * iid_h
    assert np.array_equal(skew, schemes.dirichlet(y, 50, alpha=0.1, seed=0))


def test_dirichlet_rebalances_when_clients_would_be_empty():
    y = _labels(n=300)
    a = schemes.dirichlet(y, 200, alpha=0.01, seed=0, max_tries=2)
    assert np.bincount(a, minlength=200).min() >= 1


def test_too_many_clients_is_a_user_error():
    with pytest.raises(SimfedError, match="cannot split 5 samples over 6 clients"):
        schemes.iid(5, 6, 0)


def test_natural_keeps_first_appearance_order():
    assert schemes.natural(np.array(["b", "a", "b", "c", "a"])).tolist() == [0, 1, 0, 2, 1]


def test_split_within_clients_fractions_and_label_coverage():
    y = _labels()
    a = schemes.classes(y, 40, 3, seed=0)
    codes = schemes.split_within_clients(a, y, seed=0)
    for c in range(40):
        m = a == c
        n = m.sum()
        assert (codes[m] == 1).sum() == int(np.floor(n * 0.15))
        assert (codes[m] == 2).sum() == int(np.floor(n * 0.15))
        assert len(np.unique(y[m & (codes == 0)])) == 3  # train sees all the client's classes
    # A 1-sample client keeps it in train; a 4-sample client with 4 labels keeps all 4.
    tiny = schemes.split_within_clients(np.array([0, 1, 1, 1, 1]), np.array([0, 0, 1, 2, 3]), 0,
                                        0.3, 0.3)
    assert tiny.tolist() == [0, 0, 0, 0, 0]


def _fashion_or_skip():
    if not (FASHION / "train-images-idx3-ubyte.gz").exists():
        pytest.skip(f"real Fashion-MNIST not installed at {FASHION} (Debian dataset-fashion-mnist)")


def test_fashion_mnist_classes_scheme(tmp_path):
    _fashion_or_skip()
    from simfed.partitions.idx import import_idx

    p = import_idx(FASHION, tmp_path / "f", scheme="classes", clients=100, classes_per_client=2)
    store = PartitionStore.open(p)
    t = store.clients.to_pydict()
    assert t["n_classes"] == [2] * 100
    assert store.manifest["counts"]["total"] == 70000
    cid = int(store.client_ids()[7])
    assert len(np.unique(store.read(cid, "train")[1])) == 2
    assert set(np.unique(store.read(cid, "test")[1])) <= set(np.unique(store.read(cid, "train")[1]))


def test_fashion_mnist_dirichlet_is_skewed(tmp_path):
    _fashion_or_skip()
    from simfed.partitions.idx import import_idx

    h = {}
    for scheme, kw in (("dirichlet", {"alpha": 0.1}), ("iid", {})):
        store = PartitionStore.open(import_idx(FASHION, tmp_path / scheme, scheme=scheme,
                                               clients=100, **kw))
        ent = []
        for cid in store.client_ids():
            y = store.read(int(cid), "train")[1]
            p = np.bincount(y, minlength=10) / len(y)
            p = p[p > 0]
            ent.append(-(p * np.log(p)).sum())
        h[scheme] = np.mean(ent)
    assert h["iid"] > 2.2  # ln(10) = 2.30
    assert h["dirichlet"] < 0.5 * h["iid"]
