"""`simfed sweep` and `simfed compare` end to end on the session's local Ray (2 CPUs).

One sweep (2 methods x 2 seeds, 2 rounds) runs as a real driver process joined to the session's
cluster; the driver is killed after a trial finishes and `--resume` runs only the rest. Then:
every trial ran in its own placement group with its worker inside it, concurrent trials never
reserved more than the 2 CPUs, each trial's metrics equal a plain `simfed launch` of its config,
and `simfed compare` equals a hand computation on the per-client rows.
"""

from __future__ import annotations

import json
import shutil
import math
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from simfed.cli.main import main

SWEEP = """
[data]
path = "{store}"
[run]
rounds = 2
clients_per_round = 4
eval_every = 1
checkpoint_every = 1
[algorithm]
batch_size = 16
local_steps = 2
[engine]
backend = "ray"
workers = 1
[sweep.grid]
"algorithm.name" = ["fedavg", "local"]
"run.seed" = [0, 1]
[sweep.method.local]
"algorithm.unseen_steps" = 4
"""


def cli(capsys, *args) -> tuple[int, str, str]:
    """Run the `simfed` entry point in this process (it shares the session's Ray)."""
    argv = sys.argv
    sys.argv = ["simfed", *args]
    try:
        main()
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    finally:
        sys.argv = argv
    out = capsys.readouterr()
    return code, out.out, out.err


def driver(*args) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "simfed.cli.main", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _rows(run_dir: Path) -> pl.DataFrame:
    df = pl.scan_parquet(str(run_dir / "metrics" / "*.parquet")).collect()
    return df.sort(["round", "split", "phase", "client_id"]).select(
        ["round", "client_id", "cohort", "split", "n", "loss", "accuracy"])


