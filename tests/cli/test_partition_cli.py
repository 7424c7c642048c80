"""`simfed partition ...` and `simfed info` through the real entry point (subprocesses)."""

from __future__ import annotations

import gzip
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

FASHION = Path("/usr/share/datasets/fashion-mnist")


def simfed(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "simfed.cli.main", *map(str, args)],
                          capture_output=True, text=True, timeout=timeout)


def assert_user_error(r, *fragments, out: Path | None = None):
    """Exit 2, exactly one stderr line naming the problem, no traceback, nothing left behind."""
    assert r.returncode == 2, (r.returncode, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith("simfed: error: ")
    assert "Traceback" not in r.stderr
    for f in fragments:
        assert f in lines[0], (f, lines[0])
    if out is not None:
        assert not out.exists()
        assert not list(out.parent.glob(f".{out.name}.tmp-*"))


def leaf_obj(n_users=3, seed=0):
    rng = np.random.default_rng(seed)
    users = [f"f{u:04d}_01" for u in range(n_users)]
    data = {}
    for u in users:
        n = int(rng.integers(4, 9))
        data[u] = {"x": rng.random((n, 784)).round(3).tolist(),
                   "y": rng.integers(0, 62, n).tolist()}
    return {"users": users, "num_samples": [len(data[u]["y"]) for u in users], "user_data": data}


def test_synthetic_then_info_json(tmp_path):
    out = tmp_path / "femnist"
    r = simfed("partition", "synthetic-femnist", out, "--clients", 40, "--seed", 3,
               "--unseen-fraction", 0.25)
    assert r.returncode == 0, r.stderr
    r = simfed("info", out, "--json")
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    assert info["clients"] == 40 and info["seen"] == 30 and info["unseen"] == 10
    assert info["num_classes"] == 62
    s = info["samples"]
    assert s["total"] == s["train"] + s["val"] + s["test"]
    assert 40 * 150 < s["total"] < 40 * 320
    assert 1 <= info["per_client"]["min"] <= info["per_client"]["median"] \
        <= info["per_client"]["max"]
    assert info["size_bytes"] > s["total"] * 784
    r = simfed("info", out)  # human-readable table
    assert r.returncode == 0 and "40 (30 seen, 10 unseen)" in r.stdout
    # Existing OUT is refused unless --overwrite.
    r = simfed("partition", "synthetic-femnist", out, "--clients", 5)
    assert_user_error(r, "already exists", "--overwrite")
    r = simfed("partition", "synthetic-femnist", out, "--clients", 5, "--overwrite")
    assert r.returncode == 0
    assert json.loads(simfed("info", out, "--json").stdout)["clients"] == 5


def test_checksum_mismatch_is_one_line(tmp_path):
    out = tmp_path / "s"
    assert simfed("partition", "synthetic-femnist", out, "--clients", 6).returncode == 0
    with open(out / "train.arrow", "r+b") as f:
        f.seek(5000)
        b = f.read(1)
        f.seek(5000)
        f.write(bytes([b[0] ^ 0x55]))
    r = simfed("info", out)
    assert_user_error(r, "train.arrow", "checksum mismatch")
    assert simfed("info", out, "--no-verify").returncode == 0


def test_leaf_cli_round_trip(tmp_path):
    src = tmp_path / "leaf"
    src.mkdir()
    obj = leaf_obj(4)
    (src / "all_data_0.json").write_text(json.dumps(obj))
    r = simfed("partition", "leaf", src, tmp_path / "out", "--unseen-fraction", 0.25)
    assert r.returncode == 0, r.stderr
    info = json.loads(simfed("info", tmp_path / "out", "--json").stdout)
    assert info["clients"] == 4 and info["unseen"] == 1
    assert info["samples"]["total"] == sum(obj["num_samples"])


def _mutations():
    def no_data(o):
        o["user_data"].pop("f0001_01")

    def short_x(o):
        o["user_data"]["f0002_01"]["x"][1] = [0.1] * 700

    def bad_label(o):
        o["user_data"]["f0000_01"]["y"][0] = 77

    return [("no_data", no_data, "user 'f0001_01' has no data"),
            ("short_x", short_x, "wrong length"),
            ("bad_label", bad_label, "label 77 out of range")]


@pytest.mark.parametrize("name, mutate, message", _mutations(), ids=[m[0] for m in _mutations()])
def test_bad_leaf_input_via_cli(tmp_path, name, mutate, message):
    src = tmp_path / "leaf"
    src.mkdir()
    obj = leaf_obj()
    mutate(obj)
    (src / "all_data_0.json").write_text(json.dumps(obj))
    out = tmp_path / "out"
    assert_user_error(simfed("partition", "leaf", src, out), "all_data_0.json", message, out=out)


def test_malformed_json_and_missing_file_via_cli(tmp_path):
    src = tmp_path / "leaf"
    src.mkdir()
    (src / "all_data_0.json").write_text('{"users": ["a"], "user_data": {')
    out = tmp_path / "out"
    assert_user_error(simfed("partition", "leaf", src, out), "all_data_0.json", "malformed JSON",
                      out=out)
    assert_user_error(simfed("partition", "leaf", tmp_path / "absent", out), "absent",
                      "no such file", out=out)
    assert_user_error(simfed("info", tmp_path / "absent"), "absent")


def test_idx_wrong_magic_via_cli(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (50, 28, 28), dtype=np.uint8)
    (tmp_path / "train-images-idx3-ubyte.gz").write_bytes(gzip.compress(
        bytes([0, 0, 8, 3]) + b"".join(int(d).to_bytes(4, "big") for d in x.shape) + x.tobytes()))
    (tmp_path / "train-labels-idx1-ubyte.gz").write_bytes(gzip.compress(b"\x08\x01\x00\x00" +
                                                                        b"\x00" * 60))
    out = tmp_path / "out"
    r = simfed("partition", "idx", tmp_path, out, "--scheme", "iid", "--clients", 5)
    assert_user_error(r, "train-labels-idx1-ubyte.gz", "wrong magic number", out=out)
    r = simfed("partition", "idx", tmp_path, out, "--scheme", "bogus", "--clients", 5)
    assert_user_error(r, "--scheme", out=out)


def test_fashion_mnist_classes_via_cli(tmp_path):
    if not (FASHION / "train-images-idx3-ubyte.gz").exists():
        pytest.skip(f"real Fashion-MNIST not installed at {FASHION}")
    import pyarrow.parquet as pq

    out = tmp_path / "fm"
    r = simfed("partition", "idx", FASHION, out, "--scheme", "classes", "--classes-per-client",
               2, "--clients", 100, "--seed", 1)
    assert r.returncode == 0, r.stderr
    t = pq.read_table(out / "clients.parquet")
    assert t.column("n_classes").to_pylist() == [2] * 100
    info = json.loads(simfed("info", out, "--json").stdout)
    assert info["samples"]["total"] == 70000 and info["unseen"] == 10


def _idx_source(src: Path, n=60) -> None:
    """A tiny MNIST-shaped pair of IDX files (gzipped), 10 classes."""
    rng = np.random.default_rng(1)
    x = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
    y = np.arange(n, dtype=np.uint8) % 10
    src.mkdir()
    (src / "train-images-idx3-ubyte.gz").write_bytes(gzip.compress(
        bytes([0, 0, 8, 3]) + b"".join(int(d).to_bytes(4, "big") for d in x.shape) + x.tobytes()))
    (src / "train-labels-idx1-ubyte.gz").write_bytes(gzip.compress(
        bytes([0, 0, 8, 1]) + int(n).to_bytes(4, "big") + y.tobytes()))


def test_importers_create_missing_parents_of_the_output(tmp_path):
    """`simfed partition idx SRC data/x` with no data/ yet: the parents are made, as mkdir -p; a
    refused import makes none; a parent that is a file is one line; --help says so."""
    src = tmp_path / "idx"
    _idx_source(src)
    out = tmp_path / "data" / "deeper" / "x"
    r = simfed("partition", "idx", src, out, "--scheme", "iid", "--clients", 4, "--unseen-fraction", 0.25)
    assert r.returncode == 0, r.stderr
    assert json.loads(simfed("info", out, "--json").stdout)["clients"] == 4
    assert not list(out.parent.glob(".x.tmp-*"))
    leaf_src = tmp_path / "leaf"
    leaf_src.mkdir()
    (leaf_src / "all_data_0.json").write_text(json.dumps(leaf_obj(4)))
    r = simfed("partition", "leaf", leaf_src, tmp_path / "more" / "leaf-store", "--unseen-fraction", 0.25)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "more" / "leaf-store" / "manifest.json").is_file()

    # Bad input: refused before anything is written, so no parent appears either.
    (src / "train-labels-idx1-ubyte.gz").write_bytes(gzip.compress(b"\x08\x01\x00\x00" + b"\x00" * 60))
    bad = tmp_path / "never" / "made" / "x"
    assert_user_error(simfed("partition", "idx", src, bad, "--scheme", "iid", "--clients", 4), "wrong magic number")
    assert not (tmp_path / "never").exists()
    # A parent on the way that is a regular file cannot be created: one line naming it.
    (tmp_path / "afile").write_text("")
    assert_user_error(simfed("partition", "leaf", leaf_src, tmp_path / "afile" / "sub" / "x"),
                      f"{tmp_path / 'afile'}: not a directory")

    r = simfed("partition", "idx", "--help")
    assert r.returncode == 0 and "missing parent directories are created" in " ".join(r.stdout.split())


