"""A corpus of hostile inputs for the real `simfed` CLI, one family per kind of input.

Each Case builds its inputs under a fresh directory WORK and returns the argv to run (from WORK
as the current directory). test_hostile_corpus.py runs every case and asserts the contract for
bad input: exit 2, exactly one line on stderr, no traceback, nothing created, changed or deleted
under WORK (sources intact, no output store, no run directory), and no Ray started.

`cls` names the failure class of issue 11's list (and of issue 27's, in hostile_round3.py, added
at the end) that the case exercises; CLASSES lists them all so the test can check that every class
has a case. Each case must also end within seconds (its time is checked). Cases marked `subprocess` run as a real
process (those that could block forever if the check regressed, and a sample of the others);
the rest run in-process through `simfed.cli.main.main(argv)`, the same function the console
script calls.
"""

from __future__ import annotations

import gzip
import json
import re
import os
import shutil
import socket
import threading
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

# The failure classes of issue 11 ("Bad input"), plus the checks added with them.
CLASSES = {
    # importers
    "importer negative seed", "importer nan float option", "importer out-of-range option",
    "idx dims overflow", "idx huge label", "idx float labels", "idx gzip bomb", "idx corrupt file",
    "nested json", "leaf lone surrogate", "leaf duplicated user", "leaf malformed file",
    "fifo as data file", "out in read-only dir", "out overlaps source", "out exists",
    # stores
    "store clients column missing", "store clients empty", "store clients garbage",
    "store manifest key missing", "store manifest mistyped", "store flipped byte",
    "store truncated file", "store label out of range", "store bad shape", "store missing split file",
    "store inconsistent offsets",
    # configs
    "config string key mistyped", "config huge seed", "config non-finite float", "config huge float",
    "config range", "config cpus_per_worker zero", "config inflight zero", "config workers vs cluster",
    "config gpus without gpu", "config non-ray address", "config ray client address",
    "config bad run name", "nested toml", "config not a table",
    # run directories
    "rundir config garbage", "rundir config truncated", "rundir checkpoint keys",
    "rundir checkpoint shapes", "rundir checkpoint garbage", "rundir checkpoint pickle code",
    "rundir client state garbage", "rundir metrics garbage", "rundir missing",
    # click
    "usage error",
}


@dataclass
class Case:
    id: str
    family: str
    cls: str
    build: Callable[["Fixtures", Path], list[str]]
    needle: str
    subprocess: bool = False
    env: dict = field(default_factory=dict)
    skip: Callable[[], str | None] | None = None


@dataclass
class Fixtures:
    store: Path  # a valid tiny store (8 clients, 1x28x28, 10 classes)
    run: Path  # a finished fedavg run directory on a copy of `store` (checkpoint, metrics, status)


# ------------------------------------------------------------------ small builders

def tiny_store(out: Path) -> Path:
    from simfed.partitions.store import write_store

    rng = np.random.default_rng(0)
    n = 96
    x = rng.integers(0, 256, (n, 1, 28, 28), dtype=np.uint8)
    y = rng.integers(0, 10, n)
    client = np.repeat(np.arange(8), 12)
    split = np.tile(["train"] * 8 + ["val"] * 2 + ["test"] * 2, 8)
    return Path(write_store(out, x, y, client, split, classes=list("0123456789"), unseen={7}))


def experiment(work: Path, store: Path, algorithm: str = 'name = "fedavg"\nlocal_steps = 1',
               engine: str = 'backend = "serial"', extra_run: str = "") -> Path:
    path = work / "exp.toml"
    path.write_text(f'[data]\npath = "{store}"\n[run]\nrounds = 2\nclients_per_round = 2\neval_every = 1\n'
                    f'checkpoint_every = 1\n{extra_run}\n[algorithm]\n{algorithm}\n[engine]\n{engine}\n')
    return path


def copy_store(fx: Fixtures, work: Path) -> Path:
    return Path(shutil.copytree(fx.store, work / "store"))


def launch_on(fx: Fixtures, work: Path, *extra: str, store: Path | None = None, **kw) -> list[str]:
    store = store or copy_store(fx, work)
    return ["launch", str(experiment(work, store, **kw)), "--out", str(work / "run"), "-q", *extra]


def set_case(*sets: str, engine: str = 'backend = "serial"', extra: tuple = ()) -> Callable:
    def build(fx, work):
        argv = launch_on(fx, work, *extra, engine=engine)
        for s in sets:
            argv += ["--set", s]
        return argv
    return build


def rehash(store: Path) -> None:
    """Recompute manifest checksums and sizes so only the deeper checks can catch a change."""
    import hashlib

    m = json.loads((store / "manifest.json").read_text())
    for name in m["files"]:
        data = (store / name).read_bytes()
        m["files"][name] = hashlib.sha256(data).hexdigest()
        m["file_sizes"][name] = len(data)
    (store / "manifest.json").write_text(json.dumps(m))


