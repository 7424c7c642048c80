"""`arrays` import from an npz: round trip per client with dtype and shape preserved, the natural
partition by `client`, the schemes, input kinds, and files that must be refused."""

from __future__ import annotations

import io
import zipfile

import numpy as np
import pytest

from simfed.core.errors import SimfedError
from simfed.partitions import samples
from simfed.partitions.arrays import import_arrays
from simfed.partitions.store import PartitionStore


def rows_of(store: PartitionStore, cid: int):
    parts = [store.read(cid, s) for s in ("train", "val", "test")]
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


def canonical(x: np.ndarray, y: np.ndarray):
    keys = [r.tobytes() + int(v).to_bytes(8, "little") for r, v in zip(x.reshape(len(x), -1), y)]
    order = sorted(range(len(keys)), key=keys.__getitem__)
    return x[order], y[order]


@pytest.mark.parametrize("kind, dtype, shape, input", [("features", "float32", (16,), "raw"),
                                                        ("tokens", "int32", (12,), "tokens"),
                                                        ("images", "uint8", (1, 8, 8), "unit")])
def test_natural_round_trip_per_client(tmp_path, kind, dtype, shape, input):
    a = samples.arrays_sample(kind, n=300, clients=5, seed=1)
    src = samples.write_npz(tmp_path / f"{kind}.npz", a)
    store = PartitionStore.open(import_arrays(src, tmp_path / "out", unseen_fraction=0.2), verify=True)
    store.check_contents()
    assert store.dtype == dtype and store.sample_shape == shape and store.input == input
    assert store.vocab == (a["vocab"].tolist() if kind == "tokens" else [])
    t = store.clients.to_pydict()
    first = dict.fromkeys(a["client"].tolist())
    assert t["name"] == list(first)  # one client per distinct value, in order of first appearance
    for cid, name in zip(t["client_id"], t["name"]):
        x, y = rows_of(store, cid)
        assert x.dtype == np.dtype(dtype) and x.shape[1:] == shape
        m = a["client"] == name
        for got, want in zip(canonical(x, y), canonical(a["x"][m], a["y"][m])):
            assert np.array_equal(got, want)
        orig = [r.tobytes() for r in a["x"][m]]
        pos = [orig.index(r.tobytes()) for r in store.read(cid, "train")[0]]
        assert pos == sorted(pos)  # within a split, the file's order is kept


@pytest.mark.parametrize("scheme, kw", [("iid", {}), ("dirichlet", {"alpha": 0.5}),
                                        ("classes", {"classes_per_client": 2})])
def test_schemes(tmp_path, scheme, kw):
    a = samples.arrays_sample("features", n=400, num_classes=4, seed=2)
    del a["client"]
    src = samples.write_npz(tmp_path / "f.npz", a, compressed=False)
    store = PartitionStore.open(import_arrays(src, tmp_path / "out", scheme=scheme, clients=6, seed=3, **kw))
    assert len(store.client_ids()) == 6 and store.manifest["source"]["scheme"] == scheme
    if scheme == "classes":
        assert set(store.clients.column("n_classes").to_pylist()) == {2}
    x, y = (np.concatenate(v) for v in zip(*[rows_of(store, int(c)) for c in store.client_ids()]))
    assert x.dtype == np.float32 and x.shape == (400, 16)  # 6 clients x 2 classes hold all 4 classes
    for got, want in zip(canonical(x, y), canonical(a["x"], a["y"])):
        assert np.array_equal(got, want)


def test_scheme_overrides_client_and_needs_clients(tmp_path):
    a = samples.arrays_sample("images", n=200, seed=3)
    src = samples.write_npz(tmp_path / "i.npz", a)
    store = PartitionStore.open(import_arrays(src, tmp_path / "iid", scheme="iid", clients=3))
    assert len(store.client_ids()) == 3
    with pytest.raises(SimfedError, match="--scheme iid needs --clients"):
        import_arrays(src, tmp_path / "x", scheme="iid")
    del a["client"]
    src = samples.write_npz(tmp_path / "noclient.npz", a)
    with pytest.raises(SimfedError, match="no 'client' array"):
        import_arrays(src, tmp_path / "x")


