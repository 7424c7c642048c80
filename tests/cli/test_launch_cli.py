"""`simfed launch` / `metrics` / `algorithms` as a user runs them: real processes, real exit codes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import polars as pl
import pytest


def simfed(*args, cwd=None, timeout=300):
    return subprocess.run([sys.executable, "-m", "simfed.cli.main", *args], capture_output=True, text=True,
                          cwd=cwd, timeout=timeout)


def assert_user_error(proc, *needles):
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


def write_exp(tmp_path: Path, store: str, algorithm: str = 'name = "fedavg"', run: str = "", data: str = "") -> Path:
    text = f"""
[data]
path = "{data or store}"
[run]
rounds = 2
clients_per_round = 4
eval_every = 1
{run}
[algorithm]
{algorithm}
local_steps = 3
[engine]
backend = "serial"
"""
    path = tmp_path / "exp.toml"
    path.write_text(text)
    return path


def test_launch_serial_then_metrics_json(engine_store, tmp_path):
    exp = write_exp(tmp_path, engine_store)
    proc = simfed("launch", str(exp), "--out", str(tmp_path / "run"), "-q", "--set", "run.seed=4")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[0] == str(tmp_path / "run")
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert saved["run"]["seed"] == 4 and saved["algorithm"]["name"] == "fedavg"
    # polars reads the per-client rows directly.
    df = pl.scan_parquet(str(tmp_path / "run" / "metrics" / "*.parquet")).collect()
    assert {"round", "client_id", "cohort", "split", "n", "loss", "accuracy", "seconds", "bytes_up",
            "bytes_down"} <= set(df.columns)
    train = df.filter(pl.col("split") == "train")
    assert train.height == 8 and (train["bytes_up"] > 0).all() and (train["bytes_down"] > 0).all()
    out = simfed("metrics", str(tmp_path / "run"), "--json")
    assert out.returncode == 0, out.stderr
    summary = json.loads(out.stdout)
    assert summary["round"] == 2 and set(summary["cohorts"]) == {"seen", "unseen"}
    seen = summary["cohorts"]["seen"]
    test_rows = df.filter((pl.col("split") == "test") & (pl.col("round") == 2) & (pl.col("cohort") == "seen"))
    assert seen["clients"] == test_rows.height
    assert seen["acc_mean"] == pytest.approx(test_rows["accuracy"].mean())
    assert seen["acc_worst10"] <= seen["acc_p10"] + 1e-12 <= seen["acc_mean"] + 1e-12 <= seen["acc_best"] + 1e-12


def test_resume_continues_to_the_end(engine_store, tmp_path):
    exp = write_exp(tmp_path, engine_store, run="checkpoint_every = 1")
    assert simfed("launch", str(exp), "--out", str(tmp_path / "run"), "-q").returncode == 0
    again = simfed("launch", str(exp), "--out", str(tmp_path / "run"), "-q")
    assert_user_error(again, "already holds a run", "--resume")
    proc = simfed("launch", "--resume", str(tmp_path / "run"), "-q")
    assert proc.returncode == 0, proc.stderr  # nothing left to do: finishes at once


def test_algorithms_lists_registered_methods():
    proc = simfed("algorithms", "--json")
    info = json.loads(proc.stdout)
    assert {"fedavg", "local"} <= set(info)
    assert info["fedavg"]["config"]["momentum"] == 0.9


@pytest.mark.parametrize("case", ["method", "key", "path", "cohort", "address", "toml", "set"])
def test_bad_input_is_one_line_exit_2(engine_store, tmp_path, case):
    out = tmp_path / "run"
    if case == "method":
        proc = simfed("launch", str(write_exp(tmp_path, engine_store, 'name = "nope"')), "--out", str(out))
        assert_user_error(proc, "unknown algorithm 'nope'", "fedavg")
    elif case == "key":
        proc = simfed("launch", str(write_exp(tmp_path, engine_store, 'name = "fedavg"\nlrr = 0.1')), "--out", str(out))
        assert_user_error(proc, "lrr", "valid keys", "local_steps", "momentum")
    elif case == "path":
        proc = simfed("launch", str(write_exp(tmp_path, engine_store, data=str(tmp_path / "missing"))), "--out", str(out))
        assert_user_error(proc, "does not exist", str(tmp_path / "missing"))
    elif case == "cohort":
        proc = simfed("launch", str(write_exp(tmp_path, engine_store)), "--set", "run.clients_per_round=500",
                      "--out", str(out))
        assert_user_error(proc, "clients_per_round = 500", "seen clients")
    elif case == "address":
        exp = write_exp(tmp_path, engine_store)
        proc = simfed("launch", str(exp), "--set", 'engine.backend="ray"', "--address", "127.0.0.1:1", "--out", str(out))
        assert_user_error(proc, "cannot reach a Ray cluster at 127.0.0.1:1")
    elif case == "toml":
        bad = tmp_path / "bad.toml"
        bad.write_text("[run\nrounds = 1")
        assert_user_error(simfed("launch", str(bad), "--out", str(out)), "invalid TOML", str(bad))
    elif case == "set":
        assert_user_error(simfed("launch", "--set", "rounds=3", "--out", str(out)), "section.key=value")
    assert not out.exists()  # nothing half-written


def test_checksum_failure_found_while_ray_starts_is_one_line(tmp_path):
    """The checksum pass runs while Ray starts (api/runs.py): its failure still ends the launch in one
    line and exit 2 after Ray is stopped again, with nothing written."""
    store, out = tmp_path / "s", tmp_path / "run"
    assert simfed("partition", "synthetic-femnist", str(store), "--clients", "6").returncode == 0
    with open(store / "train.arrow", "r+b") as f:
        f.seek(5000)
        b = f.read(1)
        f.seek(5000)
        f.write(bytes([b[0] ^ 0x55]))
    exp = write_exp(tmp_path, str(store))
    proc = simfed("launch", str(exp), "--set", 'engine.backend="ray"', "--set", "engine.workers=1", "--out", str(out))
    assert_user_error(proc, "train.arrow", "checksum mismatch")
    assert not out.exists()
    ok = simfed("launch", str(exp), "--set", 'engine.backend="ray"', "--set", "engine.workers=1", "--no-verify",
                "--out", str(out), "-q")
    assert ok.returncode == 0, ok.stderr