def edit_manifest(fn: Callable[[dict], None]) -> Callable:
    def build(fx, work):
        store = copy_store(fx, work)
        m = json.loads((store / "manifest.json").read_text())
        fn(m)
        (store / "manifest.json").write_text(json.dumps(m))
        return ["info", str(store)]
    return build


def edit_clients(fn: Callable) -> Callable:
    def build(fx, work):
        import pyarrow.parquet as pq

        store = copy_store(fx, work)
        t = pq.read_table(store / "clients.parquet")
        pq.write_table(fn(t), store / "clients.parquet")
        rehash(store)
        return ["info", str(store)]
    return build


def rewrite_split(store: Path, split: str, fn: Callable) -> None:
    """Rewrite one split file through fn(x column, y column) -> (schema, x, y)."""
    import pyarrow as pa
    import pyarrow.ipc as ipc

    path = store / f"{split}.arrow"
    with pa.memory_map(str(path)) as src:
        table = ipc.open_file(src).read_all()
    schema, xs, ys = fn(table.column("x").combine_chunks(), table.column("y").combine_chunks())
    data = pa.Table.from_arrays([xs, ys], schema=schema)
    with pa.OSFile(str(path) + ".new", "wb") as sink, ipc.new_file(sink, schema) as w:
        w.write_table(data)
    os.replace(str(path) + ".new", path)


def leaf_obj(users: list[str], n: int = 3, label: int = 1, x: float = 0.5) -> dict:
    return {"users": users, "num_samples": [n] * len(users),
            "user_data": {u: {"x": [[x] * 784] * n, "y": [label] * n} for u in users}}


def leaf_src(work: Path, *objs: dict | str) -> Path:
    src = work / "leaf"
    src.mkdir()
    for i, obj in enumerate(objs):
        text = obj if isinstance(obj, str) else json.dumps(obj)
        (src / f"all_data_{i}.json").write_text(text)
    return src


def idx_header(code: int, dims: tuple[int, ...]) -> bytes:
    return bytes([0, 0, code, len(dims)]) + b"".join(int(d).to_bytes(4, "big") for d in dims)


def idx_dir(work: Path, n: int = 40, labels: bytes | None = None, images: bytes | None = None,
            gz: bool = False) -> Path:
    src = work / "idx"
    src.mkdir()
    rng = np.random.default_rng(1)
    if images is None:
        images = idx_header(0x08, (n, 28, 28)) + rng.integers(0, 256, (n, 28, 28), dtype=np.uint8).tobytes()
    if labels is None:
        labels = idx_header(0x08, (n,)) + rng.integers(0, 10, n, dtype=np.uint8).tobytes()
    ext = ".gz" if gz else ""
    (src / f"train-images-idx3-ubyte{ext}").write_bytes(gzip.compress(images) if gz else images)
    (src / f"train-labels-idx1-ubyte{ext}").write_bytes(gzip.compress(labels) if gz else labels)
    return src


def idx_args(src: Path, work: Path, *extra: str) -> list[str]:
    return ["partition", "idx", str(src), str(work / "out"), "--scheme", "iid", "--clients", "4", *extra]


def gzip_bomb(path: Path, header: bytes, body_bytes: int) -> None:
    """A small .gz whose body inflates far beyond what its IDX header promises."""
    comp = zlib.compressobj(9, zlib.DEFLATED, 31)  # wbits 31: gzip container
    with open(path, "wb") as f:
        f.write(comp.compress(header))
        block = bytes(1 << 20)
        for _ in range(body_bytes >> 20):
            f.write(comp.compress(block))
        f.write(comp.flush())


def read_only_parent(work: Path) -> Path:
    """A directory this process cannot create entries in: chmod 555 for a normal user; as root
    (which ignores modes) a sysfs directory, where mkdir fails with EPERM."""
    if os.geteuid() != 0:
        ro = work / "ro"
        ro.mkdir()
        ro.chmod(0o555)
        return ro
    return Path("/sys/kernel")


def no_read_only_dir() -> str | None:
    if os.geteuid() != 0:
        return None
    try:
        os.mkdir("/sys/kernel/simfed-probe")
    except OSError:
        return None
    os.rmdir("/sys/kernel/simfed-probe")
    return "running as root with a writable /sys: no read-only directory to write into"


def has_gpu() -> str | None:
    import torch

    return "a GPU is present" if torch.cuda.is_available() else None


class Listener:
    """A TCP service on loopback that is not Ray: silent, or answering like an HTTP/1 server."""

    def __init__(self, reply: bytes | None):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(8)
        self.port = self.sock.getsockname()[1]
        self.reply = reply
        self.conns: list[socket.socket] = []
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.conns.append(conn)
            if self.reply is not None:
                try:
                    conn.recv(1024)
                    conn.sendall(self.reply)
                    conn.close()
                except OSError:
                    pass

    def close(self) -> None:
        for c in self.conns:
            c.close()
        self.sock.close()


LISTENERS: dict[str, Listener] = {}


