"""Experiment tracking: a run's scalars, configuration and plot in TensorBoard and/or MLflow.

`[run] track = ["tensorboard", "mlflow"]` turns it on (ours; no paper behind it). A tracker is an
event listener beside the progress display; it never changes what a run computes.

- Scalars per training round (step = the round): `train/loss` (client-mean training loss), and
  `virtual_time` / `epsilon` when the round event carries them (a virtual clock, a privacy
  accountant). Per evaluated round: `test/acc_seen`, `test/acc_unseen`, `test/p10_seen`,
  `test/p10_unseen` and the same for `val/` (client-mean accuracy and its 10th percentile), read
  from the round's metrics file, the run's record of truth.
- The resolved configuration as hyperparameters (`data.path`, `run.rounds`, `algorithm.lr`, ...).
- At the end, the learning-curve plot (what `simfed plot` draws) as an artifact.

TensorBoard files go to RUN_DIR/tensorboard, written with tensorboardX (the writer Ray Tune's
TensorBoard callback uses); MLflow runs go to `[run] mlflow_uri`, by default a file store in
RUN_DIR/mlruns. A resumed run continues its MLflow run (its id is kept in RUN_DIR/tracking.json)
and tells TensorBoard to drop the steps after the checkpoint. Sweeps track through Ray Tune's
logger callbacks (simfed.sweeps.sweep), one tracked run per trial, with the same scalar names.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Any, Callable, Iterator

from simfed.core.errors import SimfedError

TB_DIR = "tensorboard"
MLRUNS = "mlruns"
EXPERIMENT = "simfed"
RECORD = "tracking.json"
INSTALL = {"tensorboard": "pip install 'simfed[tensorboard]'", "mlflow": "pip install 'simfed[mlflow]'"}
Artifacts = Callable[[Path], list[Path]]


def round_scalars(event: dict) -> dict[str, float]:
    """The scalars of a "round" event: the training loss, and virtual time and epsilon if present."""
    out = {}
    for key, name in (("train_loss", "train/loss"), ("virtual_time", "virtual_time"), ("epsilon", "epsilon")):
        if event.get(key) is not None:
            out[name] = float(event[key])
    return out


def eval_scalars(run_dir: str | os.PathLike, round: int) -> dict[str, float]:
    """Per split (test, val) and cohort: the client-mean accuracy and its 10th percentile of round
    `round`'s evaluation, read from its metrics file (empty when the round was not evaluated)."""
    from simfed.engine import metrics

    path = Path(run_dir) / "metrics" / f"r{round:06d}-eval.parquet"
    if not path.exists():
        return {}
    df = metrics.read(path)
    out = {}
    for split in ("test", "val"):
        for row in metrics.summarize(df, split=split).to_dicts():
            out[f"{split}/acc_{row['cohort']}"] = float(row["acc_mean"])
            out[f"{split}/p10_{row['cohort']}"] = float(row["acc_p10"])
    return out


def hyperparameters(config: dict) -> dict[str, Any]:
    """A resolved config ({table: {key: value}}) flattened to "table.key" -> a scalar or a string."""
    out: dict[str, Any] = {}
    for table, keys in config.items():
        for key, value in (keys.items() if isinstance(keys, dict) else [("", keys)]):
            name = f"{table}.{key}" if key else table
            out[name] = value if isinstance(value, (bool, int, float, str)) else json.dumps(value)
    return out


def mlflow_store(uri: str, base: Path) -> str:
    """The MLflow tracking URI: `uri`, or a file store in base/mlruns. MLflow keeps its file store
    in maintenance mode behind an opt-in; simfed opts in for the local default only."""
    if uri:
        return uri
    os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    return (base / MLRUNS).absolute().as_uri()


def require(trackers: tuple) -> None:
    """SimfedError (one line, with the install command) when a tracker's package is missing."""
    import importlib.util

    for name, module in (("tensorboard", "tensorboardX"), ("mlflow", "mlflow")):
        if name in trackers and importlib.util.find_spec(module) is None:
            raise SimfedError(f"[run] track = {list(trackers)}: {name} tracking needs {module}: {INSTALL[name]}")


