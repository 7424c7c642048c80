"""The Arrow partition store: layout and zero-copy reading (writing lives in writer.py).

Layout of a store directory (format_version 1):

- ``manifest.json``: format_version, classes, num_classes, sample_shape (any fixed shape: [C, H, W],
  [80], [D]), dtype ("uint8", "int32", "float32"), input ("unit", "raw", "tokens") and vocab (with
  "tokens"; see simfed.partitions.dtypes: a manifest without dtype/input/vocab is uint8 "unit"),
  counts {train, val, test, total, clients, seen, unseen}, files {name: sha256},
  file_sizes {name: bytes}, plus free-form ``source`` metadata from the importer.
- ``clients.parquet``: client_id (int64, sorted), name (the source's user id, e.g. LEAF writer),
  cohort ("seen"/"unseen"), n_train, n_val, n_test, n_classes (distinct labels in the client's
  train split), train_offset, val_offset, test_offset (first row of the client in each split file).
- ``train.arrow``, ``val.arrow``, ``test.arrow``: Arrow IPC *file* format, uncompressed, columns
  ``x`` (fixed_size_binary(prod(shape) * itemsize), the sample's little-endian values row-major)
  and ``y`` (int64), rows sorted by client.

Reconstructed choices:
- A client's rows never straddle two record batches (the writer only cuts batches at client
  boundaries), so ``read`` is a slice of one batch's buffers: zero-copy from the memory map.
- Labels are stored as int64 so that ``y`` too is a view (8 bytes/sample next to 784 for pixels).
- ``read`` returns x in the store's dtype as a view of the bytes: Arrow buffers are 64-byte aligned
  and a row is a whole number of elements, so an int32/float32 view is aligned too.
- Arrays returned by ``read`` are read-only views; callers that need to write must copy
  (torch.from_numpy warns on read-only input; ``torch.as_tensor(x).float()`` copies anyway).
- Writing is local-only (build in a temp dir next to OUT, rename at the end); reading accepts any
  URI that ``pyarrow.fs`` understands (non-local files are read per batch, not memory-mapped).
"""

from __future__ import annotations

import hashlib
import os

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.ipc as ipc
import pyarrow.parquet as pq

from simfed.core import validate
from simfed.core.errors import SimfedError
from simfed.core.safeio import parse_json, read_bytes, regular_file
from simfed.partitions import dtypes, remote
from simfed.partitions.storecheck import CLIENTS_MAX_BYTES, MANIFEST_MAX_BYTES, check_clients, check_manifest
from simfed.partitions.writer import (  # noqa: F401  (write_store is part of this module's API)
    CLIENTS, FORMAT_VERSION, MANIFEST, SPLIT_FILES, SPLITS, StoreWriter, choose_unseen,
    write_store)


# ---------------------------------------------------------------- reading

# Per-process cache of open split files: {(pid, path, split): _SplitFile}. Keyed by pid so a
# forked child never reuses its parent's file handles.
_OPEN: dict[tuple[int, str, str], "_SplitFile"] = {}


def _resolve(path: str) -> tuple[pafs.FileSystem | None, str, bool]:
    """(filesystem, path inside it, is_local) for a local path or a pyarrow.fs URI.

    Local paths get no pyarrow filesystem at all: plain ``open`` and ``pa.memory_map`` suffice,
    and a process that used pyarrow's LocalFileSystem streams with torch imported was seen to
    abort at interpreter exit ("terminate called without an active exception").
    """
    if remote.is_uri(path):
        try:
            fs, inner = pafs.FileSystem.from_uri(path)
        except Exception as exc:  # pyarrow raises several types for unknown schemes/hosts
            raise SimfedError(f"{remote.redact(path)}: cannot open store URI ({exc})") from None
        return fs, inner.rstrip("/"), False
    local = path[len("file://"):] if path.startswith("file://") else path
    return None, os.path.abspath(local), True


def _open_stream(fs: pafs.FileSystem | None, path: str):
    return open(path, "rb") if fs is None else fs.open_input_stream(path)