def listener(kind: str) -> Listener:
    if kind not in LISTENERS:
        LISTENERS[kind] = Listener(None if kind == "silent" else b"HTTP/1.1 400 Bad Request\r\n\r\n")
    return LISTENERS[kind]


def address_case(kind: str) -> Callable:
    def build(fx, work):
        return launch_on(fx, work, "--address", f"127.0.0.1:{listener(kind).port}", engine='backend = "ray"')
    return build


# ------------------------------------------------------------------ importers

def _synth(*extra: str) -> Callable:
    return lambda fx, work: ["partition", "synthetic-femnist", str(work / "out"), "--clients", "3", *extra]


def _leaf(*objs, extra: tuple = ()) -> Callable:
    return lambda fx, work: ["partition", "leaf", str(leaf_src(work, *objs)), str(work / "out"), *extra]


def _idx(extra: tuple = (), **kw) -> Callable:
    return lambda fx, work: idx_args(idx_dir(work, **kw), work, *extra)


def _leaf_same_out(fx, work):
    src = leaf_src(work, leaf_obj(["a", "b"]))
    return ["partition", "leaf", str(src), str(src), "--overwrite"]


def _leaf_out_is_parent(fx, work):
    src = leaf_src(work, leaf_obj(["a", "b"]))
    return ["partition", "leaf", str(src), str(work), "--overwrite"]


def _idx_out_is_src(fx, work):
    src = idx_dir(work)
    return ["partition", "idx", str(src), str(src), "--scheme", "iid", "--clients", "2", "--overwrite"]


def _leaf_fifo(fx, work):
    src = leaf_src(work, leaf_obj(["a", "b"]))
    os.mkfifo(src / "all_data_1.json")
    return ["partition", "leaf", str(src), str(work / "out")]


def _leaf_src_fifo(fx, work):
    os.mkfifo(work / "data.json")
    return ["partition", "leaf", str(work / "data.json"), str(work / "out")]


def _idx_fifo_labels(fx, work):
    src = idx_dir(work)
    (src / "train-labels-idx1-ubyte").unlink()
    os.mkfifo(src / "train-labels-idx1-ubyte")
    return idx_args(src, work)


def _idx_bomb(fx, work):
    src = work / "idx"
    src.mkdir()
    n = 40
    gzip_bomb(src / "train-images-idx3-ubyte.gz", idx_header(0x08, (n, 28, 28)), 64 << 20)
    labels = idx_header(0x08, (n,)) + bytes(n)
    (src / "train-labels-idx1-ubyte.gz").write_bytes(gzip.compress(labels))
    return idx_args(src, work)


def _out_exists_not_store(fx, work):
    (work / "out").mkdir()
    (work / "out" / "precious.txt").write_text("keep me")
    return ["partition", "synthetic-femnist", str(work / "out"), "--clients", "3", "--overwrite"]


def _out_exists(fx, work):
    (work / "out").write_text("a file")
    return ["partition", "synthetic-femnist", str(work / "out"), "--clients", "3"]


def _out_parent_is_file(fx, work):
    (work / "no").write_text("a file")
    return ["partition", "synthetic-femnist", str(work / "no" / "sub" / "out"), "--clients", "3"]


def _synth_read_only(fx, work):
    return ["partition", "synthetic-femnist", str(read_only_parent(work) / "simfed-out"), "--clients", "3"]


def _leaf_read_only(fx, work):
    src = leaf_src(work, leaf_obj(["a", "b"]))
    return ["partition", "leaf", str(src), str(read_only_parent(work) / "simfed-out")]


def _nested(depth: int) -> str:
    return "[" * depth + "]" * depth


def _lone_surrogate(fx, work):
    obj = leaf_obj(["a", "b"])
    text = json.dumps(obj).replace('"a"', '"\\ud800x"')  # a JSON escape Python decodes to a lone surrogate
    return ["partition", "leaf", str(leaf_src(work, text)), str(work / "out")]


