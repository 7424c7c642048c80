"""A researcher's second week through the real `simfed` command (subprocesses): batch-job progress
(one plain line per round when stderr is not a terminal), experiment tracking read back with
TensorBoard's and MLflow's own readers, commands that answer without importing torch or Ray, and the
messages of the "wrong or dangling text" list. About 30 s on an idle 2-core machine, most of it the
one tracked launch."""

from __future__ import annotations

import ast
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.cli.test_launch_cli import assert_user_error, simfed, write_exp

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def tracked(engine_store, tmp_path_factory):
    """One serial run of 3 rounds with both trackers, launched as a batch job would be (stderr a pipe)."""
    pytest.importorskip("tensorboardX", reason="tensorboardX is in the test extra")
    pytest.importorskip("mlflow", reason="mlflow-skinny is in the test extra")
    root = tmp_path_factory.mktemp("workflow")
    exp = write_exp(root, engine_store, run='track = ["tensorboard", "mlflow"]')
    proc = simfed("launch", str(exp), "--out", str(root / "run"), "--set", "run.rounds=3")
    assert proc.returncode == 0, proc.stderr
    return root / "run", proc


def test_batch_job_prints_one_plain_line_per_round(tracked):
    _, proc = tracked
    lines = proc.stderr.splitlines()
    rounds = [ln for ln in lines if re.match(r"round \d+/3 \|", ln)]
    assert [ln.split(" | ")[0] for ln in rounds] == ["round 1/3", "round 2/3", "round 3/3"]
    for ln in rounds:  # rate, training loss, accuracy (every round is evaluated here), elapsed, ETA
        assert re.search(r"\| [\d.]+ clients/s \| loss \d+\.\d{4} \| acc seen [\d.]+% / unseen [\d.]+% \| "
                         r"elapsed \d+:\d\d:\d\d \| ETA \d+:\d\d:\d\d$", ln), ln
    assert lines[0].startswith("1 worker(s) on 1 node(s)") and "each evaluation" in lines[0]
    assert "round 1 | evaluating 22 seen clients" in lines and "\x1b[" not in proc.stderr  # no terminal codes


def test_tensorboard_files_read_back_with_tensorboard(tracked):
    pytest.importorskip("tensorboard", reason="tensorboard is in the test extra")
    from tensorboard.backend.event_processing import event_accumulator

    run_dir, _ = tracked
    acc = event_accumulator.EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"images": 0})
    acc.Reload()
    tags = acc.Tags()
    assert {"train/loss", "test/acc_seen", "test/acc_unseen", "test/p10_seen", "val/acc_seen",
            "val/p10_unseen"} <= set(tags["scalars"])
    summary = json.loads(simfed("metrics", str(run_dir), "--json").stdout)
    seen = [e.value for e in acc.Scalars("test/acc_seen")]
    assert [e.step for e in acc.Scalars("test/acc_seen")] == [1, 2, 3]
    assert seen[-1] == pytest.approx(summary["cohorts"]["seen"]["acc_mean"], rel=1e-6)  # float32 in TensorBoard
    assert [e.step for e in acc.Scalars("train/loss")] == [1, 2, 3]
    assert tags["images"] == ["curves"] and "config/text_summary" in tags["tensors"]
    assert set(acc.PluginTagToContent("hparams")) >= {"_hparams_/experiment", "_hparams_/session_start_info"}


def test_mlflow_run_read_back_with_mlflow(tracked, monkeypatch):
    from mlflow.tracking import MlflowClient

    run_dir, _ = tracked
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    client = MlflowClient(tracking_uri=(run_dir / "mlruns").as_uri())
    run = client.get_run(json.loads((run_dir / "tracking.json").read_text())["mlflow_run_id"])
    assert run.info.status == "FINISHED" and run.info.run_name == "run"
    config = json.loads((run_dir / "config.json").read_text())
    assert run.data.params["algorithm.name"] == "fedavg" and run.data.params["run.rounds"] == "3"
    assert len(run.data.params) == sum(len(t) for t in config.values())
    history = client.get_metric_history(run.info.run_id, "test/acc_unseen")
    summary = json.loads(simfed("metrics", str(run_dir), "--json").stdout)
    assert [m.step for m in history] == [1, 2, 3]
    assert history[-1].value == summary["cohorts"]["unseen"]["acc_mean"]
    assert [a.path for a in client.list_artifacts(run.info.run_id)] == ["curves.png"]