def test_writer_removes_the_parents_it_made_when_the_import_fails(tmp_path):
    """A failure after writing started (here: rows of a client given twice) leaves no parent behind."""
    from simfed.core.errors import SimfedError
    from simfed.partitions.writer import StoreWriter

    out = tmp_path / "a" / "b" / "store"
    rows = np.zeros((2, 1, 2, 2), np.uint8), np.zeros(2, np.int64), np.array([0, 0]), np.array(["train"] * 2)
    with pytest.raises(SimfedError):
        with StoreWriter(out, classes=["0"], sample_shape=(1, 2, 2)) as w:
            assert out.parent.is_dir()  # made when writing started
            w.add(*rows)
            w.add(*rows)  # client 0 again: refused
    assert not (tmp_path / "a").exists()


# -- issue 23: CIFAR, Shakespeare and arrays importers, any sample shape and dtype


def test_cifar_shakespeare_arrays_via_cli(tmp_path):
    from simfed.partitions import samples

    c10 = samples.write_cifar(tmp_path / "cifar-10-python.tar.gz", samples.cifar10_contents(per_batch=40, test=40))
    c100 = samples.write_cifar(tmp_path / "cifar-100-python.tar.gz", samples.cifar100_contents(train=300, test=100))
    shk = samples.write_shakespeare(tmp_path / "shk", samples.shakespeare_json(roles=5), layout="split")
    npz = samples.write_npz(tmp_path / "f.npz", samples.arrays_sample("features", n=200, clients=4))
    runs = {
        "c10": (["cifar", c10, "--scheme", "classes", "--classes-per-client", 2, "--clients", 5], 240),
        "c100": (["cifar", c100, "--scheme", "iid", "--clients", 4, "--label", "coarse"], 400),
        "shk": (["shakespeare", shk, "--val-fraction", 0.1], None),
        "npz": (["arrays", npz], 200),
    }
    infos = {}
    for name, (args, total) in runs.items():
        r = simfed("partition", args[0], args[1], tmp_path / "stores" / name, *args[2:])
        assert r.returncode == 0, r.stderr
        infos[name] = json.loads(simfed("info", tmp_path / "stores" / name, "--json").stdout)
        if total is not None:
            assert infos[name]["samples"]["total"] == total
    assert infos["c10"]["sample_shape"] == [3, 32, 32] and infos["c10"]["num_classes"] == 10
    assert (infos["c10"]["dtype"], infos["c10"]["input"], infos["c10"]["vocab_size"]) == ("uint8", "unit", 0)
    assert infos["c100"]["num_classes"] == 20
    assert (infos["shk"]["sample_shape"], infos["shk"]["input"], infos["shk"]["vocab_size"]) == ([80], "tokens", 80)
    assert infos["shk"]["clients"] == 5
    assert (infos["npz"]["sample_shape"], infos["npz"]["dtype"], infos["npz"]["input"]) == ([16], "float32", "raw")
    r = simfed("info", tmp_path / "stores" / "shk")
    assert r.returncode == 0 and "80 uint8" in r.stdout and "vocabulary of 80 tokens" in r.stdout