IMPORTERS = [
    Case("synth-seed-negative", "importers", "importer negative seed", _synth("--seed", "-1"), "--seed"),
    Case("synth-seed-huge", "importers", "importer out-of-range option", _synth("--seed", "9" * 25), "--seed"),
    Case("synth-style-nan", "importers", "importer nan float option", _synth("--style-strength", "nan"),
         "--style-strength", subprocess=True),
    Case("synth-style-inf", "importers", "importer nan float option", _synth("--style-strength", "inf"),
         "--style-strength"),
    Case("synth-val-nan", "importers", "importer nan float option", _synth("--val-fraction", "nan"), "--val-fraction"),
    Case("synth-unseen-big", "importers", "importer out-of-range option", _synth("--unseen-fraction", "1.5"),
         "--unseen-fraction"),
    Case("synth-clients-zero", "importers", "importer out-of-range option",
         lambda fx, w: ["partition", "synthetic-femnist", str(w / "out"), "--clients", "0"], "--clients"),
    Case("synth-clients-huge", "importers", "importer out-of-range option",
         lambda fx, w: ["partition", "synthetic-femnist", str(w / "out"), "--clients", "1000000000"], "--clients"),
    Case("synth-out-exists", "importers", "out exists", _out_exists, "already exists"),
    Case("synth-overwrite-non-store", "importers", "out exists", _out_exists_not_store, "not a partition store"),
    Case("synth-out-read-only", "importers", "out in read-only dir", _synth_read_only, "writ",
         skip=no_read_only_dir),
    # A missing parent is created (mkdir -p); one that is a regular file cannot be.
    Case("synth-out-parent-is-file", "importers", "out exists", _out_parent_is_file, "not a directory"),
    Case("leaf-src-src-overwrite", "importers", "out overlaps source", _leaf_same_out, "contain the source"),
    Case("leaf-out-parent-of-src", "importers", "out overlaps source", _leaf_out_is_parent, "contain the source"),
    Case("leaf-seed-negative", "importers", "importer negative seed",
         _leaf(leaf_obj(["a", "b"]), extra=("--seed", "-5")), "--seed"),
    Case("leaf-val-nan", "importers", "importer nan float option",
         _leaf(leaf_obj(["a", "b"]), extra=("--val-fraction", "nan")), "--val-fraction"),
    Case("leaf-nested-json", "importers", "nested json", _leaf(_nested(100_000)), "nested too deeply"),
    Case("leaf-lone-surrogate", "importers", "leaf lone surrogate", _lone_surrogate, "surrogate"),
    Case("leaf-user-twice-in-file", "importers", "leaf duplicated user",
         _leaf({**leaf_obj(["a", "b"]), "users": ["a", "b", "a"], "num_samples": [3, 3, 3]}), "listed twice"),
    Case("leaf-user-in-two-files", "importers", "leaf duplicated user",
         _leaf(leaf_obj(["a", "b"]), leaf_obj(["b", "c"])), "also in", subprocess=True),
    Case("leaf-user-not-string", "importers", "leaf malformed file",
         _leaf({"users": [7], "user_data": {}}), "must be strings"),
    Case("leaf-x-nan", "importers", "leaf malformed file", _leaf(leaf_obj(["a"], x=float("nan"))), "finite"),
    Case("leaf-label-range", "importers", "leaf malformed file", _leaf(leaf_obj(["a"], label=62)), "out of range"),
    Case("leaf-malformed-json", "importers", "leaf malformed file", _leaf('{"users": ['), "malformed JSON"),
    Case("leaf-not-object", "importers", "leaf malformed file", _leaf("[1, 2]"), "not a LEAF file"),
    Case("leaf-fifo-data-file", "importers", "fifo as data file", _leaf_fifo, "FIFO", subprocess=True),
    Case("leaf-src-fifo", "importers", "fifo as data file", _leaf_src_fifo, "FIFO"),
    Case("leaf-out-read-only", "importers", "out in read-only dir", _leaf_read_only, "writ", skip=no_read_only_dir),
    Case("idx-seed-negative", "importers", "importer negative seed", _idx(("--seed", "-1")), "--seed"),
    Case("idx-alpha-nan", "importers", "importer nan float option",
         lambda fx, w: ["partition", "idx", str(idx_dir(w)), str(w / "out"), "--scheme", "dirichlet",
                        "--clients", "4", "--alpha", "nan"], "--alpha"),
    Case("idx-alpha-zero", "importers", "importer out-of-range option",
         lambda fx, w: ["partition", "idx", str(idx_dir(w)), str(w / "out"), "--scheme", "dirichlet",
                        "--clients", "4", "--alpha", "0"], "--alpha"),
    Case("idx-val-nan", "importers", "importer nan float option", _idx(("--val-fraction", "nan")), "--val-fraction"),
    Case("idx-test-inf", "importers", "importer nan float option", _idx(("--test-fraction", "inf")),
         "--test-fraction"),
    Case("idx-float-labels", "importers", "idx float labels",
         _idx(labels=idx_header(0x0D, (40,)) + np.full(40, 1.5, ">f4").tobytes()), "integers"),
    Case("idx-dims-overflow", "importers", "idx dims overflow",
         _idx(images=idx_header(0x08, (2**32 - 1, 2**32 - 1, 2**32 - 1)) + bytes(100)), "at most"),
    Case("idx-dims-overflow-gz", "importers", "idx dims overflow",
         _idx(images=idx_header(0x0E, (2**31, 2**31, 2**31)), gz=True), "at most"),
    Case("idx-label-2e9", "importers", "idx huge label",
         _idx(labels=idx_header(0x0C, (40,)) + np.full(40, 2_000_000_000, ">i4").tobytes()), "beyond"),
    Case("idx-gzip-bomb", "importers", "idx gzip bomb", _idx_bomb, "more than", subprocess=True),
    Case("idx-truncated", "importers", "idx corrupt file",
         _idx(images=idx_header(0x08, (40, 28, 28)) + bytes(100)), "truncated"),
    Case("idx-wrong-magic", "importers", "idx corrupt file", _idx(images=b"\x01\x02\x03\x04" + bytes(64)),
         "not an IDX file"),
    Case("idx-corrupt-gzip", "importers", "idx corrupt file",
         _idx(images=b"\x1f\x8b\x08\x00" + bytes(40)), "gzip"),
    Case("idx-float-images", "importers", "idx corrupt file",
         _idx(images=idx_header(0x0D, (40, 28, 28)) + bytes(40 * 784 * 4)), "uint8"),
    Case("idx-fifo-labels", "importers", "fifo as data file", _idx_fifo_labels, "FIFO", subprocess=True),
    Case("idx-too-many-clients", "importers", "importer out-of-range option", _idx(("--clients", "1000")),
         "clients"),
    Case("idx-out-is-src", "importers", "out overlaps source", _idx_out_is_src, "contain the source"),
    Case("idx-classes-per-client-zero", "importers", "importer out-of-range option",
         lambda fx, w: ["partition", "idx", str(idx_dir(w)), str(w / "out"), "--scheme", "classes",
                        "--clients", "4", "--classes-per-client", "0"], "--classes-per-client"),
]