def test_metrics_json_before_the_first_evaluation_still_answers(tracked, tmp_path):
    run_dir, _ = tracked
    copy = tmp_path / "killed"
    shutil.copytree(run_dir, copy)
    for f in (copy / "metrics").glob("r*-eval.parquet"):  # as if killed before its first evaluation
        f.unlink()
    proc = simfed("metrics", str(copy), "--json")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["rounds"] == [] and out["cohorts"] == {} and out["status"]["state"] == "finished"
    assert out["train"]["client_updates"] == 12


@pytest.mark.parametrize("args", [["--help"], ["algorithms"], ["algorithms", "pefll"], ["metrics", "RUN"],
                                  ["info", "STORE", "--no-verify"], ["compare", "MISSING"], ["--version"]])
def test_reading_commands_import_neither_torch_nor_ray(args, tracked, engine_store):
    run_dir, _ = tracked
    args = [str(run_dir) if a == "RUN" else engine_store if a == "STORE" else a for a in args]
    proc = subprocess.run([sys.executable, "-X", "importtime", "-m", "simfed.cli.main", *args],
                          capture_output=True, text=True, timeout=120)
    imported = {ln.split("|")[-1].strip() for ln in proc.stderr.splitlines() if ln.startswith("import time:")}
    assert not imported & {"torch", "ray"}, args


def test_version_and_messages(tracked, tmp_path, engine_store):
    run_dir, _ = tracked
    version = simfed("--version")
    assert version.returncode == 0 and re.fullmatch(r"simfed \S+\n", version.stdout)
    assert_user_error(simfed("metrics", str(tmp_path / "absent")), "no such directory")
    assert_user_error(simfed("info", str(run_dir)), "a run directory, not a partition store",
                      f"simfed metrics {run_dir}", f"simfed info {engine_store}")
    quoted = write_exp(tmp_path, engine_store)
    quoted.write_text(quoted.read_text().replace("rounds = 2", 'rounds = "3"'))
    assert_user_error(simfed("launch", str(quoted)), 'got the string "3" (in quotes)', "rounds = 3")
    misspelled = simfed("launch", str(write_exp(tmp_path, engine_store)), "--set", "algorithm.name=fedavgg")
    assert_user_error(misspelled, "unknown algorithm 'fedavgg' (did you mean 'fedavg'?)")  # and no note first
    assert_user_error(simfed("launch", str(write_exp(tmp_path, engine_store)), "--set", "run.roundz=3"),
                      "(did you mean 'rounds'?)")
    assert_user_error(simfed("launch", str(write_exp(tmp_path, engine_store)), "--set", 'run.track=["tensorbord"]'),
                      "(did you mean 'tensorboard'?)")
    assert "ray://" not in simfed("sweep", "--help").stdout
    assert "python -m pydoc simfed.algorithms.pefll" in simfed("algorithms", "pefll").stdout


def test_algorithms_read_from_source_equal_the_imported_methods():
    from simfed.algorithms import registry
    from simfed.cli import catalog, report_cmd

    # Other tests register extra methods at run time; only the built-ins are read from source.
    for name in sorted(registry.BUILTIN_NAMES):
        assert registry.BUILTIN_NAMES[name] == type(registry.get(name)).__module__.rsplit(".", 1)[1]
        imported = {k: v for k, v in report_cmd.describe(name).items() if k != "privacy"}  # listing leaves it out
        assert catalog.describe(name, f"simfed.algorithms.{registry.BUILTIN_NAMES[name]}") == imported


