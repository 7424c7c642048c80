"""Round three of the hostile corpus (issue 27): the classes that still passed a wrong input or
failed badly, one family per input kind as in hostile_corpus.py, which adds these to its CASES.

- importer values of the wrong JSON type (LEAF x rows as strings, y booleans or strings, CIFAR
  labels as booleans) and label spaces that are mostly empty (IDX, arrays);
- paths: symlink loops and URIs where only local paths are supported, for every input and output;
- a store URI whose S3 endpoint refuses or never answers (bounded by SIMFED_PROBE_TIMEOUT);
- Ray: `--address auto` with a stale session file, an address Ray would dial elsewhere than probed,
  a pool sized from fractional CPUs;
- noise before the line: a pickled checkpoint torch warns about, a misspelled method via --set;
- contradictions: resuming a finished run with garbage metrics, `metrics` on a garbage status.json.
"""

from __future__ import annotations

import os
import pickle
import socket
import threading
from pathlib import Path
from typing import Callable

import numpy as np

from tests.cli import hostile_corpus as hc
from tests.cli.hostile_corpus import Case

CLASSES = {
    "leaf mistyped values", "cifar mistyped labels", "sparse label space", "symlink loop", "uri for a local path",
    "store uri endpoint down", "address auto stale session", "address dialed elsewhere", "fractional pool",
    "library warning before the line", "note before the error", "finished run garbage metrics",
    "garbage status",
}


# ------------------------------------------------------------------ helpers