def _bad_cifar(tmp_path, case):
    from simfed.partitions import samples

    contents = samples.cifar10_contents(per_batch=20, test=20)
    m = {f"cifar-10-batches-py/{k}": samples.py2_pickle(v) for k, v in contents.items()}
    if case == "missing-batch":
        del m["cifar-10-batches-py/data_batch_3"]
    elif case == "row-3071":
        m["cifar-10-batches-py/data_batch_4"] = samples.py2_pickle(
            {**contents["data_batch_4"], b"data": contents["data_batch_4"][b"data"][:, :3071].copy()})
    else:  # a pickle that asks for os.system: refused, never run
        cmd = f"touch {tmp_path / 'pwned'}".encode()
        m["cifar-10-batches-py/data_batch_1"] = b"\x80\x02cos\nsystem\nX" + len(cmd).to_bytes(4, "little") + cmd \
            + b"\x85R."
    return samples.write_cifar(tmp_path / "cifar-10-python.tar.gz", members=m)


def _bad_shakespeare(tmp_path, case):
    from simfed.partitions import samples

    obj = samples.shakespeare_json(roles=3)
    user = obj["users"][1]
    if case == "y-two-chars":
        obj["user_data"][user]["y"][4] = "ab"
    else:
        obj["user_data"][user]["x"][2] = obj["user_data"][user]["x"][2][:79] + "~"
    return samples.write_shakespeare(tmp_path / "shk", obj)


