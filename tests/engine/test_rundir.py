"""Run-directory lock: one owner at a time, stale locks taken over, a crashed run reads "interrupted"."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import polars as pl
import pytest

from simfed.engine import rundir
from simfed.core.errors import SimfedError
from tests.cli.test_launch_cli import assert_user_error, simfed, write_exp

HOLDER = """
import sys, time
from simfed.engine import rundir
with rundir.hold(sys.argv[1]):
    rundir.write_status(sys.argv[1], {"state": "running"})
    print("held", flush=True)
    time.sleep(120)
"""


def test_lock_names_the_owner_and_a_dead_owners_lock_is_taken_over(tmp_path):
    run = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(run)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "held"
        assert rundir.owner_alive(run)
        assert rundir.read_status(run)["state"] == "running"
        with pytest.raises(SimfedError) as err:
            with rundir.hold(run):
                pass
        assert f"pid {proc.pid}" in str(err.value) and "in use" in str(err.value)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        # The kernel dropped the dead owner's lock: status no longer claims a live run.
        assert not rundir.owner_alive(run)
        assert rundir.read_status(run)["state"] == "interrupted"
        with rundir.hold(run):
            assert rundir.owner_alive(run)
            with rundir.hold(run):  # nested in one process: shares the lock
                pass
            assert json.loads((run / rundir.LOCK).read_text())["pid"] == os.getpid()
    finally:
        proc.kill()
        proc.wait()


def test_unreadable_status_reads_unknown(tmp_path):
    (tmp_path / "status.json").write_text("{garbage")
    assert rundir.read_status(tmp_path)["state"] == "unknown"
    assert rundir.read_status(tmp_path / "absent") is None


def test_second_launch_into_a_busy_out_is_refused_and_the_first_run_is_intact(engine_store, tmp_path):
    exp = write_exp(tmp_path, engine_store, run="checkpoint_every = 1")
    out = tmp_path / "run"
    first = subprocess.Popen([sys.executable, "-m", "simfed.cli.main", "launch", str(exp), "--out", str(out), "-q",
                              "--set", "run.seed=1", "--set", "run.rounds=3"],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        while not (out / "config.json").exists() and first.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        assert first.poll() is None, first.communicate()
        # Paused, the first run surely still owns the directory while the others try.
        os.kill(first.pid, signal.SIGSTOP)
        second = simfed("launch", str(exp), "--out", str(out), "-q", "--set", "run.seed=0")
        assert_user_error(second, "in use by another run", f"pid {first.pid}")
        resumed = simfed("launch", "--resume", str(out), "-q")
        assert_user_error(resumed, "in use by another run")
        os.kill(first.pid, signal.SIGCONT)
        stdout, stderr = first.communicate(timeout=300)
    finally:
        first.kill()
    assert first.returncode == 0, stderr
    assert json.loads((out / "config.json").read_text())["run"]["seed"] == 1
    assert rundir.read_status(out)["state"] == "finished"
    # The first run's rows alone: every round once, from the seed-1 run.
    train = pl.read_parquet(str(out / "metrics" / "*train.parquet"))
    assert sorted(set(train["round"].to_list())) == [1, 2, 3]
    assert train.group_by(["round", "client_id"]).len()["len"].max() == 1
    # A finished run directory still refuses a fresh launch.
    assert_user_error(simfed("launch", str(exp), "--out", str(out), "-q"), "already holds a run")


def test_default_run_names_made_within_one_second_differ(tmp_path, monkeypatch):
    from simfed.runs import _run_dir
    from tests.engine.conftest import make_exp

    monkeypatch.chdir(tmp_path)
    exp = make_exp("unused")
    dirs = [_run_dir(exp, None) for _ in range(3)]
    assert len(set(dirs)) == 3 and all(d.is_dir() for d in dirs)
    assert dirs[1].name == dirs[0].name + "-2" or dirs[1].name[:-2] != dirs[0].name  # -2 unless the clock ticked