def closed_port() -> int:
    """A loopback port nothing listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class H2Listener:
    """Answers the HTTP/2 preface with an empty SETTINGS frame, as a gRPC server would: it passes the
    GCS probe, yet it is no Ray (a port of another gRPC service)."""

    def __init__(self):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(8)
        self.port = self.sock.getsockname()[1]
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
                conn.recv(1024)
                conn.sendall(b"\x00\x00\x00\x04\x00\x00\x00\x00\x00")
            except OSError:
                return

    def close(self) -> None:
        self.sock.close()


H2: list[H2Listener] = []


def h2_port() -> int:
    if not H2:
        H2.append(H2Listener())
    return H2[0].port


def not_dialed_elsewhere() -> str | None:
    """Skip reason when Ray would dial 127.0.0.1 itself (no other address for this machine)."""
    from simfed.engine.address import dialed

    if dialed("127.0.0.1:6379") == "127.0.0.1:6379":
        return "Ray dials loopback as loopback here"
    return None


def loop(work: Path, name: str = "loop") -> Path:
    """A symlink that points at itself."""
    path = work / name
    os.symlink(name, path)
    return path


def _leaf_user(**user) -> Callable:
    obj = {"users": ["a"], "num_samples": [2], "user_data": {"a": {"x": [[0.5] * 784] * 2, "y": [1, 2], **user}}}
    return lambda fx, work: ["partition", "leaf", str(hc.leaf_src(work, obj)), str(work / "out")]


def _shakespeare_y_int(fx, work):
    obj = {"users": ["r"], "num_samples": [1], "user_data": {"r": {"x": ["a" * 80], "y": [7]}}}
    return ["partition", "shakespeare", str(hc.leaf_src(work, obj)), str(work / "out")]


def _cifar_bool_labels(fx, work):
    from simfed.partitions.samples import cifar10_contents, write_cifar

    contents = cifar10_contents(per_batch=4, test=4)
    contents["data_batch_2"][b"labels"] = [True, 1, 2, 3]
    return ["partition", "cifar", str(write_cifar(work / "cifar", contents)), str(work / "out"), "--scheme", "iid",
            "--clients", "2"]


def _sparse_idx(*extra: str) -> Callable:
    labels = np.arange(40) % 10
    labels[::7] = 255  # 11 values used of 0..255
    raw = hc.idx_header(0x08, (40,)) + labels.astype(np.uint8).tobytes()
    return lambda fx, work: hc.idx_args(hc.idx_dir(work, labels=raw), work, *extra)


def _sparse_arrays(fx, work):
    rng = np.random.default_rng(0)
    path = work / "data.npz"
    np.savez(path, x=rng.random((30, 4), dtype=np.float32), y=np.tile([0, 1, 90_000], 10))
    return ["partition", "arrays", str(path), str(work / "out"), "--scheme", "iid", "--clients", "2"]


# ------------------------------------------------------------------ importers

IMPORTERS = [
    Case("leaf-x-strings", "importers", "leaf mistyped values", _leaf_user(x=[["0.5"] * 784] * 2),
         "x row 0 value 0 is str"),
    Case("leaf-x-null", "importers", "leaf mistyped values", _leaf_user(x=[[0.5] * 783 + [None]] * 2),
         "value 783 is NoneType"),
    Case("leaf-x-bool-among-floats", "importers", "leaf mistyped values",
         _leaf_user(x=[[0.5] * 10 + [True] + [0.5] * 773] * 2), "value 10 is bool"),
    Case("leaf-x-row-string", "importers", "leaf mistyped values", _leaf_user(x=["0.5" * 784, [0.5] * 784]),
         "x row 0 has no list"),
    Case("leaf-y-bool", "importers", "leaf mistyped values", _leaf_user(y=[True, False]), "y row 0 is bool"),
    Case("leaf-y-string", "importers", "leaf mistyped values", _leaf_user(y=[1, "2"]), "y row 1 is str"),
    Case("shakespeare-y-int", "importers", "leaf mistyped values", _shakespeare_y_int, "y row 0 is int"),
    Case("cifar-bool-label", "importers", "cifar mistyped labels", _cifar_bool_labels, "row 0 is bool"),
    Case("idx-labels-255-of-11", "importers", "sparse label space", _sparse_idx(), "--compact-labels",
         ),
    Case("arrays-labels-3-of-90001", "importers", "sparse label space", _sparse_arrays, "3 of the 90001 labels"),
    Case("leaf-src-loop", "importers", "symlink loop",
         lambda fx, w: ["partition", "leaf", str(loop(w)), str(w / "out")], "symlink loop"),
    Case("idx-src-loop", "importers", "symlink loop", lambda fx, w: hc.idx_args(loop(w), w), "symlink loop"),
    Case("leaf-out-under-loop", "importers", "symlink loop",
         lambda fx, w: ["partition", "leaf", str(hc.leaf_src(w, hc.leaf_obj(["a"]))), str(loop(w) / "out")],
         "symlink loop"),
    Case("leaf-out-file-uri", "importers", "uri for a local path",
         lambda fx, w: ["partition", "leaf", str(hc.leaf_src(w, hc.leaf_obj(["a"]))), f"file://{w}/out"],
         "local path"),
    Case("arrays-src-s3-uri", "importers", "uri for a local path",
         lambda fx, w: ["partition", "arrays", "s3://bucket/data.npz", str(w / "out"), "--scheme", "iid",
                        "--clients", "2"], "a URI"),
]


# ------------------------------------------------------------------ stores

STORES = [
    Case("store-s3-endpoint-refuses", "stores", "store uri endpoint down",
         lambda fx, w: ["info", f"s3://bucket/store?endpoint_override=127.0.0.1:{closed_port()}&scheme=http"],
         "cannot reach the endpoint"),
    Case("store-s3-endpoint-silent", "stores", "store uri endpoint down",
         lambda fx, w: ["info", f"s3://k:secret@bucket/store?endpoint_override=127.0.0.1:{hc.listener('silent').port}"
                                "&scheme=http"], "did not answer within 1 s", subprocess=True,
         env={"SIMFED_PROBE_TIMEOUT": "1"}),
    Case("store-path-loop", "stores", "symlink loop",
         lambda fx, w: hc.launch_on(fx, w, store=loop(w, "store")), "symlink loop"),
]


# ------------------------------------------------------------------ configs

def _stale_session(text: Callable[[], str]) -> Callable:
    def build(fx, work):
        (work / "rt" / "ray").mkdir(parents=True)
        (work / "rt" / "ray" / "ray_current_cluster").write_text(text())
        return hc.launch_on(fx, work, "--address", "auto", engine='backend = "ray"')
    return build


def _misspelled_method(fx, work):
    return hc.launch_on(fx, work, "--set", "algorithm.name=fedavgg")


CONFIGS = [
    Case("cfg-address-auto-stale-file", "configs", "address auto stale session",
         _stale_session(lambda: f"127.0.0.1:{closed_port()}"), "stale session file", subprocess=True,
         env={"RAY_TMPDIR": "{work}/rt"}),
    Case("cfg-address-auto-stale-garbage", "configs", "address auto stale session",
         _stale_session(lambda: "not an address"), "stale session file", env={"RAY_TMPDIR": "{work}/rt"}),
    Case("cfg-address-auto-stale-silent", "configs", "address auto stale session",
         _stale_session(lambda: f"127.0.0.1:{hc.listener('silent').port}"), "stale session file",
         env={"SIMFED_PROBE_TIMEOUT": "1", "RAY_TMPDIR": "{work}/rt"}),
    Case("cfg-address-dialed-elsewhere", "configs", "address dialed elsewhere",
         lambda fx, w: hc.launch_on(fx, w, "--address", f"127.0.0.1:{h2_port()}", engine='backend = "ray"'),
         "Ray dials it as", skip=not_dialed_elsewhere),
    Case("cfg-cpus-fractional", "configs", "fractional pool",
         hc.set_case("engine.cpus_per_worker=0.001", engine=hc.RAY), "per CPU"),
    Case("cfg-workers-many-fractional", "configs", "fractional pool",
         hc.set_case("engine.cpus_per_worker=0.01", "engine.workers=150", engine=hc.RAY), "at most"),
    Case("cfg-misspelled-method-set", "configs", "note before the error", _misspelled_method,
         "unknown algorithm 'fedavgg'"),
    Case("cfg-out-file-uri", "configs", "uri for a local path",
         lambda fx, w: hc.launch_on(fx, w)[:3] + [f"file://{w}/run", "-q"], "a URI"),
    Case("cfg-experiment-loop", "configs", "symlink loop",
         lambda fx, w: ["launch", str(loop(w, "exp.toml")), "--out", str(w / "run")], "symlink loop"),
]


# ------------------------------------------------------------------ run directories

def _raw_pickle_checkpoint(run: Path) -> None:
    """A plain pickle (protocol 4): torch's weights-only unpickler warns about it, then refuses it."""
    (run / "checkpoint.pt").write_bytes(pickle.dumps({"format": 1, "round": 1}, protocol=4))