# ------------------------------------------------------------------ stores

def _flip_byte(fx, work):
    store = copy_store(fx, work)
    path = store / "train.arrow"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x55
    path.write_bytes(bytes(data))
    return launch_on(fx, work, store=store)


def _truncate(fx, work):
    store = copy_store(fx, work)
    path = store / "test.arrow"
    path.write_bytes(path.read_bytes()[:-100])
    return launch_on(fx, work, "--no-verify", store=store)


def _missing_split(fx, work):
    store = copy_store(fx, work)
    (store / "val.arrow").unlink()
    return launch_on(fx, work, "--no-verify", store=store)


def _fifo_split(fx, work):
    store = copy_store(fx, work)
    (store / "val.arrow").unlink()
    os.mkfifo(store / "val.arrow")
    return launch_on(fx, work, store=store)


def _label_out_of_range(fx, work):
    import pyarrow as pa

    store = copy_store(fx, work)
    rewrite_split(store, "train", lambda x, y: (pa.schema([("x", x.type), ("y", pa.int64())]), x,
                                                pa.array(np.full(len(y), 10, np.int64))))
    rehash(store)
    return launch_on(fx, work, store=store)


def _bad_shape(fx, work):
    store = copy_store(fx, work)
    m = json.loads((store / "manifest.json").read_text())
    m["sample_shape"] = [1, 27, 27]
    (store / "manifest.json").write_text(json.dumps(m))
    return launch_on(fx, work, store=store)


def _bad_offsets(t):
    import pyarrow as pa

    i = t.column_names.index("val_offset")
    return t.set_column(i, "val_offset", pa.array(np.zeros(t.num_rows, np.int64)))


def _drop_column(t):
    return t.drop_columns(["n_val"])


def _empty_clients(t):
    return t.slice(0, 0)


def _garbage_clients(fx, work):
    store = copy_store(fx, work)
    (store / "clients.parquet").write_bytes(b"PAR1" + os.urandom(300) + b"PAR1")
    rehash(store)
    return ["info", str(store)]


def _store_is_file(fx, work):
    (work / "store").write_text("not a store")
    return launch_on(fx, work, store=work / "store")


STORES = [
    Case("store-clients-missing-column", "stores", "store clients column missing", edit_clients(_drop_column),
         "'n_val' is missing"),
    Case("store-clients-empty", "stores", "store clients empty", edit_clients(_empty_clients), "clients"),
    Case("store-clients-garbage", "stores", "store clients garbage", _garbage_clients, "Parquet"),
    Case("store-offsets", "stores", "store inconsistent offsets", edit_clients(_bad_offsets), "val_offset"),
    Case("store-manifest-no-shape", "stores", "store manifest key missing",
         edit_manifest(lambda m: m.pop("sample_shape")), "'sample_shape' is missing"),
    Case("store-manifest-no-files", "stores", "store manifest key missing", edit_manifest(lambda m: m.pop("files")),
         "'files' is missing"),
    Case("store-manifest-classes-mistyped", "stores", "store manifest mistyped",
         edit_manifest(lambda m: m.update(num_classes="ten")), "wrong type"),
    Case("store-manifest-counts-mistyped", "stores", "store manifest mistyped",
         edit_manifest(lambda m: m["counts"].update(train=[1])), "wrong type"),
    Case("store-manifest-huge-classes", "stores", "store manifest mistyped",
         edit_manifest(lambda m: m.update(num_classes=2_000_000_000)), "num_classes"),
    Case("store-manifest-nested", "stores", "nested json",
         lambda fx, w: (copy_store(fx, w) / "manifest.json").write_text(_nested(50_000)) and ["info", str(w / "store")],
         "nested too deeply"),
    Case("store-flipped-byte", "stores", "store flipped byte", _flip_byte, "checksum mismatch", subprocess=True),
    Case("store-truncated-no-verify", "stores", "store truncated file", _truncate, "the manifest records"),
    Case("store-label-out-of-range", "stores", "store label out of range", _label_out_of_range, "out of range"),
    Case("store-bad-shape", "stores", "store bad shape", _bad_shape, "sample shape"),
    Case("store-missing-split", "stores", "store missing split file", _missing_split, "val.arrow: missing"),
    Case("store-fifo-split", "stores", "fifo as data file", _fifo_split, "FIFO"),
    Case("store-is-a-file", "stores", "store missing split file", _store_is_file, "store"),
]


