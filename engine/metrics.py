"""Per-client metric rows in Parquet, and the summaries `simfed metrics` prints.

Rows are written under RUN_DIR/metrics/ as one file per round and kind as soon as they exist
(each file written to a temporary name and renamed), so
`polars.scan_parquet(run_dir / "metrics" / "*.parquet")` works during and after a run.

The server's scalars of each training round (what `Algorithm.finish` returns, keyed
"phase.name", e.g. PeFLL's collapse gauge "model.model_spread") go to
RUN_DIR/metrics/rounds/rNNNNNN.parquet as long rows (run, round, stat, value); `load_rounds`
gives one row per round and one column per stat.

With a [system] table (engine/system.py) every train row also carries the client's virtual clock:
`virtual_start` and `virtual_seconds` of its phase, its `outcome` (completed, partial, dropped,
straggler) and, in asynchronous rounds, its `staleness`; each round's virtual end time is the
round stat `virtual_time`. Without [system] these columns are null. Files written before these
columns existed read with them null (`CLOCK`).
"""

from __future__ import annotations

import math
import os
import re
from pathlib import Path

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

from simfed.core.errors import SimfedError

SCHEMA = pa.schema([
    ("run", pa.string()), ("round", pa.int32()), ("client_id", pa.int64()), ("cohort", pa.string()),
    ("split", pa.string()), ("phase", pa.string()), ("n", pa.int64()), ("loss", pa.float64()),
    ("accuracy", pa.float64()), ("seconds", pa.float64()), ("bytes_up", pa.int64()),
    ("bytes_down", pa.int64()), ("dropped", pa.bool_()), ("node_id", pa.string()), ("worker", pa.int32()),
    ("virtual_start", pa.float64()), ("virtual_seconds", pa.float64()), ("outcome", pa.string()),
    ("staleness", pa.int32()),
])
CLOCK = ("virtual_start", "virtual_seconds", "outcome", "staleness")  # may be absent from older files
_FILE = re.compile(r"^r(\d+)-.*\.parquet$")


class MetricsWriter:
    def __init__(self, run_dir: str | os.PathLike, run: str):
        self.dir = Path(run_dir) / "metrics"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.run = run

    def write(self, rows: list[dict], round: int, kind: str) -> Path | None:
        if not rows:
            return None
        cols = {f.name: [r.get(f.name) for r in rows] for f in SCHEMA}
        cols["run"] = [self.run] * len(rows)
        table = pa.table(cols, schema=SCHEMA)
        path = self.dir / f"r{round:06d}-{kind}.parquet"
        tmp = self.dir / f".{path.name}.tmp"
        pq.write_table(table, tmp)
        os.replace(tmp, path)
        return path

    def write_rounds(self, stats: dict[str, float], round: int) -> Path | None:
        """The server's scalars of one training round (long format: stats differ between methods)."""
        if not stats:
            return None
        keys = sorted(stats)
        table = pa.table({"run": [self.run] * len(keys), "round": pa.array([round] * len(keys), pa.int32()),
                          "stat": keys, "value": pa.array([float(stats[k]) for k in keys], pa.float64())})
        folder = self.dir / "rounds"
        folder.mkdir(exist_ok=True)
        path = folder / f"r{round:06d}.parquet"
        tmp = folder / f".{path.name}.tmp"
        pq.write_table(table, tmp)
        os.replace(tmp, path)
        return path

    def truncate_after(self, round: int) -> None:
        """Remove files of rounds > `round` (they are rewritten when a resumed run gets there)."""
        for path in list(self.dir.glob("r*.parquet")) + list(self.dir.glob("rounds/r*.parquet")):
            m = _FILE.match(path.name)
            if m and int(m.group(1)) > round:
                path.unlink()