class _TensorBoard:
    def __init__(self, run_dir: Path, config: dict, start_round: int):
        from tensorboardX import SummaryWriter

        # purge_step: a resumed run's steps after its checkpoint were logged before the interruption
        # and are logged again; TensorBoard drops the older ones.
        self.writer = SummaryWriter(str(run_dir / TB_DIR), purge_step=start_round + 1 if start_round else None)
        self.config = config

    def scalars(self, values: dict[str, float], step: int) -> None:
        for name, value in values.items():
            self.writer.add_scalar(name, value, global_step=step)

    def start(self) -> None:
        from tensorboardX.summary import hparams

        metrics = {f"{s}/acc_{c}": 0.0 for s in ("test", "val") for c in ("seen", "unseen")}
        for summary in hparams(hyperparameters(self.config), metrics):
            self.writer.file_writer.add_summary(summary)
        text = "\n".join(f"    {k} = {json.dumps(v)}" for k, v in hyperparameters(self.config).items())
        self.writer.add_text("config", text)

    def artifact(self, path: Path, step: int) -> None:
        if path.suffix.lower() != ".png":
            return
        from tensorboardX.proto.summary_pb2 import Summary

        data = path.read_bytes()
        width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")  # IHDR
        image = Summary.Image(height=height, width=width, colorspace=4, encoded_image_string=data)
        self.writer.file_writer.add_summary(Summary(value=[Summary.Value(tag=path.stem, image=image)]), step)

    def close(self, status: str) -> None:
        self.writer.close()


class _MLflow:
    def __init__(self, run_dir: Path, config: dict, uri: str, start_round: int):
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient(tracking_uri=mlflow_store(uri, run_dir))
        record_path = run_dir / RECORD
        record = _read_record(record_path)
        self.run_id = record.get("mlflow_run_id") if start_round else None
        if self.run_id is None:
            found = self.client.get_experiment_by_name(EXPERIMENT)
            exp_id = found.experiment_id if found else self.client.create_experiment(EXPERIMENT)
            run = self.client.create_run(exp_id, run_name=run_dir.name, tags={"simfed.run_dir": str(run_dir.absolute())})
            self.run_id = run.info.run_id
            _write_record(record_path, {**record, "mlflow_run_id": self.run_id})
        self.config = config
        self.new = start_round == 0

    def start(self) -> None:
        if self.new:  # a resumed run logged its parameters when it began (MLflow refuses changing them)
            from mlflow.entities import Param

            params = [Param(k, str(v)) for k, v in hyperparameters(self.config).items()]
            for i in range(0, len(params), 100):  # MLflow's batch limit
                self.client.log_batch(self.run_id, params=params[i:i + 100])

    def scalars(self, values: dict[str, float], step: int) -> None:
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, v, now, step) for k, v in values.items()])

    def artifact(self, path: Path, step: int) -> None:
        self.client.log_artifact(self.run_id, str(path))

    def close(self, status: str) -> None:
        self.client.set_terminated(self.run_id, status)


def _read_record(path: Path) -> dict:
    try:
        record = json.loads(path.read_text())
        return record if isinstance(record, dict) else {}
    except (OSError, ValueError):
        return {}


def _write_record(path: Path, record: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(record, indent=2))
    os.replace(tmp, path)


class Trackers:
    """The event listener that feeds every tracker of a run."""

    def __init__(self, run_dir: Path, sinks: list, artifacts: Artifacts | None):
        self.run_dir, self.sinks, self.artifacts = run_dir, sinks, artifacts
        self.last_round = 0

    def __call__(self, event: dict) -> None:
        if not self.sinks:
            return
        kind = event["type"]
        if kind == "round":
            self._log(round_scalars(event), event["round"])
            self.last_round = event["round"]
        elif kind == "eval":
            self._log(eval_scalars(self.run_dir, event["round"]), event["round"])

    def _log(self, values: dict[str, float], step: int) -> None:
        if values:
            for sink in self.sinks:
                sink.scalars(values, step)

    def finish(self, status: str) -> None:
        """Attach the artifacts (a finished run only) and close every tracker with MLflow's run status:
        FINISHED, KILLED (interrupted: it can be resumed) or FAILED."""
        paths = self.artifacts(self.run_dir) if self.artifacts and self.sinks and status == "FINISHED" else []
        for sink in self.sinks:
            for path in paths:
                sink.artifact(path, self.last_round)
            sink.close(status)


@contextlib.contextmanager
def open_trackers(exp, run_dir: str | os.PathLike, start_round: int = 0,
                  artifacts: Artifacts | None = None) -> Iterator[Callable[[dict], None]]:
    """The trackers `exp.run.track` names, open for the run in `run_dir` that starts after round
    `start_round` (a resume's checkpoint); a listener for its events. `artifacts(run_dir)` gives the
    files to attach at the end (the plot). A run that raises attaches nothing."""
    from simfed.engine import config as expcfg

    run_dir = Path(run_dir)
    trackers = exp.run.track
    require(trackers)
    config = expcfg.to_dict(exp)
    sinks: list = []
    if "tensorboard" in trackers:
        sinks.append(_TensorBoard(run_dir, config, start_round))
    if "mlflow" in trackers:
        sinks.append(_MLflow(run_dir, config, exp.run.mlflow_uri, start_round))
    for sink in sinks:
        sink.start()
    listener = Trackers(run_dir, sinks, artifacts)
    try:
        yield listener
    except KeyboardInterrupt:
        listener.finish("KILLED")
        raise
    except BaseException:
        listener.finish("FAILED")
        raise
    listener.finish("FINISHED")