# ------------------------------------------------------------------ configs

def _nested_toml(fx, work):
    (work / "exp.toml").write_text("[data]\npath = " + "[" * 100_000 + "]" * 100_000 + "\n")
    return ["launch", str(work / "exp.toml"), "--out", str(work / "run"), "-q"]


def _fifo_toml(fx, work):
    os.mkfifo(work / "exp.toml")
    return ["launch", str(work / "exp.toml"), "--out", str(work / "run"), "-q"]


def _run_name(name_toml: str) -> Callable:
    def build(fx, work):
        store = copy_store(fx, work)
        return ["launch", str(experiment(work, store, extra_run=f"name = {name_toml}")), "-q"]
    return build


def _algorithm(text: str) -> Callable:
    def build(fx, work):
        store = copy_store(fx, work)
        exp = experiment(work, store)
        exp.write_text(exp.read_text().replace('[algorithm]\nname = "fedavg"\nlocal_steps = 1', text))
        return ["launch", str(exp), "--out", str(work / "run"), "-q"]
    return build


RAY = 'backend = "ray"'
CONFIGS = [
    Case("cfg-data-path-int", "configs", "config string key mistyped", set_case("data.path=5"), "must be a string",
         subprocess=True),
    Case("cfg-run-name-int", "configs", "config string key mistyped", set_case("run.name=5"), "must be a string"),
    Case("cfg-address-int", "configs", "config string key mistyped", set_case("engine.address=5"),
         "must be a string"),
    Case("cfg-seed-huge", "configs", "config huge seed", set_case("run.seed=99999999999999999999"), "seed"),
    Case("cfg-seed-negative", "configs", "config range", set_case("run.seed=-1"), "seed"),
    Case("cfg-lr-1e308", "configs", "config huge float", set_case("algorithm.lr=1e308"), "lr"),
    Case("cfg-lr-nan", "configs", "config non-finite float", set_case("algorithm.lr=nan"), "not a finite"),
    Case("cfg-lr-inf", "configs", "config non-finite float", set_case("algorithm.lr=inf"), "not a finite"),
    Case("cfg-lr-negative", "configs", "config range", set_case("algorithm.lr=-0.1"), "lr"),
    Case("cfg-momentum", "configs", "config range", set_case("algorithm.momentum=1.5"), "momentum"),
    Case("cfg-steps-float", "configs", "config range", set_case("algorithm.local_steps=2.5"), "integer"),
    Case("cfg-steps-negative", "configs", "config range", set_case("algorithm.local_steps=-3"), "local_steps"),
    Case("cfg-cpus-zero", "configs", "config cpus_per_worker zero", set_case("engine.cpus_per_worker=0", engine=RAY),
         "cpus_per_worker"),
    Case("cfg-inflight-zero", "configs", "config inflight zero", set_case("engine.inflight_per_worker=0", engine=RAY),
         "inflight_per_worker"),
    Case("cfg-workers-1000", "configs", "config workers vs cluster", set_case("engine.workers=1000", engine=RAY),
         "workers = 1000"),
    Case("cfg-cpus-too-many", "configs", "config workers vs cluster",
         set_case("engine.cpus_per_worker=4096", engine=RAY), "no room"),
    Case("cfg-gpus-without-gpu", "configs", "config gpus without gpu",
         set_case("engine.gpus_per_worker=0.5", engine=RAY), "no GPU", skip=has_gpu),
    Case("cfg-address-silent-tcp", "configs", "config non-ray address", address_case("silent"), "did not answer",
         env={"SIMFED_PROBE_TIMEOUT": "1"}),
    Case("cfg-address-http", "configs", "config non-ray address", address_case("http"), "not a Ray GCS"),
    Case("cfg-address-ray-client", "configs", "config ray client address",
         set_case(extra=("--address", "ray://127.0.0.1:10001"), engine=RAY), "ray:// (Ray Client)"),
    Case("cfg-address-garbage", "configs", "config non-ray address",
         set_case(extra=("--address", "no-port-here"), engine=RAY), "HOST:PORT"),
    Case("cfg-run-name-nul", "configs", "config bad run name", _run_name('"a\\u0000b"'), "NUL"),
    Case("cfg-run-name-long", "configs", "config bad run name", _run_name('"' + "x" * 300 + '"'), "bytes long"),
    Case("cfg-run-name-slash", "configs", "config bad run name", _run_name('"../escape"'), "separator"),
    Case("cfg-run-name-dotdot", "configs", "config bad run name", _run_name('".."'), "not a usable name"),
    Case("cfg-nested-toml", "configs", "nested toml", _nested_toml, "nested too deeply"),
    Case("cfg-nested-set", "configs", "nested toml", set_case("run.rounds=" + _nested(100_000)), "nested too deeply"),
    Case("cfg-fifo-experiment", "configs", "fifo as data file", _fifo_toml, "FIFO"),
    Case("cfg-rounds-zero", "configs", "config range", set_case("run.rounds=0"), "rounds"),
    Case("cfg-cohort-zero", "configs", "config range", set_case("run.clients_per_round=0"), "clients_per_round"),
    Case("cfg-backend", "configs", "config range", set_case('engine.backend="gpu"'), "backend"),
    Case("cfg-retries-negative", "configs", "config range", set_case("engine.max_retries=-1"), "max_retries"),
    Case("cfg-generate-unknown", "configs", "config range", set_case('data.generate="imagenet"'), "generate"),
    Case("cfg-generate-clients-huge", "configs", "config range",
         set_case('data.generate="synthetic-femnist"', "data.clients=1000000000"), "--clients"),
    Case("cfg-algorithm-name-int", "configs", "config string key mistyped", _algorithm("[algorithm]\nname = 5"),
         "[algorithm] name must be a string"),
    Case("cfg-algorithm-not-table", "configs", "config not a table",
         lambda fx, w: (w / "exp.toml").write_text('algorithm = "fedavg"\n') and
         ["launch", str(w / "exp.toml"), "--out", str(w / "run")], "must be a table"),
    Case("cfg-set-into-non-table", "configs", "config not a table",
         lambda fx, w: (w / "exp.toml").write_text('run = 3\n') and
         ["launch", str(w / "exp.toml"), "--set", "run.rounds=2", "--out", str(w / "run")], "not a table"),
    Case("cfg-unknown-key", "configs", "config range", set_case("algorithm.lrr=0.1"), "lrr"),
    Case("cfg-out-read-only", "configs", "out in read-only dir",
         lambda fx, w: launch_on(fx, w)[:3] + [str(read_only_parent(w) / "simfed-out"), "-q"], "simfed-out",
         skip=no_read_only_dir),
    Case("cfg-out-under-a-file", "configs", "out exists",
         lambda fx, w: (w / "f").write_text("x") and launch_on(fx, w)[:3] + [str(w / "f" / "run"), "-q"],
         "not a writable directory"),
]


