"""SIGTERM and SIGHUP stop `simfed launch` as Ctrl-C does, through the real CLI (engine.signals).

A Ray run (the driver joins the session's cluster, so its core worker and `ray.init` install their
own handlers, which used to dump stacks and exit 134) gets SIGTERM mid-run, its resume gets
SIGTERM again, and a last resume ends with the per-client numbers of an undisturbed run. Each stop:
exit 143, the one "interrupted" line on stderr and nothing else, status "interrupted", no temporary
file left. SIGHUP does the same on the serial backend with exit 129.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.engine.conftest import make_exp, numbers

ROUNDS = 8


EXPERIMENT = """
[data]
path = "{store}"
[run]
rounds = %d
clients_per_round = 6
eval_every = 2
checkpoint_every = 1
[algorithm]
name = "fedavg"
local_steps = 8
[engine]
backend = "{backend}"
workers = 1
""" % ROUNDS


def write_exp(tmp_path: Path, store: str, backend: str, name: str = "exp.toml") -> Path:
    path = tmp_path / name
    path.write_text(EXPERIMENT.format(store=store, backend=backend))
    return path


def status(run_dir: Path) -> dict:
    try:
        return json.loads((run_dir / "status.json").read_text())
    except (OSError, ValueError):  # not written yet
        return {}


def stop_after(args: list[str], run_dir: Path, sig: int, past: int) -> subprocess.CompletedProcess:
    """Run `simfed ARGS`, send `sig` once the run is running with a checkpoint beyond round `past`."""
    proc = subprocess.Popen([sys.executable, "-m", "simfed.cli.main", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, stdin=subprocess.DEVNULL)
    deadline = time.time() + 600
    while True:
        st = status(run_dir)
        if st.get("state") == "running" and st.get("checkpoint_round", 0) > past:
            break
        assert proc.poll() is None and time.time() < deadline, proc.communicate()[1][-3000:]
        time.sleep(0.02)
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=300)
    return subprocess.CompletedProcess(args, proc.returncode, out, err)


def assert_interrupted(proc: subprocess.CompletedProcess, run_dir: Path, code: int, resumed: bool = False) -> int:
    assert proc.returncode == code, proc.stderr[-3000:]
    # Only our lines: no Ray "*** SIGTERM received ***" stack dump, no C++ warning, no traceback.
    lines = proc.stderr.strip().splitlines()
    if resumed:
        assert lines[0].startswith(f"simfed: resuming {run_dir} from its checkpoint after round "), lines
        lines = lines[1:]
    assert lines == [f"simfed: interrupted; continue with: simfed launch --resume {run_dir}"], proc.stderr
    st = status(run_dir)
    assert st["state"] == "interrupted" and st["checkpoint_round"] < ROUNDS
    assert not [p for p in run_dir.rglob("*") if p.name.endswith(".tmp")]  # stopped at a safe point
    return st["checkpoint_round"]


@pytest.mark.slow
def test_sigterm_during_a_run_and_its_resume_then_resume_equals_undisturbed(ray_session, engine_store, tmp_path):
    from simfed.engine.loop import run_experiment
    from simfed.engine.raybackend import release_pool

    release_pool()  # earlier tests' pooled actors would hold the CPU this driver's worker needs
    address = ray_session.get_runtime_context().gcs_address
    exp = write_exp(tmp_path, engine_store, "ray")
    run_dir = tmp_path / "run"
    first = stop_after(["launch", str(exp), "--out", str(run_dir), "-q", "--address", address], run_dir,
                       signal.SIGTERM, past=0)
    done = assert_interrupted(first, run_dir, 143)
    again = stop_after(["launch", "--resume", str(run_dir), "-q", "--address", address], run_dir, signal.SIGTERM,
                       past=done)
    assert assert_interrupted(again, run_dir, 143, resumed=True) > done
    last = subprocess.run([sys.executable, "-m", "simfed.cli.main", "launch", "--resume", str(run_dir), "-q",
                           "--address", address], capture_output=True, text=True, timeout=600)
    assert last.returncode == 0, last.stderr[-3000:]
    assert status(run_dir)["state"] == "finished"
    reference = tmp_path / "undisturbed"  # serial == Ray, bit for bit (test_method_parity)
    run_experiment(make_exp(engine_store, rounds=ROUNDS, clients_per_round=6, eval_every=2, local_steps=8),
                   reference)
    assert numbers(run_dir).equals(numbers(reference))


def test_sighup_on_the_serial_backend_exits_129_resumable(engine_store, tmp_path):
    exp = write_exp(tmp_path, engine_store, "serial")
    run_dir = tmp_path / "run"
    proc = stop_after(["launch", str(exp), "--out", str(run_dir), "-q"], run_dir, signal.SIGHUP, past=0)
    assert_interrupted(proc, run_dir, 129)


@pytest.mark.parametrize("sig, code", [(signal.SIGTERM, 143), (signal.SIGHUP, 129), (signal.SIGINT, 130)])
def test_a_signal_inside_a_safe_point_waits_for_its_end(sig, code):
    """engine.signals in-process: outside a deferred block a signal raises at once; inside, when the
    block ends; the exit code is 128 + the signal."""
    from simfed.engine import signals

    with signals.handled():
        with pytest.raises(signals.Interrupted) as raised:
            os.kill(os.getpid(), sig)
            time.sleep(1)
        assert signals.exit_code(raised.value) == code
        steps = []
        with pytest.raises(signals.Interrupted):
            with signals.deferred():
                os.kill(os.getpid(), sig)
                time.sleep(0.2)
                steps.append("finished the write")
        assert steps == ["finished the write"]
    assert signal.getsignal(sig) is not signals._handler  # the previous handler is back