def check_file(path: str | os.PathLike) -> None:
    """A metrics file is a regular Parquet file with SCHEMA's columns (reads only the footer)."""
    from simfed.core.safeio import regular_file

    regular_file(path, "metrics file")
    try:
        schema = pq.read_schema(path)
    except (pa.ArrowException, OSError) as exc:
        raise SimfedError(f"{path}: not a readable Parquet file ({type(exc).__name__}); the run directory "
                          "is damaged: delete the file (its round is lost) or restore it") from None
    for f in SCHEMA:
        if f.name in CLOCK and f.name not in schema.names:
            continue
        if f.name not in schema.names or not schema.field(f.name).type.equals(f.type):
            raise SimfedError(f"{path}: column {f.name!r} is missing or not {f.type}; not a simfed metrics "
                              "file: delete or restore it")


def read(path: str | os.PathLike) -> pl.DataFrame:
    check_file(path)
    present = pq.read_schema(path).names
    try:
        df = pl.read_parquet(path, columns=[n for n in SCHEMA.names if n in present])
    except Exception as exc:  # polars raises several types for corrupt pages
        raise SimfedError(f"{path}: cannot read metrics ({type(exc).__name__}); delete or restore the "
                          "file") from None
    if df.width < len(SCHEMA):
        empty = pl.from_arrow(SCHEMA.empty_table())
        df = df.with_columns(pl.lit(None, dtype=empty.schema[n]).alias(n) for n in CLOCK if n not in df.columns)
    return df.select(SCHEMA.names)


def files(run_dir: str | os.PathLike, upto: int | None = None) -> list[Path]:
    """The run's metrics files in round order (those of rounds <= `upto` when given)."""
    out = []
    for p in sorted((Path(run_dir) / "metrics").glob("r*.parquet")):
        m = _FILE.match(p.name)
        if m and (upto is None or int(m.group(1)) <= upto):
            out.append(p)
    return out


def load(run_dir: str | os.PathLike) -> pl.DataFrame:
    found = files(run_dir)
    if not found:
        return pl.DataFrame(schema=pl.Schema(pl.from_arrow(SCHEMA.empty_table()).schema))
    return pl.concat([read(f) for f in found], how="vertical")


def _read_stats(path: Path) -> pl.DataFrame:
    """A per-round server-statistics file (long rows: run, round, stat, value), not a client-metrics one."""
    from simfed.core.safeio import regular_file

    regular_file(path, "round statistics file")
    try:
        return pl.read_parquet(path, columns=["round", "stat", "value"])
    except Exception as exc:  # polars raises several types for corrupt or foreign files
        raise SimfedError(f"{path}: cannot read round statistics ({type(exc).__name__}); delete or restore the "
                          "file") from None


def load_rounds(run_dir: str | os.PathLike) -> pl.DataFrame:
    """The server's per-round scalars: one row per training round, one column per stat."""
    files = sorted((Path(run_dir) / "metrics" / "rounds").glob("r*.parquet"))
    if not files:
        return pl.DataFrame({"round": []}, schema={"round": pl.Int32})
    long = pl.concat([_read_stats(f) for f in files], how="vertical")
    return long.pivot(on="stat", index="round", values="value").sort("round")


def summarize(df: pl.DataFrame, split: str = "test", round: int | None = None) -> pl.DataFrame:
    """Per cohort at one eval round (default: the last): client-mean and sample-weighted accuracy,
    std, 10th percentile, mean of the worst 10% of clients, best client."""
    ev = df.filter((pl.col("split") == split) & ~pl.col("dropped"))
    if ev.height == 0:
        return pl.DataFrame()
    r = int(ev["round"].max()) if round is None else round
    ev = ev.filter(pl.col("round") == r)
    out = []
    for cohort in ("seen", "unseen"):
        c = ev.filter(pl.col("cohort") == cohort).sort("accuracy")
        if c.height == 0:
            continue
        k = max(1, math.ceil(0.1 * c.height))
        acc = c["accuracy"]
        out.append({
            "round": r, "cohort": cohort, "split": split, "clients": c.height, "samples": int(c["n"].sum()),
            "acc_mean": float(acc.mean()),
            "acc_weighted": float((c["accuracy"] * c["n"]).sum() / max(int(c["n"].sum()), 1)),
            "acc_std": float(acc.std(ddof=0)), "acc_p10": float(acc.quantile(0.1, interpolation="linear")),
            "acc_worst10": float(acc.head(k).mean()), "acc_best": float(acc.max()),
            "loss_mean": float(c["loss"].mean()),
        })
    return pl.DataFrame(out)


