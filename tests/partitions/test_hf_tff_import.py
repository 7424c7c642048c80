"""FEMNIST as Flower (flwrlabs/femnist Parquet) and TFF (fed_emnist*.h5) have it, imported through the
real CLI from files generated here in those layouts: the same writers and per-writer counts, and
one stderr line naming the file and what is missing for a file in the wrong layout.
The CLI runs in-process (tests/cli/inproc.py) to keep the suite fast."""

from __future__ import annotations

import io

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from simfed.partitions.store import PartitionStore
from tests.cli import inproc
from tests.cli.test_partition_cli import assert_user_error

PIL = pytest.importorskip("PIL.Image", reason="Pillow is in the test extra")
h5py = pytest.importorskip("h5py", reason="h5py is in the test extra")


def png(pixels: np.ndarray) -> bytes:
    buf = io.BytesIO()
    PIL.fromarray(pixels, mode="L").save(buf, format="PNG")
    return buf.getvalue()


def writers(seed: int, n: int = 5) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(seed)
    out = {}
    for w in range(n):
        k = int(rng.integers(6, 14))
        out[f"f{w:04d}_{seed:02d}"[:8]] = (rng.integers(0, 256, (k, 28, 28), dtype=np.uint8),
                                           rng.integers(0, 62, k))
    return out


def write_parquet(path, data: dict, drop: str | None = None) -> None:
    rows = [(w, x[i], int(y[i])) for w, (x, y) in data.items() for i in range(len(y))]
    rows = rows[1::2] + rows[::2]  # writers interleaved across rows, as in the published files
    cols = {"image": pa.array([{"bytes": png(x), "path": f"{w}.png"} for w, x, _ in rows],
                              pa.struct([("bytes", pa.binary()), ("path", pa.string())])),
            "writer_id": pa.array([w for w, _, _ in rows]),
            "hsf_id": pa.array([3] * len(rows), pa.int64()),
            "character": pa.array([y for _, _, y in rows], pa.int64())}
    if drop:
        cols.pop(drop)
    pq.write_table(pa.table(cols), path, row_group_size=7)


def per_writer(store_dir) -> dict[str, tuple[int, int, int]]:
    t = PartitionStore.open(str(store_dir)).clients
    return {n: (a, b, c) for n, a, b, c in zip(*(t.column(k).to_pylist() for k in ("name", "n_train", "n_val",
                                                                                  "n_test")))}


def test_hf_femnist_reproduces_writers_and_counts(tmp_path):
    src = tmp_path / "femnist" / "data"
    src.mkdir(parents=True)
    a, b = writers(0), writers(1)
    write_parquet(src / "train-00000-of-00002.parquet", a)
    write_parquet(src / "train-00001-of-00002.parquet", b)
    out = tmp_path / "store"
    r = inproc.run("partition", "hf-femnist", tmp_path / "femnist", out, "--unseen-fraction", 0.2)
    assert r.returncode == 0, r.stderr
    got = per_writer(out)
    want = {w: len(y) for w, (_, y) in {**a, **b}.items()}
    assert {w: sum(c) for w, c in got.items()} == want
    # Pixels survive the PNG round trip exactly: each writer's multiset of (label, image) pairs is the same.
    store = PartitionStore.open(str(out))
    first = next(iter(a))
    cid = store.clients.column("name").to_pylist().index(first)
    parts = [store.read(cid, s) for s in ("train", "val", "test")]
    x = np.concatenate([np.asarray(p[0]).reshape(-1, 28, 28) for p in parts])
    y = np.concatenate([np.asarray(p[1]) for p in parts])
    assert sorted((int(lab), im.tobytes()) for im, lab in zip(x, y)) == \
        sorted((int(lab), im.tobytes()) for im, lab in zip(*a[first]))


def test_hf_femnist_wrong_layout_names_file_and_column(tmp_path):
    src = tmp_path / "hf"
    src.mkdir()
    write_parquet(src / "train.parquet", writers(0), drop="writer_id")
    out = tmp_path / "out"
    assert_user_error(inproc.run("partition", "hf-femnist", src, out), "train.parquet", "missing column(s) writer_id",
                      out=out)
    (src / "train.parquet").write_bytes(b"not parquet at all")
    assert_user_error(inproc.run("partition", "hf-femnist", src, out), "train.parquet", "not a readable Parquet",
                      out=out)


def write_h5(path, data: dict, omit: str | None = None) -> None:
    with h5py.File(path, "w") as f:
        ex = f.create_group("examples")
        for w, (x, y) in data.items():
            g = ex.create_group(w)
            if omit != "pixels":
                g.create_dataset("pixels", data=(x / 255.0).astype(np.float32))
            if omit != "label":
                g.create_dataset("label", data=y.astype(np.int32))


def test_tff_h5_keeps_tff_split_and_counts(tmp_path):
    train, test = writers(2), writers(2)
    test = {w: (x[:3], y[:3]) for w, (x, y) in test.items()}
    write_h5(tmp_path / "fed_emnist_train.h5", train)
    write_h5(tmp_path / "fed_emnist_test.h5", test)
    out = tmp_path / "store"
    r = inproc.run("partition", "tff-h5", tmp_path, out)
    assert r.returncode == 0, r.stderr
    got = per_writer(out)
    assert got == {w: (len(train[w][1]), 0, 3) for w in train}
    store = PartitionStore.open(str(out))
    x, y = store.read(0, "test")
    w0 = store.clients.column("name")[0].as_py()
    assert np.array_equal(np.asarray(y), test[w0][1]) and np.array_equal(np.asarray(x).reshape(-1, 28, 28),
                                                                         test[w0][0])


def test_tff_h5_single_file_split_per_writer_and_bad_layout(tmp_path):
    data = writers(3)
    write_h5(tmp_path / "one.h5", data)
    out = tmp_path / "store"
    assert inproc.run("partition", "tff-h5", tmp_path / "one.h5", out).returncode == 0
    assert {w: sum(c) for w, c in per_writer(out).items()} == {w: len(y) for w, (_, y) in data.items()}
    write_h5(tmp_path / "bad.h5", data, omit="label")
    bad_out = tmp_path / "bad_store"
    w0 = next(iter(data))
    assert_user_error(inproc.run("partition", "tff-h5", tmp_path / "bad.h5", bad_out), "bad.h5", f"examples/{w0}",
                      "missing label", out=bad_out)
    with h5py.File(tmp_path / "flat.h5", "w") as f:
        f.create_dataset("pixels", data=np.zeros((2, 28, 28), np.float32))
    assert_user_error(inproc.run("partition", "tff-h5", tmp_path / "flat.h5", bad_out), "flat.h5",
                      "no 'examples' group", out=bad_out)
