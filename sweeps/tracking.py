"""Experiment tracking of a sweep through Ray Tune's logger callbacks: one tracked run per trial.

Ours. Each trial reports its scalars every round (simfed.sweeps.sweep: `train/loss`, and after an
evaluation `test/acc_seen`, `val/p10_unseen`, ..., the names simfed.engine.tracking uses for one
run), with `timesteps_total` = the round so the trackers' step is the round. Tune's own callbacks
log them; the subclasses below only say where and add what a trial's record lacks:

- TensorBoard (Tune's TBXLoggerCallback): the event files go to the trial's run directory,
  SWEEP/trials/ID/tensorboard, with the trial's configuration as text. Tune names the scalars
  `ray/tune/<name>`.
- MLflow (Tune's MLflowLoggerCallback): one MLflow run per trial, named by the trial id, in the
  experiment named after the sweep directory, at `[run] mlflow_uri` or by default a file store
  in SWEEP/mlruns; the trial's resolved configuration as parameters and, when it finishes, its
  plot as an artifact.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

from simfed.engine import tracking

Artifacts = Callable[[Path], list[Path]]


def callbacks(sweep_dir: Path, configs: dict[str, dict], trackers: tuple, mlflow_uri: str,
              artifacts: Artifacts | None = None) -> list:
    """The Tune callbacks for `trackers` ("tensorboard", "mlflow"); `configs`: trial id -> its
    resolved experiment (config.json), `artifacts(run_dir)`: the files to attach to a finished trial."""
    tracking.require(trackers)
    out = []
    if "tensorboard" in trackers:
        out.append(_tensorboard(sweep_dir, configs))
    if "mlflow" in trackers:
        out.append(_mlflow(sweep_dir, configs, mlflow_uri, artifacts))
    return out


def _tensorboard(sweep_dir: Path, configs: dict[str, dict]):
    from ray.tune.logger import TBXLoggerCallback

    class TrialTensorBoard(TBXLoggerCallback):
        def log_trial_start(self, trial):
            if trial in self._trial_writer:
                self._trial_writer[trial].close()
            tid = trial.config["trial"]
            writer = self._summary_writer_cls(str(sweep_dir / "trials" / tid / tracking.TB_DIR), flush_secs=30)
            params = tracking.hyperparameters(configs[tid])
            writer.add_text("config", "\n".join(f"    {k} = {json.dumps(v)}" for k, v in params.items()))
            self._trial_writer[trial] = writer
            self._trial_result[trial] = {}

    return TrialTensorBoard()


def _mlflow(sweep_dir: Path, configs: dict[str, dict], mlflow_uri: str, artifacts: Artifacts | None):
    from ray.air.integrations.mlflow import MLflowLoggerCallback

    class TrialMLflow(MLflowLoggerCallback):
        def log_trial_start(self, trial):
            super().log_trial_start(trial)
            params = tracking.hyperparameters(configs[trial.config["trial"]])
            self.mlflow_util.log_params(run_id=self._trial_runs[trial], params_to_log=params)

        def log_trial_end(self, trial, failed: bool = False):
            run_dir = sweep_dir / "trials" / trial.config["trial"]
            if artifacts is not None and not failed:
                from mlflow.tracking import MlflowClient

                client = MlflowClient(tracking_uri=self.tracking_uri)
                for path in artifacts(run_dir):
                    client.log_artifact(self._trial_runs[trial], str(path))
            super().log_trial_end(trial, failed)

    return TrialMLflow(tracking_uri=tracking.mlflow_store(mlflow_uri, sweep_dir), experiment_name=sweep_dir.name)