def eval_rounds(df: pl.DataFrame, split: str = "test") -> list[int]:
    """The rounds that have evaluation rows of `split`, ascending."""
    ev = df.filter((pl.col("split") == split) & ~pl.col("dropped"))
    return sorted(int(r) for r in ev["round"].unique().to_list())


def curve(df: pl.DataFrame) -> pl.DataFrame:
    """Learning curve: one row per evaluation round, split and cohort with the client-mean accuracy
    and loss, their 10th/90th percentiles over clients, and the sample-weighted accuracy."""
    ev = df.filter(pl.col("split").is_in(["val", "test"]) & ~pl.col("dropped"))
    if ev.height == 0:
        return pl.DataFrame()
    q = {"interpolation": "linear"}
    return (ev.group_by("round", "split", "cohort")
            .agg(pl.len().alias("clients"),
                 pl.col("accuracy").mean().alias("acc_mean"),
                 pl.col("accuracy").quantile(0.1, **q).alias("acc_p10"),
                 pl.col("accuracy").quantile(0.9, **q).alias("acc_p90"),
                 ((pl.col("accuracy") * pl.col("n")).sum() / pl.col("n").sum().clip(1)).alias("acc_weighted"),
                 pl.col("loss").mean().alias("loss_mean"),
                 pl.col("loss").quantile(0.1, **q).alias("loss_p10"),
                 pl.col("loss").quantile(0.9, **q).alias("loss_p90"))
            .sort("split", "cohort", "round"))


def train_curve(df: pl.DataFrame) -> pl.DataFrame:
    """Training loss per round: the client-mean of the mean local training loss each client
    reported (rows of methods without a loss, and dropped updates, are left out of the mean)."""
    tr = df.filter(pl.col("split") == "train")
    if tr.height == 0:
        return pl.DataFrame()
    ok = ~pl.col("dropped") & pl.col("loss").is_not_null()
    return (tr.group_by("round")
            .agg(pl.col("client_id").n_unique().alias("clients"),
                 pl.col("dropped").sum().alias("dropped"),
                 pl.col("loss").filter(ok).mean().alias("loss_mean"),
                 pl.col("loss").filter(ok).quantile(0.1, interpolation="linear").alias("loss_p10"),
                 pl.col("loss").filter(ok).quantile(0.9, interpolation="linear").alias("loss_p90"),
                 pl.col("seconds").sum().alias("client_seconds"))
            .sort("round"))


def with_virtual_time(table: pl.DataFrame, rounds: pl.DataFrame) -> pl.DataFrame:
    """`table` (rows keyed by round: `curve`, `train_curve`) with each round's virtual end time
    `virtual_time` (the round stat of a run with a [system] clock; unchanged without one)."""
    if table.height == 0 or "virtual_time" not in rounds.columns:
        return table
    times = rounds.select(pl.col("round").cast(table.schema["round"]), "virtual_time")
    order = [c for c in ("split", "cohort", "round") if c in table.columns]
    return table.join(times, on="round", how="left").sort(order)


def train_totals(df: pl.DataFrame, up_to: int | None = None) -> dict:
    """Totals over the train rows (of rounds <= `up_to` when given)."""
    tr = df.filter(pl.col("split") == "train")
    if up_to is not None:
        tr = tr.filter(pl.col("round") <= up_to)
    if tr.height == 0:
        return {"rounds": 0, "client_updates": 0, "dropped": 0, "bytes_up": 0, "bytes_down": 0}
    return {"rounds": int(tr["round"].max()), "client_updates": tr.height, "dropped": int(tr["dropped"].sum()),
            "samples": int(tr["n"].sum()), "seconds": float(tr["seconds"].sum()),
            "bytes_up": int(tr["bytes_up"].sum()), "bytes_down": int(tr["bytes_down"].sum())}