def test_sweep_kill_resume_placement_parity_and_compare(ray_session, engine_store, tmp_path, capsys):
    from simfed.engine.raybackend import release_pool

    release_pool()  # earlier tests' pooled actors would hold the CPUs the trials need
    spec = tmp_path / "sweep.toml"
    spec.write_text(SWEEP.format(store=engine_store))
    out = tmp_path / "sw"
    address = ray_session.get_runtime_context().gcs_address

    proc = driver("sweep", str(spec), "--out", str(out), "--address", address)
    deadline = time.time() + 1200  # generous: a shared, overloaded machine starts Ray workers slowly
    while time.time() < deadline and proc.poll() is None:
        states = json.loads((out / "state.json").read_text()) if (out / "state.json").exists() else {}
        if any(v["state"] == "finished" for v in states.values()):
            break
        time.sleep(0.5)
    assert proc.poll() is None, proc.communicate()[1][-3000:]
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    killed_at = time.time()  # attempts the kill cut short have no end time; they ended by now
    ids = [t["id"] for t in json.loads((out / "sweep.json").read_text())["trials"]]
    assert len(ids) == 4
    status = {i: json.loads((out / "trials" / i / "status.json").read_text())["state"]
              if (out / "trials" / i / "status.json").exists() else "" for i in ids}
    done_before = {i for i, s in status.items() if s == "finished"}
    assert 1 <= len(done_before) < 4

    proc = driver("sweep", "--resume", str(out), "--address", address)
    stdout, stderr = proc.communicate(timeout=1200)
    assert proc.returncode == 0, stderr[-3000:]
    assert f"{4 - len(done_before)} to run, {len(done_before)} finished earlier" in stderr
    records = {i: json.loads((out / "trials" / i / "trial.json").read_text()) for i in ids}
    for i in ids:  # every trial ran to the end; the finished ones were not rerun
        assert json.loads((out / "trials" / i / "status.json").read_text())["state"] == "finished"
        assert (len(records[i]["attempts"]) == 1) if i in done_before else (len(records[i]["attempts"]) >= 1)
    assert all(v["state"] == "finished" for v in json.loads((out / "state.json").read_text()).values())

    # Placement: each attempt's worker sat in that attempt's own placement group of 1 CPU, and the
    # attempts running at any instant never reserved more than the cluster's 2 CPUs.
    attempts = [a for r in records.values() for a in r["attempts"]]
    for a in attempts:
        assert a["placement_group"] and a["worker_placement_groups"] == [a["placement_group"]]
        head, *workers = a["bundles"]  # the head pins the trial's driver to the sweep driver's node
        assert [k.split(":")[0] for k in head] == ["node"] and workers == [{"CPU": 1.0}]
    assert len({a["placement_group"] for a in attempts}) == len(attempts)
    for a in attempts:
        t = a["start"] + 1e-6
        busy = sum(b.get("CPU", 0) for x in attempts if x["start"] <= t < (x["end"] or killed_at) for b in x["bundles"])
        assert busy <= 2.0

    # Each trial equals a plain `simfed launch` of its saved config (same seed, same worker count).
    for i in ids:
        code, _, err = cli(capsys, "launch", str(out / "trials" / i / "config.toml"), "--out",
                           str(tmp_path / "plain" / i), "-q")
        assert code == 0, err
        assert _rows(out / "trials" / i).equals(_rows(tmp_path / "plain" / i)), i

    # compare == a hand computation on the per-client test rows of the last round.
    code, stdout, err = cli(capsys, "compare", str(out), "--json")
    assert code == 0, err
    table = {g["group"]: g for g in json.loads(stdout)["groups"]}
    assert set(table) == {"fedavg", "local"}
    trials = json.loads((out / "sweep.json").read_text())["trials"]
    for method in ("fedavg", "local"):
        mine = [t for t in trials if t["overrides"]["algorithm.name"] == method]
        assert table[method]["trials"] == sorted(t["id"] for t in mine)
        for cohort in ("seen", "unseen"):
            means, p10s, worst = [], [], []
            for t in sorted(mine, key=lambda t: t["doc"]["run"]["seed"]):
                df = pl.read_parquet(out / "trials" / t["id"] / "metrics" / "r000002-eval.parquet")
                acc = sorted(df.filter((pl.col("split") == "test") & (pl.col("cohort") == cohort))["accuracy"].to_list())
                means.append(sum(acc) / len(acc))
                p10s.append(float(np.percentile(acc, 10)))
                k = math.ceil(0.1 * len(acc))
                worst.append(sum(acc[:k]) / k)
            got = table[method]["cohorts"][cohort]
            for key, vals in (("acc_mean", means), ("acc_p10", p10s), ("acc_worst10", worst)):
                assert got[key]["mean"] == pytest.approx(statistics.mean(vals), rel=1e-12, abs=1e-15)
                assert got[key]["std"] == pytest.approx(statistics.stdev(vals), rel=1e-12, abs=1e-15)
            assert got["rounds"]["mean"] == 2
    rows = pl.read_parquet(out / "compare.parquet")
    assert rows.height == 8 and rows["selected"].all()  # one row per trial x cohort
    code, stdout, _ = cli(capsys, "compare", str(out))
    assert code == 0 and "fedavg" in stdout and "±" in stdout


