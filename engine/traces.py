"""Client traces for the virtual clock: when each client is online, and how fast it is.

Two Parquet layouts, in the spirit of FedScale's device traces (Lai et al., ICML 2022, arXiv
2105.11367: per-device compute and bandwidth from AIBench and MobiPerf, and the online intervals
of 136k users over a week); the files and the code are ours.

- availability: one row per online interval, columns `client_id` (integer), `start` and `end`
  (virtual seconds, finite, 0 <= start < end). A client's intervals are listed in increasing
  order and do not overlap (end <= next start). A client without a row is never online.
- speed: one row per client, columns `client_id` (integer), `compute` (training samples per
  second), `up` and `down` (bytes per second), all finite and > 0. Every seen client of the
  store needs a row.

Both are checked when a run is checked, before any work, like a partition store: a file that is
not a readable Parquet table, a missing column, a client the store does not have, unsorted or
overlapping intervals, a non-positive speed: one line naming the file and what is wrong.

`write_availability` and `write_speeds` generate traces of these layouts (diurnal sessions and
lognormal devices, seeded) for tests, benchmarks and as examples of the layouts; real traces
(FedScale's, converted) go in the same layouts.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Iterable, Mapping

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from simfed.core.errors import SimfedError
from simfed.core.safeio import regular_file
from simfed.core.seeds import derive_seed

MAX_BYTES = 4 << 30
AVAILABILITY = ("client_id", "start", "end")
SPEED = ("client_id", "compute", "up", "down")


@dataclass(frozen=True)
class Intervals:
    """One client's online intervals, sorted and disjoint."""

    starts: np.ndarray
    ends: np.ndarray

    def online(self, t: float) -> bool:
        i = int(np.searchsorted(self.starts, t, side="right")) - 1
        return i >= 0 and t < self.ends[i]

    def online_until(self, t: float) -> float:
        """End of the interval holding t (t itself if offline at t)."""
        i = int(np.searchsorted(self.starts, t, side="right")) - 1
        return float(self.ends[i]) if i >= 0 and t < self.ends[i] else t

    def next_start(self, t: float) -> float | None:
        i = int(np.searchsorted(self.starts, t, side="right"))
        return float(self.starts[i]) if i < len(self.starts) else None


def _table(path: str, columns: tuple[str, ...], what: str) -> pa.Table:
    if regular_file(path, what) > MAX_BYTES:
        raise SimfedError(f"{path}: {what} is larger than {MAX_BYTES >> 30} GiB; split or thin it")
    try:
        table = pq.read_table(path)
    except (pa.ArrowException, OSError) as exc:
        raise SimfedError(f"{path}: {what} is not a readable Parquet file ({type(exc).__name__}); write it "
                          f"with columns {', '.join(columns)} (docs/system.md)") from None
    for name in columns:
        if name not in table.column_names:
            raise SimfedError(f"{path}: {what} has no column {name!r}; it needs {', '.join(columns)} "
                              "(docs/system.md)")
        kind = table.schema.field(name).type
        if not (pa.types.is_integer(kind) or (name != "client_id" and pa.types.is_floating(kind))):
            raise SimfedError(f"{path}: column {name!r} of the {what} is {kind}, not a number")
        if table.column(name).null_count:
            raise SimfedError(f"{path}: column {name!r} of the {what} has empty (null) values")
    return table


def _ids(path: str, table: pa.Table, known: Iterable[int], what: str) -> np.ndarray:
    ids = table.column("client_id").to_numpy().astype(np.int64)
    unknown = np.setdiff1d(ids, np.fromiter(known, dtype=np.int64))
    if unknown.size:
        raise SimfedError(f"{path}: the {what} names client {int(unknown[0])}, which the store does not have "
                          f"({unknown.size} unknown client id(s)); use the store's client ids (simfed partition "
                          "info)")
    return ids


def _finite(path: str, values: np.ndarray, column: str, what: str) -> np.ndarray:
    values = values.astype(np.float64)
    bad = ~np.isfinite(values)
    if bad.any():
        raise SimfedError(f"{path}: {what} column {column!r} holds a non-finite value at row {int(np.argmax(bad))}")
    return values


def read_availability(path: str, known: Iterable[int]) -> dict[int, Intervals]:
    """{client id: its online intervals} from an availability trace, checked."""
    what = "availability trace"
    table = _table(path, AVAILABILITY, what)
    ids = _ids(path, table, known, what)
    starts = _finite(path, table.column("start").to_numpy(), "start", what)
    ends = _finite(path, table.column("end").to_numpy(), "end", what)
    bad = (starts < 0) | (ends <= starts)
    if bad.any():
        i = int(np.argmax(bad))
        raise SimfedError(f"{path}: row {i} (client {ids[i]}) is the interval [{starts[i]:g}, {ends[i]:g}); an "
                          "online interval needs 0 <= start < end")
    out: dict[int, Intervals] = {}
    order = np.argsort(ids, kind="stable")  # each client's rows, in file order
    bounds = np.flatnonzero(np.diff(ids[order])) + 1
    for rows in np.split(order, bounds):
        if not rows.size:
            continue
        s, e, cid = starts[rows], ends[rows], int(ids[rows[0]])
        if (np.diff(s) < 0).any():
            raise SimfedError(f"{path}: the intervals of client {cid} are not sorted by start; list each "
                              "client's intervals in increasing order")
        if (s[1:] < e[:-1]).any():
            j = int(np.argmax(s[1:] < e[:-1]))
            raise SimfedError(f"{path}: the intervals of client {cid} overlap ([{s[j]:g}, {e[j]:g}) and "
                              f"[{s[j + 1]:g}, {e[j + 1]:g})); merge them")
        out[cid] = Intervals(s, e)
    return out