def test_module_docstrings_cite_nothing_outside_the_repository():
    from tests.test_docs import FORBIDDEN

    bad = []
    for folder in ("algorithms", "api", "cli", "core", "engine", "partitions", "sweeps"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            doc = ast.get_docstring(ast.parse(path.read_text())) or ""
            bad += [f"{path.relative_to(ROOT)}: {why}" for rx, why in FORBIDDEN if rx.search(doc)]
    assert not bad, bad


def test_sweep_plot_colours_cohorts_apart_and_one_round_axis():
    pytest.importorskip("matplotlib")
    from simfed import plots

    def series(label, rounds):
        ev = [{"round": r, "cohort": c, "acc_mean": 0.5, "acc_p10": 0.4, "acc_p90": 0.6, "loss_mean": 1.0,
               "loss_p10": 0.9, "loss_p90": 1.1} for r in rounds for c in ("seen", "unseen")]
        return {"label": label, "runs": [label], "band": "p10-p90", "eval": ev, "train": [], "last_round": rounds[-1],
                "last_accuracy": {"seen": [0.5], "unseen": [0.5]}}

    fig, plt = plots._figure([series("a", [2]), series("b", [2])], "test", "t")
    ax = fig.axes[0]
    lines = {ln.get_label(): ln.get_color() for ln in ax.get_lines()}
    assert set(lines) == {"a seen", "a unseen", "b seen", "b unseen"}
    assert len(set(lines.values())) == 4  # seen and unseen never share a colour
    assert ax.get_xlim() == (1.0, 3.0)  # one evaluated round: whole rounds either side, not 1.9 to 2.1
    plt.close(fig)


def test_sweep_trackers_log_one_run_per_trial(tmp_path, monkeypatch):
    """Ray Tune's logger callbacks (subclassed in simfed.sweeps.tracking), driven as Tune drives them."""
    pytest.importorskip("tensorboard")
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient
    from tensorboard.backend.event_processing import event_accumulator

    from simfed.sweeps import tracking

    class Trial:
        def __init__(self, tid):
            self.config, self.evaluated_params, self.local_path = {"trial": tid}, {}, str(tmp_path / "tune" / tid)

        def __str__(self):
            return self.config["trial"]

    configs = {t: {"algorithm": {"name": "fedavg", "lr": 0.1 * (i + 1)}, "run": {"rounds": 2}}
               for i, t in enumerate(("t0", "t1"))}
    (tmp_path / "trials" / "t0").mkdir(parents=True)
    plot = tmp_path / "curves.png"
    plot.write_bytes(b"png")
    cbs = tracking.callbacks(tmp_path, configs, ("tensorboard", "mlflow"), "", artifacts=lambda run_dir: [plot])
    trials = [Trial("t0"), Trial("t1")]
    for cb in cbs:
        cb.setup()
        for t in trials:
            cb.log_trial_start(t)
            for r in (1, 2):
                cb.log_trial_result(r, t, {"round": r, "timesteps_total": r, "training_iteration": r,
                                           "train/loss": 1.0 / r, **({"val/acc_seen": 0.5} if r == 2 else {})})
            cb.log_trial_end(t)
    acc = event_accumulator.EventAccumulator(str(tmp_path / "trials" / "t0" / "tensorboard"))
    acc.Reload()
    assert [e.step for e in acc.Scalars("ray/tune/train/loss")] == [1, 2]
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    client = MlflowClient(tracking_uri=(tmp_path / "mlruns").as_uri())
    exp = client.get_experiment_by_name(tmp_path.name)
    runs = {r.info.run_name: r for r in client.search_runs([exp.experiment_id])}
    assert set(runs) == {"t0", "t1"} and runs["t1"].data.params["algorithm.lr"] == "0.2"
    assert [m.step for m in client.get_metric_history(runs["t0"].info.run_id, "train/loss")] == [1, 2]
    assert [a.path for a in client.list_artifacts(runs["t0"].info.run_id)] == ["curves.png"]