def _bad_npz(tmp_path, case):
    import io
    import zipfile

    def npy(arr=None, header=None):
        f = io.BytesIO()
        if arr is not None:
            np.save(f, arr)
        else:
            np.lib.format.write_array_header_1_0(f, header)
            f.write(b"\0" * 32)
        return f.getvalue()

    y = np.arange(10) % 2
    x = {"string-dtype": npy(np.array([["a", "b"]] * 10)), "length-mismatch": npy(np.zeros((9, 3), np.float32)),
         "huge-header": npy(header={"descr": "<f4", "fortran_order": False, "shape": (1_000_000_000,)})}[case]
    src = tmp_path / "data.npz"
    with zipfile.ZipFile(src, "w") as zf:
        zf.writestr("x.npy", x)
        zf.writestr("y.npy", npy(y))
    return src


BAD_INPUT = [
    ("cifar", "missing-batch", _bad_cifar, "data_batch_3 is missing"),
    ("cifar", "row-3071", _bad_cifar, "rows are 3071 bytes wide"),
    ("cifar", "os-system", _bad_cifar, "asks for os.system, refused without running it"),
    ("shakespeare", "y-two-chars", _bad_shakespeare, "y row 4 is 2 characters ('ab'), not one character"),
    ("shakespeare", "unknown-char", _bad_shakespeare, "x row 2 holds '~' (position 79)"),
    ("arrays", "string-dtype", _bad_npz, "x has dtype <U1; supported: uint8, int32, float32"),
    ("arrays", "length-mismatch", _bad_npz, "x has 9 samples but y has 10 labels"),
    ("arrays", "huge-header", _bad_npz, "the header promises shape (1000000000,)"),
]


@pytest.mark.parametrize("command, case, build, message", BAD_INPUT, ids=[f"{c}-{k}" for c, k, _, _ in BAD_INPUT])
def test_bad_new_importer_input_via_cli(tmp_path, command, case, build, message):
    import time

    src = build(tmp_path, case)
    out = tmp_path / "store"
    scheme = ["--scheme", "iid", "--clients", 3] if command != "shakespeare" else []
    t0 = time.monotonic()
    r = simfed("partition", command, src, out, *scheme)
    assert time.monotonic() - t0 < 60  # seconds, not minutes (a loaded 2-core machine starts Python slowly)
    assert_user_error(r, str(src.name), message, out=out)
    assert not (tmp_path / "pwned").exists()
