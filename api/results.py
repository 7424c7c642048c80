"""Reading a run directory: `simfed.load_run(RUN_DIR)` and its `Run` (config, status, per-client
metrics, summaries and curves as polars DataFrames), read on demand so a running run shows its
latest rounds. Ours; the metric files' layout is engine/metrics.py's."""

from __future__ import annotations

import os
from pathlib import Path

from simfed.core.errors import SimfedError


def saved_config(run_dir: Path, missing: str) -> dict:
    """A run directory's config.json (the resolved experiment); `missing` is the message when absent."""
    from simfed.core.safeio import load_json

    saved = run_dir / "config.json"
    if not os.path.lexists(saved):
        raise SimfedError(missing)
    doc = load_json(saved, 16 << 20, "saved config")
    if not isinstance(doc, dict):
        raise SimfedError(f"{saved}: not a simfed config (expected a JSON object); the run directory is damaged")
    return doc


def load_run(run_dir: str | os.PathLike) -> "Run":
    """A run directory (finished, running or interrupted) to read; SimfedError if it is not one."""
    path = Path(run_dir)
    if not (path / "metrics").is_dir():
        raise SimfedError(_not_a_run(path))
    return Run(path)


def _not_a_run(path: Path) -> str:
    """Why `path` is not a run directory, and what to pass instead."""
    if not path.exists():
        return f"{path}: no such directory; pass a run directory `simfed launch` printed"
    if not path.is_dir():
        return f"{path}: not a directory; pass a run directory `simfed launch` printed"
    if (path / "sweep.json").is_file():
        return (f"{path}: a sweep directory, not a run; see `simfed compare {path}`, or pass one of its runs "
                f"({path}/trials/ID)")
    if (path / "manifest.json").is_file():
        return f"{path}: a partition store, not a run; see `simfed info {path}`"
    return f"{path}: not a run directory (no metrics/ in it); pass a run directory `simfed launch` printed"


class Run:
    """A run directory, read on demand: nothing is cached, so a running run shows its latest rounds."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"Run({str(self.path)!r})"

    @property
    def config(self) -> dict:
        """The resolved experiment (config.json): every key of every table, defaults included."""
        return saved_config(self.path, f"{self.path}: no config.json; pass a directory printed by `simfed launch`")

    @property
    def status(self) -> dict | None:
        """status.json: state (running, finished, interrupted, failed), completed rounds, counters."""
        from simfed.engine import rundir

        return rundir.read_status(self.path)

    def metrics(self):
        """Every per-client metric row (polars DataFrame): train rows per round and phase, eval rows
        per evaluated round and split. The same as polars.scan_parquet(path/"metrics/*.parquet")."""
        from simfed.engine import metrics

        return metrics.load(self.path)

    def summary(self, split: str = "test", round: int | None = None):
        """Per cohort at one evaluation round (default: the last): the table `simfed metrics` prints."""
        from simfed.engine import metrics

        return metrics.summarize(self.metrics(), split=split, round=round)

    def curve(self):
        """Per evaluation round, split and cohort: client-mean accuracy and loss with their 10th/90th
        percentiles, and the sample-weighted accuracy (`simfed metrics --curve`); with a [system]
        clock also the round's virtual end time `virtual_time`."""
        from simfed.engine import metrics

        return metrics.with_virtual_time(metrics.curve(self.metrics()), self.rounds())

    def train_curve(self):
        """Per training round: the client-mean training loss and its percentiles, dropped updates
        (and `virtual_time` with a [system] clock)."""
        from simfed.engine import metrics

        return metrics.with_virtual_time(metrics.train_curve(self.metrics()), self.rounds())

    def rounds(self):
        """The server's statistics per training round: one row per round, one column per stat."""
        from simfed.engine import metrics

        return metrics.load_rounds(self.path)