@pytest.mark.parametrize("case", ["unknown-key", "method-key", "wrong-type", "empty-grid", "no-grid", "too-large"])
def test_bad_sweep_is_one_line_exit_2(engine_store, tmp_path, capsys, case):
    base = SWEEP.format(store=engine_store)
    text, needles, extra = base, [], []
    if case == "unknown-key":
        text = base.replace('"run.seed" = [0, 1]', '"run.seed" = [0, 1]\n"algorithm.lrr" = [0.1]')
        needles = ["unknown key 'algorithm.lrr' for method fedavg", "[sweep.method.NAME]"]
    elif case == "method-key":
        text, needles = base.replace('"algorithm.unseen_steps" = 4', '"algorithm.server_lr" = [1.0]'), \
            ["unknown key 'algorithm.server_lr' for method local"]
    elif case == "wrong-type":
        text, needles = base.replace('"run.seed" = [0, 1]', '"run.seed" = [0, "one"]'), ["run.seed", "wrong type"]
    elif case == "empty-grid":
        text, needles = base.replace('"run.seed" = [0, 1]', '"run.seed" = []'), ["run.seed is an empty list"]
    elif case == "no-grid":
        text = base.split("[sweep.grid]")[0].replace("[engine]", '[sweep]\nscheduler = "fifo"\n[engine]')
        text = text.replace("[algorithm]", '[algorithm]\nname = "fedavg"')
        needles = ["the sweep is empty"]
    elif case == "too-large":
        text, needles = base.replace('"run.seed" = [0, 1]', '"run.seed" = ' + str(list(range(101)))), \
            ["202 trials", "--yes"]
    path = tmp_path / "s.toml"
    path.write_text(text)
    out = tmp_path / "out"
    code, _, err = cli(capsys, "sweep", str(path), "--out", str(out), *extra)
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    for needle in needles:
        assert needle in lines[0], lines[0]
    assert not out.exists()  # nothing started, nothing written


FAILING = """
[data]
path = "{store}"
[run]
rounds = 1
clients_per_round = 3
eval_every = 1
checkpoint_every = 1
[algorithm]
name = "fedavg"
batch_size = 16
local_steps = 2
[engine]
backend = "ray"
workers = 1
[sweep.grid]
"data.path" = ["{store}", "{damaged}"]
"""