def test_input_kinds_and_vocab_size(tmp_path):
    rng = np.random.default_rng(0)
    a = {"x": rng.integers(0, 50, (120, 6)).astype(">i4"), "y": rng.integers(0, 3, 120),  # big-endian
         "client": rng.integers(0, 4, 120), "classes": np.array(["neg", "neu", "pos"])}
    src = samples.write_npz(tmp_path / "t.npz", a)
    store = PartitionStore.open(import_arrays(src, tmp_path / "tok", vocab_size=50))
    assert store.input == "tokens" and store.vocab == [str(i) for i in range(50)] and store.dtype == "int32"
    assert store.classes == ["neg", "neu", "pos"]
    x, _ = rows_of(store, int(store.client_ids()[0]))
    assert x.dtype == np.dtype("<i4")
    raw = PartitionStore.open(import_arrays(src, tmp_path / "raw"))
    assert raw.input == "raw"
    with pytest.raises(SimfedError, match=r"x row 0: token id 42 is outside the vocabulary 0\.\.39"):
        import_arrays(src, tmp_path / "small", vocab_size=40)
    img = {"x": rng.integers(0, 255, (50, 2, 3)).astype(np.uint8), "y": np.zeros(50, int), "client": np.zeros(50, int)}
    src = samples.write_npz(tmp_path / "u.npz", img)
    assert PartitionStore.open(import_arrays(src, tmp_path / "u", input="raw")).input == "raw"
    assert PartitionStore.open(import_arrays(src, tmp_path / "u2")).input == "unit"
    fortran = {"x": np.asfortranarray(rng.random((40, 3, 5)).astype(np.float32)), "y": np.arange(40) % 2,
               "client": np.zeros(40, int)}
    src = samples.write_npz(tmp_path / "f.npz", fortran)
    x, y = rows_of(PartitionStore.open(import_arrays(src, tmp_path / "fo")), 0)
    for got, want in zip(canonical(x, y), canonical(np.ascontiguousarray(fortran["x"]), fortran["y"])):
        assert np.array_equal(got, want)


def npz_bytes(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for k, v in members.items():
            zf.writestr(k, v)
    return buf.getvalue()


def npy(arr=None, header: dict | None = None, body: bytes = b"") -> bytes:
    f = io.BytesIO()
    if arr is not None:
        np.save(f, arr, allow_pickle=True)
    else:
        np.lib.format.write_array_header_1_0(f, header)
        f.write(body)
    return f.getvalue()


X, Y = np.zeros((10, 4), np.float32), np.arange(10) % 2
BAD = {
    "string-x": ({"x.npy": npy(np.array([["a"] * 4] * 10)), "y.npy": npy(Y)}, "x has dtype <U1; supported"),
    "float64-x": ({"x.npy": npy(X.astype(np.float64)), "y.npy": npy(Y)}, "x has dtype float64"),
    "length": ({"x.npy": npy(X), "y.npy": npy(Y[:9])}, "x has 10 samples but y has 9 labels"),
    "huge-header": ({"x.npy": npy(header={"descr": "<f4", "fortran_order": False, "shape": (1_000_000_000, 8)},
                                  body=b"\0" * 64), "y.npy": npy(Y)}, "the header promises shape (1000000000, 8)"),
    "object": ({"x.npy": npy(np.array([{"a": 1}] * 10, dtype=object)), "y.npy": npy(Y)}, "object array"),
    "nan": ({"x.npy": npy(np.where(np.arange(40).reshape(10, 4) == 29, np.nan, 0).astype(np.float32)),
             "y.npy": npy(Y), "client.npy": npy(np.zeros(10, int))}, "x row 7: value nan is not finite"),
    "no-y": ({"x.npy": npy(X)}, "no 'y' array"),
    "float-y": ({"x.npy": npy(X), "y.npy": npy(Y.astype(float))}, "y must be 1-d integer labels"),
    "negative-y": ({"x.npy": npy(X), "y.npy": npy(Y - 1)}, "label -1 out of range"),
    "1d-x": ({"x.npy": npy(np.zeros(10, np.float32)), "y.npy": npy(Y)}, "it must be (N, *sample_shape)"),
    "not-zip": (None, "not a readable .npz file"),
    "unit-float": ({"x.npy": npy(X), "y.npy": npy(Y), "client.npy": npy(np.zeros(10, int))},
                   "input 'unit' (x / 255) needs uint8 data"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_files(tmp_path, case):
    members, message = BAD[case]
    src = tmp_path / "bad.npz"
    src.write_bytes(npz_bytes(members) if members is not None else b"PK\x03\x04 not really")
    kw = {"input": "unit"} if case == "unit-float" else {}
    with pytest.raises(SimfedError, match=message.replace("(", r"\(").replace(")", r"\)").replace("*", r"\*")):
        import_arrays(src, tmp_path / "out", **({"scheme": "iid", "clients": 2} if "client.npy" not in
                                                 (members or {}) else {}), **kw)
    assert not (tmp_path / "out").exists()