class _SplitFile:
    """One opened split file: reader, row start of each batch, cache of decoded batches."""

    def __init__(self, fs: pafs.FileSystem | None, path: str, local: bool):
        self.source = pa.memory_map(path, "r") if local else fs.open_input_file(path)
        self.reader = ipc.open_file(self.source)
        self.batch_rows = None
        self.batches: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    def starts(self) -> np.ndarray:
        if self.batch_rows is None:
            # Reading each batch's row count touches only its metadata, not its body.
            n = [self.reader.get_batch(i).num_rows for i in range(self.reader.num_record_batches)]
            self.batch_rows = np.concatenate(([0], np.cumsum(n, dtype=np.int64)))
        return self.batch_rows

    def batch(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        if i not in self.batches:
            b = self.reader.get_batch(i)
            xcol, ycol = b.column(0), b.column(1)
            xbuf = np.frombuffer(xcol.buffers()[1], dtype=np.uint8)
            width = xcol.type.byte_width
            xs = xbuf[xcol.offset * width:(xcol.offset + len(xcol)) * width]
            ys = dtypes.numeric(ycol)
            self.batches[i] = (xs, ys)
        return self.batches[i]


class PartitionStore:
    """A federated dataset on disk; cheap to pickle (only the path travels)."""

    def __init__(self, path: str):
        self.path = str(path)
        self._fs, self._root, self._local = _resolve(self.path)
        self._manifest: dict | None = None
        self._clients: pa.Table | None = None
        self._index: dict[str, np.ndarray] | None = None

    # -- construction / pickling
    @classmethod
    def open(cls, path: str, verify: bool = False) -> "PartitionStore":
        """Open and check the metadata and every file's presence and size; `verify` also checks
        every file's sha256 (reads the whole store)."""
        validate.text("store path", str(path))
        store = cls(str(path))
        if not store._local:  # an endpoint that does not answer: seconds, not the SDK's minutes
            remote.probe_endpoint(store.path, "store")
        store._load()  # fail early with a clear message rather than inside a worker
        store.check_files()
        if verify:
            store.verify()
        return store

    def __reduce__(self):
        return (PartitionStore, (self.path,))

    def _file(self, name: str) -> str:
        return f"{self._root}/{name}"

    def _read_bytes(self, name: str, limit: int) -> bytes:
        if self._local:
            if not os.path.lexists(self._file(name)):
                raise SimfedError(f"{self._file(name)}: missing; {remote.redact(self.path)} is not a complete "
                                  "partition store (re-run `simfed partition`)")
            return read_bytes(self._file(name), limit, "store file")
        try:
            with _open_stream(self._fs, self._file(name)) as f:
                data = f.read(limit + 1)
            if len(data) > limit:
                raise SimfedError(f"{self._file(name)}: larger than {limit:,} bytes; not a store file")
            return data
        except FileNotFoundError:
            raise SimfedError(f"{self._file(name)}: missing; {remote.redact(self.path)} is not a complete "
                              "partition store (re-run `simfed partition`)") from None
        except OSError as exc:
            raise SimfedError(f"{self._file(name)}: cannot read ({exc})") from None

    def _load(self) -> None:
        if self._manifest is not None:
            return
        if self._local:
            missing = not os.path.isdir(self._root)
        else:
            info = remote.call(self.path, "store", self._fs.get_file_info, self._root)
            missing = info.type == pafs.FileType.NotFound
        if missing:
            raise SimfedError(f"{remote.redact(self.path)}: no such partition store directory")
        manifest = parse_json(self._read_bytes(MANIFEST, MANIFEST_MAX_BYTES), self._file(MANIFEST))
        if not isinstance(manifest, dict) or manifest.get("format_version") != FORMAT_VERSION:
            raise SimfedError(f"{self._file(MANIFEST)}: unsupported format_version "
                              f"{manifest.get('format_version') if isinstance(manifest, dict) else None}"
                              f" (expected {FORMAT_VERSION}); re-create the store")
        check_manifest(manifest, self._file(MANIFEST))
        try:
            # ParquetFile without threads: pq.read_table's dataset path was seen to abort the
            # process at exit when torch is also loaded (pyarrow 26, torch 2.13).
            clients = pq.ParquetFile(pa.BufferReader(self._read_bytes(CLIENTS, CLIENTS_MAX_BYTES))).read(
                use_threads=False)
        except (pa.ArrowException, OSError) as exc:
            raise SimfedError(f"{self._file(CLIENTS)}: not a valid Parquet file "
                              f"({str(exc).splitlines()[0] if str(exc) else type(exc).__name__}); "
                              "re-create the store") from None
        check_clients(clients, manifest, self._file(CLIENTS))
        self._manifest, self._clients = manifest, clients
        self._index = {c: dtypes.numeric(clients.column(c)) for c in clients.column_names
                       if c not in ("name", "cohort")}
        cohort = clients.column("cohort").to_pylist()
        self._index["unseen"] = np.array([c == "unseen" for c in cohort], dtype=bool)

    def check_files(self) -> None:
        """Every file the manifest lists exists, is a regular file and has its recorded size
        (a stat per file: cheap enough for every open by `simfed launch`)."""
        self._load()
        for name, expected in self._manifest["file_sizes"].items():
            path = self._file(name)
            if self._local:
                if not os.path.lexists(path):
                    raise SimfedError(f"{path}: missing from the store; re-create it")
                size = regular_file(path, "store file")
            else:
                info = remote.call(self.path, "store", self._fs.get_file_info, path)
                if info.type != pafs.FileType.File:
                    raise SimfedError(f"{path}: missing from the store; re-create it")
                size = info.size
            if size != expected:
                raise SimfedError(f"{path}: {size:,} bytes, the manifest records {expected:,}; the "
                                  "store is truncated or was changed: re-create it")

    def check_contents(self) -> None:
        """Split files agree with the manifest and the clients table: schema (sample shape),
        row counts, no client straddling two batches, labels within the classes. Reads only
        metadata and the label column (8 bytes per sample) of image stores, so a worker never meets
        these; int32/float32 and token stores also have every x checked (finite, within the vocab)."""
        self._load()
        width, k = dtypes.row_bytes(self.sample_shape, self.dtype), self.num_classes
        want = pa.schema([("x", pa.binary(width)), ("y", pa.int64())])
        for split in SPLITS:
            if int(self._index[f"n_{split}"].sum()) == 0 and self._manifest["counts"][split] == 0:
                continue
            sf = self._split_file(split)
            where = self._file(SPLIT_FILES[split])
            if not sf.reader.schema.equals(want):
                raise SimfedError(f"{where}: columns {sf.reader.schema.names} of types "
                                  f"{[str(t) for t in sf.reader.schema.types]} do not match sample shape "
                                  f"{list(self.sample_shape)} (x fixed_size_binary[{width}], y int64); "
                                  "re-create the store")
            try:
                starts = sf.starts()
            except (pa.ArrowException, OSError) as exc:
                raise SimfedError(f"{where}: unreadable record batch ({exc}); re-create the store") from None
            if int(starts[-1]) != self._manifest["counts"][split]:
                raise SimfedError(f"{where}: {int(starts[-1])} rows, the manifest records "
                                  f"{self._manifest['counts'][split]}; re-create the store")
            n, off = self._index[f"n_{split}"], self._index[f"{split}_offset"]
            has = n > 0
            b = np.searchsorted(starts, off[has], side="right") - 1
            if (off[has] + n[has] > starts[b + 1]).any():
                raise SimfedError(f"{where}: a client's rows straddle two record batches; re-create the "
                                  "store with `simfed partition`")
            for i in range(len(starts) - 1):
                ys = sf.reader.get_batch(i).column(1)
                if ys.null_count:
                    raise SimfedError(f"{where}: missing labels; re-create the store")
                lo, hi = pc.min(ys).as_py(), pc.max(ys).as_py()
                if lo is not None and (lo < 0 or hi >= k):
                    raise SimfedError(f"{where}: label {lo if lo < 0 else hi} out of range 0..{k - 1} "
                                      f"({k} classes in the manifest); re-create the store")
            if self.input != "unit":
                self._check_values(sf, starts, where)

    def _check_values(self, sf: "_SplitFile", starts: np.ndarray, where: str) -> None:
        """Every x of a split file finite and within the vocabulary (one batch at a time)."""
        for i in range(len(starts) - 1):
            xs = sf.batch(i)[0].view(dtypes.DTYPES[self.dtype]).reshape(-1, *self.sample_shape)
            bad = dtypes.first_bad_row(xs, self.input, len(self.vocab))
            sf.batches.pop(i, None)  # a check, not a read: keep no reference to the batch
            if bad is not None:
                raise SimfedError(f"{where}: row {int(starts[i]) + bad[0]}: {bad[1]}; re-create the store")

    def verify(self) -> None:
        """Check every file's sha256 against the manifest (reads every byte)."""
        self._load()
        for name, expected in self._manifest["files"].items():
            h = hashlib.sha256()
            try:
                with _open_stream(self._fs, self._file(name)) as f:
                    while chunk := f.read(8 << 20):
                        h.update(chunk)
            except FileNotFoundError:
                raise SimfedError(f"{self._file(name)}: missing from the store; re-create it") \
                    from None
            if h.hexdigest() != expected:
                raise SimfedError(f"{self._file(name)}: checksum mismatch (file changed or "
                                  "corrupt); re-create the store")

    # -- metadata
    @property
    def manifest(self) -> dict:
        self._load()
        return self._manifest

    @property
    def clients(self) -> pa.Table:
        self._load()
        return self._clients

    @property
    def num_classes(self) -> int:
        return int(self.manifest["num_classes"])

    @property
    def classes(self) -> list[str]:
        return list(self.manifest["classes"])

    @property
    def sample_shape(self) -> tuple[int, ...]:
        return tuple(int(v) for v in self.manifest["sample_shape"])

    @property
    def dtype(self) -> str:
        """"uint8", "int32" or "float32": what ``read`` returns (absent from old manifests: uint8)."""
        return str(self.manifest.get("dtype", "uint8"))

    @property
    def input(self) -> str:
        """How the model sees x: "unit" (x / 255), "raw" (float32) or "tokens" (int64 ids)."""
        return str(self.manifest.get("input", "unit"))

    @property
    def vocab(self) -> list[str]:
        """Token strings (id i is vocab[i]) of a "tokens" store; empty otherwise."""
        return list(self.manifest.get("vocab") or [])

    def task_fields(self) -> dict:
        """What `simfed.algorithms.base.Task` needs from the store (the engine adds client counts)."""
        return {"input_shape": self.sample_shape, "num_classes": self.num_classes, "dtype": self.dtype,
                "input": self.input, "vocab": tuple(self.vocab)}

    def client_ids(self, cohort: str | None = None) -> np.ndarray:
        self._load()
        ids = self._index["client_id"]
        if cohort is None:
            return ids.copy()
        if cohort not in ("seen", "unseen"):
            raise SimfedError(f"cohort must be 'seen', 'unseen' or None, got {cohort!r}")
        mask = self._index["unseen"] if cohort == "unseen" else ~self._index["unseen"]
        return ids[mask]

    def _row(self, client_id: int) -> int:
        self._load()
        ids = self._index["client_id"]
        i = int(np.searchsorted(ids, client_id))
        if i >= len(ids) or ids[i] != client_id:
            raise SimfedError(f"{remote.redact(self.path)}: no client with id {client_id}")
        return i

    @staticmethod
    def _check_split(split: str) -> None:
        if split not in SPLITS:
            raise SimfedError(f"split must be one of {SPLITS}, got {split!r}")

    def num_samples(self, client_id: int, split: str) -> int:
        self._check_split(split)
        return int(self._index[f"n_{split}"][self._row(client_id)])

    # -- data
    def _split_file(self, split: str) -> _SplitFile:
        key = (os.getpid(), self.path, split)
        sf = _OPEN.get(key)
        if sf is None:
            try:
                sf = _SplitFile(self._fs, self._file(SPLIT_FILES[split]), self._local)
            except FileNotFoundError:
                raise SimfedError(f"{self._file(SPLIT_FILES[split])}: missing; re-create the "
                                  "store") from None
            except (pa.ArrowException, OSError) as exc:
                raise SimfedError(f"{self._file(SPLIT_FILES[split])}: not an Arrow IPC file "
                                  f"({exc}); re-create the store") from None
            _OPEN[key] = sf
        return sf

    def read(self, client_id: int, split: str) -> tuple[np.ndarray, np.ndarray]:
        """x (n, *sample_shape) of the store's dtype and y int64 (n,): read-only views into the
        mapped file."""
        self._check_split(split)
        r = self._row(client_id)
        n = int(self._index[f"n_{split}"][r])
        shape = self.sample_shape
        dt = dtypes.DTYPES[self.dtype]
        if n == 0:
            return np.empty((0, *shape), dt), np.empty((0,), np.int64)
        off = int(self._index[f"{split}_offset"][r])
        sf = self._split_file(split)
        starts = sf.starts()
        b = int(np.searchsorted(starts, off, side="right")) - 1
        xs, ys = sf.batch(b)
        lo = off - int(starts[b])
        width = dtypes.row_bytes(shape, self.dtype)
        x = xs[lo * width:(lo + n) * width]
        if dt != np.uint8:
            x = x.view(dt)
        return x.reshape(n, *shape), ys[lo:lo + n]

    def __repr__(self) -> str:
        return f"PartitionStore({self.path!r})"


def close_all() -> None:
    """Drop this process's cached file maps (tests; long-lived processes switching stores)."""
    _OPEN.clear()
