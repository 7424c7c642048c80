"""Stores of any fixed sample shape in uint8, int32 or float32 with an input kind: round trip, views,
old manifests (no dtype/input/vocab keys), what the writer and the reader refuse, and how
ClientData hands each kind to the model."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pytest
import torch

from simfed.algorithms.base import ClientData, Task
from simfed.core.errors import SimfedError
from simfed.partitions import dtypes
from simfed.partitions import writer as writer_mod
from simfed.partitions.store import PartitionStore, close_all, write_store
from simfed.partitions.synthetic import make_synthetic_femnist
from tests.imports import modules_loaded_by


def _layout(n=400, clients=5, seed=0):
    rng = np.random.default_rng(seed)
    c = rng.integers(0, clients, n)
    split = rng.choice(np.array(["train", "val", "test"]), n, p=[0.7, 0.15, 0.15])
    split[np.unique(c, return_index=True)[1]] = "train"
    return rng, c, split


@pytest.mark.parametrize("dtype, shape, input, vocab", [
    ("float32", (7,), "raw", None),
    ("float32", (2, 3, 5), "raw", None),
    ("int32", (11,), "tokens", [f"w{i}" for i in range(1000)]),
    ("int32", (4,), "raw", None),
    ("uint8", (80,), "tokens", list("abcdefgh")),
    ("uint8", (6,), "raw", None),
])
def test_round_trip_views_and_manifest(tmp_path, monkeypatch, dtype, shape, input, vocab):
    monkeypatch.setattr(writer_mod, "BATCH_BYTES", 5_000)  # many batches: views at batch offsets
    rng, c, split = _layout()
    if dtype == "float32":
        x = rng.normal(0, 3, (len(c), *shape)).astype(np.float32)
    else:
        x = rng.integers(0, len(vocab) if vocab else 200, (len(c), *shape)).astype(dtype)
    y = rng.integers(0, 3, len(c))
    path = write_store(tmp_path / "s", x, y, c, split, classes=["a", "b", "c"], input=input, vocab=vocab)
    store = PartitionStore.open(path, verify=True)
    store.check_contents()
    m = json.loads((tmp_path / "s" / "manifest.json").read_text())
    assert m["format_version"] == 1 and m["dtype"] == dtype and m["input"] == input
    assert m["sample_shape"] == list(shape) and m.get("vocab") == vocab
    assert store.task_fields() == {"input_shape": shape, "num_classes": 3, "dtype": dtype, "input": input,
                                   "vocab": tuple(vocab or ())}
    for cid in store.client_ids():
        for s in ("train", "val", "test"):
            xs, ys = store.read(int(cid), s)
            want = (c == cid) & (split == s)
            assert xs.dtype == np.dtype(dtype) and xs.shape == (want.sum(), *shape)
            np.testing.assert_array_equal(xs, x[want])
            np.testing.assert_array_equal(ys, y[want])
            if len(xs):
                assert not xs.flags.writeable and not xs.flags.owndata  # a view of the mapped file
                assert xs.ctypes.data % np.dtype(dtype).itemsize == 0  # aligned for its dtype
    close_all()


def test_old_manifest_without_the_new_keys_reads_unchanged(tmp_path):
    rng, c, split = _layout()
    x = rng.integers(0, 256, (len(c), 1, 6, 6), dtype=np.uint8)
    y = rng.integers(0, 4, len(c))
    path = write_store(tmp_path / "old", x, y, c, split, classes=list("abcd"))
    mpath = tmp_path / "old" / "manifest.json"
    m = json.loads(mpath.read_text())
    assert m["dtype"] == "uint8" and m["input"] == "unit" and "vocab" not in m
    for keys in (("input",), ("input", "dtype")):  # as written before `input`, and before `dtype`
        old = {k: v for k, v in m.items() if k not in keys}
        mpath.write_text(json.dumps(old))
        store = PartitionStore.open(path, verify=True)
        store.check_contents()
        assert (store.dtype, store.input, store.vocab, store.sample_shape) == ("uint8", "unit", [], (1, 6, 6))
        cid = int(store.client_ids()[0])
        np.testing.assert_array_equal(store.read(cid, "train")[0], x[(c == cid) & (split == "train")])
        task = Task(**store.task_fields(), num_clients=3, total_clients=5)
        assert task == Task((1, 6, 6), 4, 3, 5)  # the defaults are today's task
        close_all()


@pytest.mark.parametrize("x, kw, message", [
    (np.array([[0.0, 1.0], [np.nan, 2.0]], np.float32), {}, "sample 1 of this chunk: value nan is not finite"),
    (np.array([[0.0, np.inf], [1.0, 2.0]], np.float32), {}, "sample 0 of this chunk: value inf is not finite"),
    (np.array([[0, 3], [1, 9]], np.int32), {"vocab": list("abcd")}, "token id 9 is outside the vocabulary 0..3"),
    (np.array([[0, -1], [1, 2]], np.int32), {"vocab": list("abcd")}, "token id -1 is outside"),
    (np.zeros((2, 3), np.float32), {"input": "unit"}, "input 'unit' (x / 255) needs uint8 data, not float32"),
    (np.zeros((2, 3), np.float32), {"input": "tokens", "vocab": ["a"]}, "needs integer data"),
    (np.zeros((2, 3), np.int32), {"input": "tokens"}, "needs a vocab of 1 to"),
    (np.zeros((2, 3), np.uint8), {"vocab": [str(i) for i in range(300)]}, "does not fit uint8 ids"),
    (np.zeros((2, 3), np.float32), {"input": "raw", "vocab": ["a"]}, "only meaningful with input 'tokens'"),
    (np.zeros((2, 3), np.float64), {}, "dtype 'float64' is not supported"),
    (np.zeros((2,) + (1,) * 9, np.uint8), {"input": "raw"}, "sample_shape must be 1 to 8 positive integers"),
])
def test_writer_refuses(tmp_path, x, kw, message):
    with pytest.raises(SimfedError, match=message.replace("(", r"\(").replace(")", r"\)")):
        write_store(tmp_path / "s", x, np.zeros(len(x), int), np.zeros(len(x), int), ["train"] * len(x),
                    classes=["a"], **kw)
    assert not (tmp_path / "s").exists()


@pytest.mark.parametrize("edit, message", [
    ({"dtype": "float64"}, "dtype 'float64' is not supported"),
    ({"dtype": ["uint8"]}, "dtype ['uint8'] is not supported"),
    ({"input": "bogus"}, "input 'bogus' is not one of unit, raw, tokens"),
    ({"input": "tokens"}, "needs a vocab of 1 to"),
    ({"input": "tokens", "vocab": "abc"}, "needs a vocab of 1 to"),
    ({"vocab": ["a"]}, "only meaningful with input 'tokens'"),
    ({"sample_shape": []}, "sample_shape must be 1 to 8 positive integers"),
    ({"sample_shape": [1, 0, 3]}, "sample_shape must be 1 to 8"),
    ({"sample_shape": [100000, 100000]}, "bytes per sample"),
])
def test_reader_refuses_bad_manifests(tmp_path, edit, message):
    rng, c, split = _layout(n=60)
    path = write_store(tmp_path / "s", rng.integers(0, 256, (60, 1, 2, 2), dtype=np.uint8), np.zeros(60, int), c,
                       split, classes=["a"])
    mpath = tmp_path / "s" / "manifest.json"
    mpath.write_text(json.dumps({**json.loads(mpath.read_text()), **edit}))
    with pytest.raises(SimfedError, match=message.replace("(", r"\(").replace("[", r"\[").replace(")", r"\)")):
        PartitionStore.open(path)


def test_open_checks_every_token_and_float(tmp_path, monkeypatch):
    """A store whose x escaped the writer's checks (written around them here) is refused at open
    by check_contents, naming the file and the row, before any worker meets it."""
    rng, c, split = _layout(n=100)
    monkeypatch.setattr(dtypes, "first_bad_row", lambda *a: None)
    x = rng.integers(0, 4, (100, 5)).astype(np.int32)
    order = np.lexsort((np.searchsorted(["test", "train", "val"], split), c))
    bad_row = int(np.flatnonzero(split[order] == "train")[3])
    x[order[bad_row], 2] = 7
    path = write_store(tmp_path / "tok", x, np.zeros(100, int), c, split, classes=["a"], vocab=list("abcd"))
    f = rng.random((100, 3)).astype(np.float32)
    f[order[bad_row], 0] = np.nan
    fpath = write_store(tmp_path / "f", f, np.zeros(100, int), c, split, classes=["a"])
    monkeypatch.undo()
    with pytest.raises(SimfedError, match=r"train.arrow: row 3: token id 7 is outside the vocabulary 0..3"):
        PartitionStore.open(path).check_contents()
    with pytest.raises(SimfedError, match=r"train.arrow: row 3: value nan is not finite"):
        PartitionStore.open(fpath).check_contents()
    close_all()


def test_client_data_per_input_kind():
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (5, 1, 4, 4), dtype=np.uint8)
    feats = rng.normal(0, 1, (5, 3)).astype(np.float32)
    toks = rng.integers(0, 80, (5, 9)).astype(np.uint8)
    y = np.arange(5, dtype=np.int64)
    for x in (img, feats, toks):  # read-only, like the store's views
        x.flags.writeable = False

    def reader_for(x):
        return lambda cid, split: (x, y)

    xt, yt = ClientData(0, "seen", reader_for(img)).split("train")  # default: "unit", today's path
    old = torch.from_numpy(np.asarray(img, dtype=np.float32)).div_(255.0)
    assert xt.dtype == torch.float32 and torch.equal(xt, old) and yt.dtype == torch.int64
    assert xt.numpy().tobytes() == old.numpy().tobytes()  # bit-identical
    xt, _ = ClientData(0, "seen", reader_for(feats), input="raw").split("train")
    assert xt.dtype == torch.float32 and np.array_equal(xt.numpy(), feats)
    xt, _ = ClientData(0, "seen", reader_for(toks), input="tokens").split("val")
    assert xt.dtype == torch.int64 and np.array_equal(xt.numpy(), toks.astype(np.int64))
    with pytest.raises(ValueError, match="input must be"):
        ClientData(0, "seen", reader_for(img), input="bytes")
    t = Task((80,), 80, dtype="uint8", input="tokens", vocab=tuple("ab"))
    assert t.input_shape == (80,) and Task((1, 28, 28), 10).input == "unit" and Task((1, 28, 28), 10).vocab == ()


@pytest.mark.parametrize("typ", [pa.int8(), pa.uint16(), pa.int32(), pa.int64(), pa.uint64(), pa.float32(),
                                 pa.float64()])
def test_numeric_columns_read_as_pyarrow_reads_them_sliced_and_chunked(typ):
    values = pa.array(np.arange(40) % 7, type=typ)
    col = pa.chunked_array([values.slice(3, 10), values.slice(20, 0), values.slice(15, 17)])
    expected = col.to_numpy()
    got = dtypes.numeric(col)
    assert got.dtype == expected.dtype and np.array_equal(got, expected)
    assert np.array_equal(dtypes.numeric(values.slice(5, 9)), values.slice(5, 9).to_numpy())
    assert dtypes.numeric(pa.chunked_array([], type=typ)).shape == (0,)


def test_numeric_refuses_what_it_cannot_read_as_a_buffer():
    with pytest.raises(TypeError):
        dtypes.numeric(pa.array(["a"]))
    with pytest.raises(ValueError):
        dtypes.numeric(pa.array([1, None], type=pa.int64()))


def test_opening_a_store_does_not_import_pandas(tmp_path):
    # pyarrow's to_numpy imports pandas when it is installed: 0.26 s in the driver and every worker.
    store = make_synthetic_femnist(str(tmp_path / "s"), clients=6, seed=0)
    code = ("from simfed.partitions.store import PartitionStore\n"
            f"s = PartitionStore.open({str(store)!r}, verify=True); c = int(s.client_ids()[0])\n"
            "x, y = s.read(c, 'train'); assert len(y) > 0")
    assert modules_loaded_by(code, ("pandas", "pyarrow")) == ["pyarrow"]