def _finished_garbage_metrics(fx, work):
    run = hc.copy_run(fx, work)
    hc._garbage_metrics(run)
    return ["launch", "--resume", str(run), "-q"]


def _garbage_status(*extra: str) -> Callable:
    def build(fx, work):
        run = hc.copy_run(fx, work)
        (run / "status.json").write_bytes(b'{"state": ')
        return ["metrics", str(run), *extra]
    return build


RUNDIRS = [
    Case("run-checkpoint-raw-pickle", "rundirs", "library warning before the line",
         hc._damage(_raw_pickle_checkpoint), "cannot load checkpoint", subprocess=True),
    Case("run-finished-garbage-metrics", "rundirs", "finished run garbage metrics", _finished_garbage_metrics,
         "not a readable Parquet file"),
    Case("run-status-garbage-json", "rundirs", "garbage status", _garbage_status("--json"), "state is unknown"),
    Case("run-status-garbage-table", "rundirs", "garbage status", _garbage_status(), "not valid JSON"),
    Case("run-resume-loop", "rundirs", "symlink loop",
         lambda fx, w: ["launch", "--resume", str(loop(w, "run")), "-q"], "symlink loop"),
    Case("run-resume-uri", "rundirs", "uri for a local path",
         lambda fx, w: ["launch", "--resume", "s3://bucket/run", "-q"], "a URI"),
]

CASES = IMPORTERS + STORES + CONFIGS + RUNDIRS


def close() -> None:
    for h in H2:
        h.close()
    H2.clear()