def read_speeds(path: str, seen: Iterable[int]) -> dict[int, tuple[float, float, float]]:
    """{client id: (compute, down, up)} from a speed trace, checked; every seen client needs a row."""
    what = "speed trace"
    table = _table(path, SPEED, what)
    seen = list(seen)
    ids = _ids(path, table, seen, what)
    cols = {c: _finite(path, table.column(c).to_numpy(), c, what) for c in SPEED[1:]}
    for c, values in cols.items():
        if (values <= 0).any():
            i = int(np.argmax(values <= 0))
            raise SimfedError(f"{path}: client {ids[i]} has {c} = {values[i]:g}; a speed must be > 0 "
                              f"({'samples' if c == 'compute' else 'bytes'} per second)")
    uniq, counts = np.unique(ids, return_counts=True)
    if (counts > 1).any():
        raise SimfedError(f"{path}: client {int(uniq[np.argmax(counts > 1)])} has several rows in the speed trace; "
                          "give one row per client")
    missing = sorted(set(seen) - set(ids.tolist()))
    if missing:
        raise SimfedError(f"{path}: the speed trace has no row for client {missing[0]} ({len(missing)} seen "
                          "client(s) missing); give every seen client a row")
    return {int(c): (float(k), float(d), float(u))
            for c, k, d, u in zip(ids, cols["compute"], cols["down"], cols["up"])}


def _write(table: pa.Table, path: str | os.PathLike) -> str:
    path = os.fspath(path)
    tmp = os.path.join(os.path.dirname(path) or ".", f".{os.path.basename(path)}.tmp")
    pq.write_table(table, tmp)
    os.replace(tmp, path)
    return path


def write_availability(path: str | os.PathLike, client_ids: Iterable[int], seed: int, *, hours: float = 24.0,
                       sessions: int = 8, mean_session: float = 1800.0, period: float = 86400.0,
                       low: float = 0.2) -> str:
    """An availability trace: per client and day, `sessions` online sessions whose starts follow a
    diurnal density (relative weight `low` at virtual midnight, 1 at noon) and whose lengths are
    exponential with mean `mean_session` seconds (at least a minute); overlapping sessions merged,
    cut at `hours`."""
    rows: list[tuple[int, float, float]] = []
    for cid in client_ids:
        rng = np.random.default_rng(derive_seed(seed, "trace-availability", int(cid)))
        spans = []
        for day in range(math.ceil(hours * 3600.0 / period)):
            starts: list[float] = []
            while len(starts) < sessions:  # rejection sampling from the diurnal density
                t, u = rng.uniform(0.0, period), rng.uniform()
                if u < low + (1.0 - low) * 0.5 * (1.0 - math.cos(2.0 * math.pi * t / period)):
                    starts.append(day * period + t)
            spans += [(a, a + 60.0 + float(rng.exponential(mean_session))) for a in starts]
        for a, b in _merged(sorted(spans)):
            rows.append((int(cid), a, min(b, hours * 3600.0)))
    rows = [r for r in rows if r[1] < r[2]]
    table = pa.table({"client_id": pa.array([r[0] for r in rows], pa.int64()),
                      "start": pa.array([r[1] for r in rows], pa.float64()),
                      "end": pa.array([r[2] for r in rows], pa.float64())})
    return _write(table, path)


def _merged(spans: list[tuple[float, float]]) -> list[tuple[float, float]]:
    out: list[tuple[float, float]] = []
    for a, b in spans:
        if out and a <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], b))
        else:
            out.append((a, b))
    return out


def write_speeds(path: str | os.PathLike, client_ids: Iterable[int], seed: int,
                 medians: Mapping[str, float] | None = None, spread: float = 0.8) -> str:
    """A speed trace: lognormal compute, up and down per client around `medians` (default a phone
    training LeNet: 100 samples/s, 1.25 MB/s down, 250 kB/s up) with log-spread `spread`."""
    med = {"compute": 100.0, "down": 1.25e6, "up": 2.5e5, **(medians or {})}
    ids = [int(c) for c in client_ids]
    cols: dict[str, list[float]] = {c: [] for c in SPEED[1:]}
    for cid in ids:
        rng = np.random.default_rng(derive_seed(seed, "trace-speed", cid))
        for c in SPEED[1:]:
            cols[c].append(float(med[c] * math.exp(spread * rng.standard_normal())))
    table = pa.table({"client_id": pa.array(ids, pa.int64()),
                      **{c: pa.array(v, pa.float64()) for c, v in cols.items()}})
    return _write(table, path)