def test_a_failed_trial_is_reported_and_resume_reruns_only_it(ray_session, engine_store, tmp_path, capsys):
    """Trial 001 reads a second copy of the store that breaks after the sweep's up-front checks (a store
    on a mount that changed under the sweep): it fails at run time while 000 finishes. The sweep names
    the trial and the one-line reason and exits 1; once the store is restored, `--resume` reruns only
    001, and `simfed compare` reads the complete sweep."""

    from simfed.engine.raybackend import release_pool

    release_pool()
    damaged = tmp_path / "store_b"
    shutil.copytree(engine_store, damaged)
    victim = damaged / "clients.parquet"
    good = victim.read_bytes()
    spec = tmp_path / "sweep.toml"
    spec.write_text(FAILING.format(store=engine_store, damaged=damaged))
    out = tmp_path / "sw"
    address = ray_session.get_runtime_context().gcs_address

    # One trial at a time: 001 starts only after 000 is done, long after the checks have passed.
    proc = driver("sweep", str(spec), "--out", str(out), "--address", address, "--max-concurrent", "1")
    deadline = time.time() + 600
    while not (out / "sweep.json").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)  # sweep.json is written after every trial's store was checked
    victim.write_bytes(good[: len(good) // 2])
    stdout, stderr = proc.communicate(timeout=1200)
    assert proc.returncode == 1, stderr[-3000:]
    assert "Traceback" not in stderr, stderr[-3000:]
    failed = [ln for ln in stderr.splitlines() if "] 001-fedavg (" in ln and ") failed: " in ln]
    assert len(failed) == 1 and "clients.parquet" in failed[0], stderr[-3000:]
    assert "1 finished, 0 stopped early, 1 failed, 0 not run" in stderr
    assert f"rerun the rest with: simfed sweep --resume {out}" in stderr
    states = json.loads((out / "state.json").read_text())
    assert states["000-fedavg"]["state"] == "finished" and states["001-fedavg"]["state"] == "failed"
    assert "clients.parquet" in states["001-fedavg"]["error"]

    victim.write_bytes(good)  # the cause fixed
    proc = driver("sweep", "--resume", str(out), "--address", address)
    stdout, stderr = proc.communicate(timeout=1200)
    assert proc.returncode == 0, stderr[-3000:]
    assert "1 to run, 1 finished earlier" in stderr and "2 finished, 0 stopped early, 0 failed" in stderr
    records = {i: json.loads((out / "trials" / i / "trial.json").read_text()) for i in ("000-fedavg", "001-fedavg")}
    assert len(records["000-fedavg"]["attempts"]) == 1  # not rerun
    assert len(records["001-fedavg"]["attempts"]) == 2
    for i in records:
        assert json.loads((out / "trials" / i / "status.json").read_text())["state"] == "finished"
        assert _rows(out / "trials" / i).filter(pl.col("split") == "test").height > 0
    assert all(v["state"] == "finished" for v in json.loads((out / "state.json").read_text()).values())
    # The store copy holds the same data: the rerun trial equals the one that never failed.
    assert _rows(out / "trials" / "000-fedavg").equals(_rows(out / "trials" / "001-fedavg"))

    code, stdout, err = cli(capsys, "compare", str(out), "--json")
    assert code == 0, err
    rows = pl.read_parquet(out / "compare.parquet")
    assert sorted(set(rows["trial"].to_list())) == ["000-fedavg", "001-fedavg"]
    assert set(rows["state"].to_list()) == {"finished"}


def _sweep_dir(tmp_path, store) -> Path:
    """A sweep directory as `simfed sweep` leaves it after its trials finished, without running them
    (sweep.json, state.json, trials/ID/{status,trial}.json; no metrics)."""
    import tomllib

    from simfed.sweeps.config import parse_sweep

    spec = parse_sweep(tomllib.loads(SWEEP.format(store=store)), "sweep.toml")
    out = tmp_path / "sw"
    for t in spec.trials:
        (out / "trials" / t.id).mkdir(parents=True)
        (out / "trials" / t.id / "status.json").write_text(json.dumps({"state": "finished", "completed_rounds": 2}))
        (out / "trials" / t.id / "trial.json").write_text(json.dumps({"id": t.id, "attempts": []}))
    (out / "sweep.json").write_text(json.dumps({"version": 1, "source": "sweep.toml",
                                                "scheduler": spec.scheduler.__dict__,
                                                "trials": [{"id": t.id, "overrides": t.overrides, "doc": t.doc}
                                                           for t in spec.trials]}, indent=2))
    (out / "state.json").write_text(json.dumps({t.id: {"state": "finished"} for t in spec.trials}))
    return out


DAMAGE = {  # case -> (what to do to a valid sweep directory, text the one line must hold)
    "missing-dir": (lambda d: d.rename(d.with_name("gone")), "no such directory"),
    "not-a-dir": (lambda d: (shutil.rmtree(d), d.write_text("x")), "not a directory"),
    "no-sweep-file": (lambda d: (d / "sweep.json").unlink(), "not a sweep directory (no sweep.json)"),
    "run-dir": (lambda d: ((d / "sweep.json").unlink(), (d / "status.json").write_text("{}")),
                "a run directory, not a sweep"),
    "sweep-truncated": (lambda d: _truncate(d / "sweep.json"), "sweep.json: truncated or invalid JSON"),
    "sweep-empty": (lambda d: (d / "sweep.json").write_text(""), "sweep.json: empty"),
    "sweep-foreign": (lambda d: (d / "sweep.json").write_text('{"name": "my-app", "version": "1.0"}'),
                      "sweep.json: not a sweep record (no list of trials)"),
    "sweep-list": (lambda d: (d / "sweep.json").write_text("[1, 2]"), "sweep.json: not a JSON object"),
    "sweep-bad-id": (lambda d: _edit(d / "sweep.json", lambda r: r["trials"][0].update(id="../..")),
                     "trial id '../..' is not a directory name"),
    "status-truncated": (lambda d: _truncate(d / "trials" / "000-fedavg" / "status.json"),
                         "000-fedavg/status.json: truncated or invalid JSON"),
    "trial-truncated": (lambda d: _truncate(d / "trials" / "001-fedavg" / "trial.json"),
                        "001-fedavg/trial.json: truncated or invalid JSON"),
    "trial-foreign": (lambda d: (d / "trials" / "001-fedavg" / "trial.json").write_text('{"attempts": 3}'),
                      "001-fedavg/trial.json: not a trial record"),
    "state-truncated": (lambda d: _truncate(d / "state.json"), "state.json: truncated or invalid JSON"),
}


def _truncate(path: Path) -> None:
    text = path.read_text()
    path.write_text(text[: len(text) // 2])


def _edit(path: Path, change) -> None:
    record = json.loads(path.read_text())
    change(record)
    path.write_text(json.dumps(record))


@pytest.mark.parametrize("command", ["compare", "resume"])
@pytest.mark.parametrize("case", sorted(DAMAGE))
def test_damaged_or_foreign_sweep_dir_is_one_line_exit_2(engine_store, tmp_path, capsys, case, command):
    out = _sweep_dir(tmp_path, engine_store)
    damage, needle = DAMAGE[case]
    damage(out)
    if command == "compare" and case == "state-truncated":
        needle = "no trial has test metrics yet"  # compare reads state.json leniently (labels only): otherwise fine
    args = ["compare", str(out)] if command == "compare" else ["sweep", "--resume", str(out)]
    code, stdout, err = cli(capsys, *args)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err
    assert needle in lines[0] and lines[0].startswith("simfed: error: "), lines[0]
    if case not in ("missing-dir", "not-a-dir"):
        assert not (out / "compare.parquet").exists()
        # how to fix: every message names a way out
        assert any(w in lines[0] for w in ("restore it", "delete it", "pass the", "use simfed", "run or resume"))


ASHA = """
[data]
path = "{store}"
[run]
rounds = 3
clients_per_round = 3
eval_every = 1
checkpoint_every = 1
eval_clients = 6
[algorithm]
name = "fedavg"
batch_size = 16
local_steps = 5
[engine]
backend = "ray"
workers = 1
[sweep]
scheduler = "asha"
grace_period = 1
reduction_factor = 2
[sweep.grid]
"algorithm.lr" = [0.1, 1e-7]
"""


def test_asha_stops_the_hopeless_lr_and_compare_reports_rounds(ray_session, engine_store, tmp_path, capsys):
    """lr 0.1 runs first (one trial at a time) and sets the bar at ASHA's first rung (round 1); lr 1e-7
    barely moves the initial model, lags there and is stopped: its run directory is a valid run of 1
    round (metrics, checkpoint and status agree), and compare reports the rounds of each trial."""
    from simfed.engine import checkpoint, metrics
    from simfed.engine.raybackend import release_pool

    release_pool()
    spec = tmp_path / "asha.toml"
    spec.write_text(ASHA.format(store=engine_store))
    out = tmp_path / "sw"
    proc = driver("sweep", str(spec), "--out", str(out), "--max-concurrent", "1",
                  "--address", ray_session.get_runtime_context().gcs_address)
    stdout, stderr = proc.communicate(timeout=1200)
    assert proc.returncode == 0, stderr[-3000:]  # a trial stopped by ASHA is not a failure
    assert "1 finished, 1 stopped early, 0 failed" in stderr, stderr[-3000:]
    states = json.loads((out / "state.json").read_text())
    assert states["000-fedavg"]["state"] == "finished" and states["001-fedavg"]["state"] == "stopped", states
    assert states["001-fedavg"]["round"] == 1

    good, stopped = out / "trials" / "000-fedavg", out / "trials" / "001-fedavg"
    assert json.loads((good / "status.json").read_text())["completed_rounds"] == 3
    # The stopped run is consistent at round 1: status, checkpoint and metrics say the same.
    status = json.loads((stopped / "status.json").read_text())
    assert status["completed_rounds"] == 1 and status["checkpoint_round"] == 1
    assert checkpoint.load(stopped)["round"] == 1
    assert sorted(set(metrics.load(stopped)["round"].to_list())) == [1]
    code, report, err = cli(capsys, "metrics", str(stopped), "--json")
    assert code == 0, err
    # ASHA's decision matches the numbers: the stopped trial's val accuracy at round 1 was lower.
    val1 = {d.name: metrics.summarize(metrics.load(d), split="val", round=1).filter(pl.col("cohort") == "seen")
            ["acc_mean"][0] for d in (good, stopped)}
    assert val1["001-fedavg"] < val1["000-fedavg"]

    code, stdout, err = cli(capsys, "compare", str(out), "--json")
    assert code == 0, err
    result = json.loads(stdout)
    assert {t["trial"]: (t["state"], t["rounds"]) for t in result["trials"]} == {
        "000-fedavg": ("finished", 3), "001-fedavg": ("stopped", 1)}
    (group,) = result["groups"]
    assert group["config"] == {"algorithm.lr": 0.1} and group["all_finished"]  # the stopped one cannot win
    code, stdout, err = cli(capsys, "compare", str(out))
    assert code == 0 and "001-fedavg stopped 1 rounds" in stdout and "000-fedavg finished 3 rounds" in stdout, stdout


def _stopped_sweep(store: str) -> str:
    from tests.cli.test_signals import EXPERIMENT

    return EXPERIMENT.format(store=store, backend="ray") + '[sweep.grid]\n"run.seed" = [0, 1]\n'


@pytest.mark.slow
def test_sigterm_stops_the_sweep_and_resume_finishes_it(ray_session, engine_store, tmp_path, capsys):
    """SIGTERM (what `timeout`, Slurm and Kubernetes send) to a sweep driver mid-trial: exit 143 with the
    resume line and no Ray stack dump, the running trials marked "interrupted" (state.json and their
    status.json), and `simfed sweep --resume` finishes them with the numbers of a plain launch."""
    from simfed.engine.raybackend import release_pool

    release_pool()
    spec = tmp_path / "sweep.toml"
    spec.write_text(_stopped_sweep(engine_store))
    out = tmp_path / "sw"
    address = ray_session.get_runtime_context().gcs_address
    proc = driver("sweep", str(spec), "--out", str(out), "--address", address, "--max-concurrent", "1")
    deadline = time.time() + 900
    while True:  # a trial mid-run: its first checkpoint written, its last round not reached
        st = [json.loads(p.read_text()) for p in out.glob("trials/*/status.json")] if out.exists() else []
        if any(s.get("state") == "running" and 1 <= s.get("checkpoint_round", 0) < s["rounds"] for s in st):
            break
        assert proc.poll() is None and time.time() < deadline, proc.communicate()[1][-3000:]
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 143, stderr[-3000:]
    assert stderr.strip().splitlines()[-1] == f"simfed: interrupted; continue with: simfed sweep --resume {out}"
    assert "SIGTERM received" not in stderr and "Traceback" not in stderr, stderr[-3000:]
    states = json.loads((out / "state.json").read_text())
    stopped = [i for i, v in states.items() if v["state"] == "interrupted"]
    assert stopped and not [i for i, v in states.items() if v["state"] == "running"], states
    for i in stopped:
        assert json.loads((out / "trials" / i / "status.json").read_text())["state"] == "interrupted"

    proc = driver("sweep", "--resume", str(out), "--address", address)
    stdout, stderr = proc.communicate(timeout=1200)
    assert proc.returncode == 0, stderr[-3000:]
    assert all(v["state"] == "finished" for v in json.loads((out / "state.json").read_text()).values())
    code, _, err = cli(capsys, "launch", str(out / "trials" / stopped[0] / "config.toml"), "--out",
                       str(tmp_path / "plain"), "-q")
    assert code == 0, err
    assert _rows(out / "trials" / stopped[0]).equals(_rows(tmp_path / "plain"))
