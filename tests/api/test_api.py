"""The Python API (simfed.launch, simfed.load_run): the same runs, numbers and error lines as the CLI."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import polars as pl
import pytest

import simfed
from simfed import SimfedError, launch, load_run
from tests.cli import inproc
from tests.imports import modules_loaded_by

# Every column but the wall-clock seconds: numbers, ids, cohorts, phases, worker and node.
COLUMNS = ["run", "round", "client_id", "cohort", "split", "phase", "n", "loss", "accuracy", "bytes_up",
           "bytes_down", "dropped", "node_id", "worker"]
ORDER = ["round", "split", "cohort", "phase", "client_id"]


def doc(store: str, **run) -> dict:
    return {"data": {"path": store},
            "run": {"rounds": 2, "clients_per_round": 4, "eval_every": 1, "eval_clients": 5, **run},
            "algorithm": {"name": "pfedhn", "local_steps": 2, "unseen_exchanges": 2, "hidden": 16, "embed_dim": 4},
            "engine": {"backend": "serial"}}


def toml(path: Path, d: dict) -> Path:
    from simfed.core.config import to_toml

    path.write_text(to_toml(d))
    return path


def numbers(run_dir: Path) -> pl.DataFrame:
    return load_run(run_dir).metrics().select(COLUMNS).sort(ORDER)


def simfed_cli() -> list[str]:
    """The venv's `simfed` console script (the one a user runs), else the module."""
    script = Path(sys.executable).with_name("simfed")
    return [str(script)] if script.exists() else [sys.executable, "-m", "simfed.cli.main"]