# ------------------------------------------------------------------ run directories

def copy_run(fx: Fixtures, work: Path) -> Path:
    return Path(shutil.copytree(fx.run, work / "run"))


def _damage(fn: Callable[[Path], None], command: str = "resume", *extra: str) -> Callable:
    def build(fx, work):
        run = copy_run(fx, work)
        if command == "resume":
            # One round more than the checkpoint holds, so the resume has work to do and checks every
            # file it would read (a finished run is only reported as finished, without the data).
            cfg = json.loads((run / "config.json").read_text())
            cfg["run"]["rounds"] += 1
            (run / "config.json").write_text(json.dumps(cfg))
        fn(run)
        if command == "resume":
            return ["launch", "--resume", str(run), "-q", *extra]
        return ["metrics", str(run), *extra]
    return build


def _edit_checkpoint(fn: Callable[[dict], None]) -> Callable[[Path], None]:
    def edit(run: Path) -> None:
        import torch

        ckpt = torch.load(run / "checkpoint.pt", weights_only=True)
        fn(ckpt)
        torch.save(ckpt, run / "checkpoint.pt")
    return edit


def _wrong_shapes(ckpt: dict) -> None:
    import torch

    def first_tensor(d):
        for k, v in d.items():
            if isinstance(v, torch.Tensor):
                d[k] = torch.zeros(3, dtype=v.dtype)
                return True
            if isinstance(v, dict) and first_tensor(v):
                return True
        return False

    assert first_tensor(ckpt["server"])


class _Evil:
    """Unpickling this runs a shell command: weights_only must refuse it."""

    def __reduce__(self):
        return (os.system, ("touch PWNED",))


def _pickle_with_code(run: Path) -> None:
    import torch

    torch.save({"format": 1, "round": 1, "server": {}, "counters": {}, "x": _Evil()}, run / "checkpoint.pt")


def _garbage_client_state(run: Path) -> None:
    d = run / "client_state" / "000" / "0"
    d.mkdir(parents=True)
    (d / "r000000p00.pt").write_bytes(b"PK\x03\x04 garbage, not a zip")


def _garbage_metrics(run: Path) -> None:
    first = sorted((run / "metrics").glob("r*.parquet"))[0]
    first.write_bytes(b"PAR1 not parquet at all PAR1")