def test_launch_from_python_and_from_the_shell_give_the_same_numbers(engine_store, tmp_path):
    exp = toml(tmp_path / "exp.toml", doc(engine_store))
    events: list[dict] = []
    run_dir = launch(exp, out=tmp_path / "py" / "run", overrides=["run.seed=3"], on_event=events.append)
    assert run_dir == tmp_path / "py" / "run"
    kinds = [e["type"] for e in events]
    assert kinds[0] == "run_dir" and kinds[-1] == "done" and kinds.count("round") == 2
    assert events[-1]["rounds"] == 2 and {s["cohort"] for s in events[-1]["summary"]} == {"seen", "unseen"}
    proc = subprocess.run([*simfed_cli(), "launch", str(exp), "--out", str(tmp_path / "sh" / "run"), "-q",
                           "--set", "run.seed=3"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[0] == str(tmp_path / "sh" / "run")
    py, sh = numbers(run_dir), numbers(tmp_path / "sh" / "run")
    assert py.height > 0 and py.equals(sh)
    assert load_run(run_dir).rounds().equals(load_run(tmp_path / "sh" / "run").rounds())
    assert load_run(run_dir).config == json.loads((tmp_path / "sh" / "run" / "config.json").read_text())


def test_launch_with_a_dict_equals_launch_with_its_file(engine_store, tmp_path):
    d = doc(engine_store, rounds=1)
    launch(toml(tmp_path / "exp.toml", d), out=tmp_path / "a" / "run")
    given = json.loads(json.dumps(d))
    launch(given, out=tmp_path / "b" / "run", overrides=["run.clients_per_round=4"])
    assert given == d  # the caller's dict is not changed
    assert numbers(tmp_path / "a" / "run").equals(numbers(tmp_path / "b" / "run"))


def test_load_run_reads_metrics_curves_and_rounds(engine_store, tmp_path):
    run_dir = launch(doc(engine_store), out=tmp_path / "run")
    run = load_run(run_dir)
    assert run.metrics().equals(pl.scan_parquet(run_dir / "metrics" / "*.parquet").collect())
    assert run.status["state"] == "finished" and run.status["completed_rounds"] == 2
    assert run.config["algorithm"]["name"] == "pfedhn" and run.config["run"]["rounds"] == 2
    curve = run.curve()
    assert curve.columns == ["round", "split", "cohort", "clients", "acc_mean", "acc_p10", "acc_p90", "acc_weighted",
                             "loss_mean", "loss_p10", "loss_p90"]
    # Evaluated after rounds 1 and 2, on val and test, seen and unseen clients.
    assert curve.height == 2 * 2 * 2 and sorted(set(curve["round"])) == [1, 2]
    from simfed.engine import metrics

    assert curve.equals(metrics.curve(metrics.load(run_dir)))
    assert run.train_curve()["round"].to_list() == [1, 2]
    rounds = run.rounds()
    assert rounds["round"].to_list() == [1, 2] and len(rounds.columns) > 1
    assert all("." in c for c in rounds.columns[1:])  # phase.stat
    summary = run.summary()
    assert summary["cohort"].to_list() == ["seen", "unseen"] and (summary["round"] == 2).all()


def test_load_run_refuses_what_is_not_a_run(tmp_path):
    with pytest.raises(SimfedError) as err:
        load_run(tmp_path / "nothing")
    assert str(err.value) == f"{tmp_path / 'nothing'}: no such directory; pass a run directory `simfed launch` printed"
    cli = inproc.run("metrics", tmp_path / "nothing")
    assert cli.returncode == 2 and cli.stderr == f"simfed: error: {err.value}\n"


BAD = {
    "unknown key": lambda d: d["algorithm"].update(lrr=0.1),
    "nan lr": lambda d: d["algorithm"].update(lr=math.nan),
    "missing store": lambda d: d["data"].update(path=d["data"]["path"] + "-missing"),
    "unknown section": lambda d: d.update(extra={"a": 1}),
    "cohort": lambda d: d["run"].update(clients_per_round=500),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_config_raises_the_line_the_cli_prints(engine_store, tmp_path, case):
    d = doc(engine_store)
    BAD[case](d)
    exp = toml(tmp_path / "exp.toml", d)
    out = tmp_path / "run"
    with pytest.raises(SimfedError) as err:
        launch(exp, out=out)
    cli = inproc.run("launch", exp, "--out", out, "-q")
    assert cli.returncode == 2 and cli.stderr == f"simfed: error: {err.value}\n"
    assert not out.exists()  # nothing written
    if case != "unknown section":  # a dict is named "config" in messages about the document itself
        with pytest.raises(SimfedError) as from_dict:
            launch(d, out=out)
        assert str(from_dict.value) == str(err.value)


def stop_in_round_2(event: dict) -> None:
    if event["type"] == "chunk" and event["round"] == 2:
        raise KeyboardInterrupt


def test_resume_from_python_continues_to_the_same_numbers(engine_store, tmp_path):
    launch(doc(engine_store, checkpoint_every=1), out=tmp_path / "full")
    with pytest.raises(KeyboardInterrupt):
        launch(doc(engine_store, checkpoint_every=1), out=tmp_path / "cut", on_event=stop_in_round_2)
    assert load_run(tmp_path / "cut").status["state"] == "interrupted"
    events: list[dict] = []
    assert launch(resume=tmp_path / "cut", on_event=events.append) == tmp_path / "cut"
    assert [e for e in events if e["type"] == "resume"] == [
        {"type": "resume", "run_dir": str(tmp_path / "cut"), "round": 1, "rounds": 2}]
    assert numbers(tmp_path / "cut").drop("run").equals(numbers(tmp_path / "full").drop("run"))
    events.clear()
    launch(resume=tmp_path / "cut", on_event=events.append)  # finished: nothing runs
    assert [e["type"] for e in events] == ["already_finished"]
    with pytest.raises(SimfedError, match="--resume takes the run's saved config"):
        launch(doc(engine_store), resume=tmp_path / "cut")


def test_a_launch_checks_the_store_once(engine_store, tmp_path, monkeypatch):
    from simfed.partitions.store import PartitionStore

    calls = []
    check = PartitionStore.check_contents
    monkeypatch.setattr(PartitionStore, "check_contents", lambda self: calls.append(self.path) or check(self))
    launch(doc(engine_store, rounds=1), out=tmp_path / "run")
    assert len(calls) == 1
    calls.clear()
    d = doc(engine_store, rounds=2, checkpoint_every=1)
    with pytest.raises(KeyboardInterrupt):
        launch(d, out=tmp_path / "cut", on_event=stop_in_round_2)
    calls.clear()
    launch(resume=tmp_path / "cut")
    assert len(calls) == 1


def test_an_override_that_switches_the_method_reports_the_dropped_keys(engine_store, tmp_path):
    events: list[dict] = []
    launch(doc(engine_store, rounds=1), out=tmp_path / "run", overrides=["algorithm.name=fedavg"],
           on_event=events.append)
    notes = [e["message"] for e in events if e["type"] == "note"]
    assert len(notes) == 1 and "dropped the file's pfedhn settings" in notes[0]
    assert load_run(tmp_path / "run").config["algorithm"]["name"] == "fedavg"


def test_import_simfed_and_help_load_neither_torch_nor_ray():
    code = ("import simfed\n"
            "from simfed.cli.main import main\n"
            "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
            "simfed.load_run, simfed.launch, simfed.Run, simfed.SimfedError")
    assert modules_loaded_by(code, ("torch", "ray")) == []
    assert simfed.__all__ == ["launch", "load_run", "Run", "SimfedError"]


@pytest.mark.slow
@pytest.mark.usefixtures("ray_session")
def test_a_ray_launch_from_python_equals_the_serial_one(engine_store, tmp_path):
    d = doc(engine_store)
    launch(d, out=tmp_path / "serial" / "run")
    launch(d, out=tmp_path / "ray" / "run", overrides=["engine.backend=\"ray\"", "engine.workers=2"])
    serial, ray = numbers(tmp_path / "serial" / "run"), numbers(tmp_path / "ray" / "run")
    assert set(ray["worker"]) == {0, 1}
    assert serial.drop("worker", "node_id").equals(ray.drop("worker", "node_id"))