def _metrics_wrong_columns(run: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    first = sorted((run / "metrics").glob("r*.parquet"))[0]
    pq.write_table(pa.table({"round": [1], "accuracy": ["high"]}), first)


def _no_checkpoint(run: Path) -> None:
    (run / "checkpoint.pt").unlink()


def _write(name: str, data: bytes) -> Callable[[Path], None]:
    return lambda run: (run / name).write_bytes(data)


def _truncate_config(run: Path) -> None:
    text = (run / "config.json").read_bytes()
    (run / "config.json").write_bytes(text[: len(text) // 2])


RUNDIRS = [
    Case("run-config-garbage", "rundirs", "rundir config garbage", _damage(_write("config.json", os.urandom(64))),
         "config.json", subprocess=True),
    Case("run-config-truncated", "rundirs", "rundir config truncated", _damage(_truncate_config), "malformed JSON"),
    Case("run-config-list", "rundirs", "rundir config garbage", _damage(_write("config.json", b"[1, 2]")),
         "not a simfed config"),
    Case("run-config-bad-value", "rundirs", "rundir config garbage",
         _damage(lambda r: (r / "config.json").write_text(
             re.sub(r'"rounds": \d+', '"rounds": "two"', (r / "config.json").read_text()))), "rounds"),
    Case("run-config-missing", "rundirs", "rundir missing", _damage(lambda r: (r / "config.json").unlink()),
         "no config.json"),
    Case("run-checkpoint-no-server", "rundirs", "rundir checkpoint keys",
         _damage(_edit_checkpoint(lambda c: c.pop("server"))), "'server'"),
    Case("run-checkpoint-no-round", "rundirs", "rundir checkpoint keys",
         _damage(_edit_checkpoint(lambda c: c.pop("round"))), "'round'"),
    Case("run-checkpoint-round-beyond", "rundirs", "rundir checkpoint keys",
         _damage(_edit_checkpoint(lambda c: c.update(round=99))), "beyond"),
    Case("run-checkpoint-counters", "rundirs", "rundir checkpoint keys",
         _damage(_edit_checkpoint(lambda c: c.update(counters={"dropped": "x"}))), "counters"),
    Case("run-checkpoint-shapes", "rundirs", "rundir checkpoint shapes", _damage(_edit_checkpoint(_wrong_shapes)),
         "shape"),
    Case("run-checkpoint-missing-entry", "rundirs", "rundir checkpoint shapes",
         _damage(_edit_checkpoint(lambda c: c.update(server={}))), "lacks"),
    Case("run-checkpoint-garbage", "rundirs", "rundir checkpoint garbage",
         _damage(_write("checkpoint.pt", os.urandom(500))), "cannot load checkpoint"),
    Case("run-checkpoint-pickle-code", "rundirs", "rundir checkpoint pickle code", _damage(_pickle_with_code),
         "cannot load checkpoint"),
    Case("run-checkpoint-missing", "rundirs", "rundir missing", _damage(_no_checkpoint), "no checkpoint"),
    Case("run-client-state-garbage", "rundirs", "rundir client state garbage", _damage(_garbage_client_state),
         "client state"),
    Case("run-metrics-garbage-resume", "rundirs", "rundir metrics garbage", _damage(_garbage_metrics), "Parquet"),
    Case("run-metrics-garbage", "rundirs", "rundir metrics garbage", _damage(_garbage_metrics, "metrics"), "Parquet"),
    Case("run-metrics-wrong-columns", "rundirs", "rundir metrics garbage",
         _damage(_metrics_wrong_columns, "metrics"), "column"),
    Case("run-resume-not-a-dir", "rundirs", "rundir missing",
         lambda fx, w: ["launch", "--resume", str(w / "nope"), "-q"], "not a run directory"),
    Case("run-metrics-round-zero", "rundirs", "usage error",
         lambda fx, w: ["metrics", str(copy_run(fx, w)), "--round", "0"], "--round"),
    Case("run-metrics-split", "rundirs", "usage error",
         lambda fx, w: ["metrics", str(copy_run(fx, w)), "--split", "train"], "--split"),
]


# ------------------------------------------------------------------ click usage errors

USAGE = [
    Case("usage-unknown-option", "usage", "usage error", lambda fx, w: ["launch", "--bogus"], "No such option",
         subprocess=True),
    Case("usage-missing-argument", "usage", "usage error", lambda fx, w: ["partition", "idx"], "Missing argument"),
    Case("usage-missing-info-dir", "usage", "usage error", lambda fx, w: ["info"], "Missing argument"),
    Case("usage-bad-int", "usage", "usage error",
         lambda fx, w: ["partition", "synthetic-femnist", str(w / "out"), "--seed", "abc"], "--seed"),
    Case("usage-unknown-command", "usage", "usage error", lambda fx, w: ["lanch"], "lanch"),
]

CASES = IMPORTERS + STORES + CONFIGS + RUNDIRS + USAGE

# Round three (issue 27): its own module, added here so the corpus stays one list.
from tests.cli import hostile_round3 as _round3  # noqa: E402  (it uses the helpers above)

CASES += _round3.CASES
CLASSES |= _round3.CLASSES
