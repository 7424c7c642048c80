"""Run many simfed runs as Ray Tune trials that share one cluster.

One trial = one `run_experiment` in its own ordinary run directory (SWEEP/trials/ID), started by
Ray Tune inside a placement group that reserves the trial's workers (`engine.workers` bundles of
`cpus_per_worker`/`gpus_per_worker`). The trial's driver and its server actor take no CPU slot (as
in `simfed launch`), so the placement group holds exactly the workers' CPUs; `engine.raybackend`
puts the server and worker actors into the current placement group, so concurrent trials never
use more than the cluster has. Every trial's driver runs on the sweep driver's node, which holds
the sweep directory; on a cluster the workers spread over the nodes. A serial-backend trial
reserves one bundle for its in-process work.

After each evaluated round is saved (metrics, checkpoint, status) a trial reports the seen
clients' validation client-mean accuracy (`val_acc`) and the round to Tune, so ASHA
(`SchedulerConfig.name = "asha"`, time in rounds) can stop bad configurations early. Each
trial's state (pending, running, finished, stopped, failed) is kept in SWEEP/state.json (written
atomically); a resumed sweep runs only trials that are neither finished nor stopped, continuing
each from its last checkpoint when it has one. The grid itself is expanded by the CLI
(`simfed.sweeps.config`); Tune gets one trial id per trial.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from simfed.engine.config import Experiment

DONE = ("finished", "stopped")


@dataclass(frozen=True)
class SchedulerConfig:
    name: str = "fifo"  # "fifo": every trial runs to the end; "asha": early stopping on val_acc
    grace_period: int = 1  # rounds before ASHA may stop a trial
    reduction_factor: int = 3


@dataclass(frozen=True)
class TrialSpec:
    id: str
    experiment: Experiment


def trial_bundles(exp: Experiment, driver_node: str) -> list[dict[str, float]]:
    """The placement group of one trial: a head bundle for the trial's driver, with no CPU slot (its
    driver and server take none), and one bundle per worker; a serial trial does its work in the head.
    The head asks for a sliver of `node:<driver_node>`, the resource Ray gives each node for its own
    address: every trial's driver runs on the sweep driver's node, where the sweep directory is,
    while its workers go wherever the cluster has room."""
    eng = exp.engine
    head = {f"node:{driver_node}": 0.001}
    bundle = {"CPU": float(eng.cpus_per_worker)}
    if eng.gpus_per_worker > 0:
        bundle["GPU"] = float(eng.gpus_per_worker)
    if eng.backend == "serial":
        return [{**head, **bundle}]
    return [head] + [dict(bundle) for _ in range(max(1, eng.workers))]


def write_json(path: Path, obj: Any) -> None:
    from simfed.engine import signals

    tmp = path.with_name(f".{path.name}.tmp")
    with signals.deferred():  # the sweep driver stopped by a signal leaves no half-written record
        tmp.write_text(json.dumps(obj, indent=2))
        os.replace(tmp, path)


def read_json(path: Path, default: Any = None) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return default


def run_status(run_dir: Path) -> str:
    return (read_json(run_dir / "status.json") or {}).get("state", "")


def one_line_reason(exc: BaseException) -> str:
    """What a failed trial prints: a SimfedError's message is already what, where and how to fix;
    anything else is a bug and is named by its type (its traceback stays in Tune's error file)."""
    from simfed.core.errors import SimfedError

    text = " ".join(str(exc).split())
    if isinstance(exc, SimfedError):
        return text[:500]
    return f"{type(exc).__name__}: {text}"[:300]


def _new_attempt(record_path: Path, trial: str, pg) -> tuple[dict, dict]:
    """The trial's record (trial.json) with a new attempt appended and written; (record, attempt)."""
    record = read_json(record_path) or {"id": trial, "attempts": []}
    attempt = {"start": time.time(), "end": None, "wall_s": None, "pid": os.getpid(),
               "placement_group": pg.id.hex() if pg else "", "bundles": pg.bundle_specs if pg else [],
               "worker_placement_groups": [], "resumed_from": 0}
    record["attempts"].append(attempt)
    write_json(record_path, record)
    return record, attempt


def _trial_main(config: dict, specs: dict, sweep_dir: str) -> None:
    """The Tune trainable: one simfed run, reporting seen-client validation accuracy per evaluation."""
    import ray
    from ray import tune

    from simfed.engine import tracking
    from simfed.engine.raybackend import release_pool
    from simfed.core.errors import SimfedError
    from simfed.engine.loop import run_experiment

    spec: TrialSpec = specs[config["trial"]]
    run_dir = Path(sweep_dir) / "trials" / spec.id
    record_path = run_dir / "trial.json"
    record, attempt = _new_attempt(record_path, spec.id, ray.util.get_current_placement_group())

    pending: list[dict] = []  # the round's result, until its round is saved

    def on_event(event: dict) -> None:
        if event["type"] == "start":
            attempt["resumed_from"] = event["start_round"]
            attempt["worker_placement_groups"] = [w.get("placement_group", "") for w in event["workers"]]
            write_json(record_path, record)
        elif event["type"] == "round":
            # Every round is reported (trackers plot it; step = timesteps_total = the round); ASHA
            # only acts on the evaluated ones, which carry val_acc.
            pending[:] = [{"round": event["round"], "timesteps_total": event["round"],
                           **tracking.round_scalars(event)}]
        elif event["type"] == "eval" and pending:
            scalars = tracking.eval_scalars(run_dir, event["round"])
            pending[0].update(scalars, val_acc=scalars.get("val/acc_seen", float("nan")),
                              test_acc=scalars.get("test/acc_seen", float("nan")),
                              test_acc_unseen=scalars.get("test/acc_unseen", float("nan")))
        elif event["type"] == "saved" and pending:
            # Reported only once the round's checkpoint and status are written: ASHA stops a trial
            # inside tune.report by ending its process, and the run directory must then hold a
            # valid run of that many rounds (status completed_rounds, checkpoint), which
            # `simfed compare` counts and `simfed launch --resume` continues.
            # The last round's result waits until the run is finished: ASHA also ends a trial
            # that reaches its last rung (max_t), and the run must then say "finished".
            if event["round"] < spec.experiment.run.rounds:
                tune.report(pending.pop())

    resume = (run_dir / "checkpoint.pt").exists()
    try:
        run_experiment(spec.experiment, run_dir, resume=resume, on_event=on_event)
        if pending:
            tune.report(pending.pop())
    except BaseException as exc:
        attempt["error"] = one_line_reason(exc)  # the driver prints this line, not Tune's traceback
        attempt["bug"] = not isinstance(exc, SimfedError)
        raise
    finally:
        release_pool()  # this trial's actors end with it: nothing leaks into the next trial's reservation
        attempt["end"] = time.time()
        attempt["wall_s"] = attempt["end"] - attempt["start"]
        write_json(record_path, record)


class _Tracker:
    """Trial states in SWEEP/state.json plus progress events; fed by a Tune callback."""

    def __init__(self, sweep_dir: Path, ids: list[str], on_event: Callable[[dict], None]):
        self.path = sweep_dir / "state.json"
        self.sweep_dir = sweep_dir
        saved = read_json(self.path) or {}
        self.states = {i: saved.get(i, {"state": "pending"}) for i in ids}
        self.emit = on_event
        self.save()

    def save(self) -> None:
        write_json(self.path, self.states)

    def set(self, tid: str, state: str, **extra) -> None:
        self.states[tid] = {"state": state, **extra}
        self.save()
        counts = {s: sum(1 for v in self.states.values() if v["state"] == s)
                  for s in ("finished", "stopped", "running", "failed", "pending")}
        self.emit({"type": "trial", "trial": tid, "state": state, **extra, "counts": counts,
                   "total": len(self.states)})

    def interrupted(self) -> list[str]:
        """The trials that were running when the sweep was stopped, marked "interrupted" (a resumed
        sweep runs them again from their last checkpoint)."""
        ids = [tid for tid, v in self.states.items() if v["state"] == "running"]
        for tid in ids:
            self.set(tid, "interrupted")
        return ids

    def callback(self):
        from ray.tune import Callback

        tracker = self

        class _Cb(Callback):
            def on_trial_start(self, iteration, trials, trial, **info):
                tracker.set(trial.config["trial"], "running")

            def on_trial_result(self, iteration, trials, trial, result, **info):
                tracker.emit({"type": "result", "trial": trial.config["trial"], "round": result.get("round"),
                              "val_acc": result.get("val_acc")})

            def on_trial_complete(self, iteration, trials, trial, **info):
                tid = trial.config["trial"]
                last = trial.last_result or {}
                done = run_status(tracker.sweep_dir / "trials" / tid) == "finished"
                tracker.set(tid, "finished" if done else "stopped", round=last.get("round"),
                            val_acc=last.get("val_acc"))

            def on_trial_error(self, iteration, trials, trial, **info):
                tid = trial.config["trial"]
                attempts = (read_json(tracker.sweep_dir / "trials" / tid / "trial.json") or {}).get("attempts") or [{}]
                last = attempts[-1] if isinstance(attempts[-1], dict) else {}
                err, bug = last.get("error"), last.get("bug", True)
                if not err:  # the trial died before it could say why (its process was killed)
                    lines = []
                    if trial.error_file and Path(trial.error_file).is_file():
                        lines = [ln for ln in Path(trial.error_file).read_text().splitlines() if ln.strip()]
                    err = lines[-1][:300] if lines else "the trial's process ended without a reason"
                if bug and trial.error_file:
                    err += f" (traceback: {trial.error_file})"
                tracker.set(tid, "failed", error=err)

        return _Cb()


def _pending(sweep_dir: Path, specs: list[TrialSpec], emit: Callable[[dict], None]) -> tuple[_Tracker, list[TrialSpec]]:
    """The sweep's tracker and the trials still to run (now "pending"); the plan event."""
    tracker = _Tracker(sweep_dir, [s.id for s in specs], emit)
    for s in specs:  # a run finished before the driver could record it (killed in between) is done
        if tracker.states[s.id]["state"] not in DONE and run_status(sweep_dir / "trials" / s.id) == "finished":
            tracker.states[s.id] = {"state": "finished"}
    todo = [s for s in specs if tracker.states[s.id]["state"] not in DONE]
    for s in todo:
        tracker.states[s.id] = {"state": "pending"}
    tracker.save()
    emit({"type": "plan", "total": len(specs), "todo": [s.id for s in todo]})
    return tracker, todo


def run_sweep(sweep_dir: str | os.PathLike, specs: list[TrialSpec], scheduler: SchedulerConfig,
              max_concurrent: int | None = None, on_event: Callable[[dict], None] | None = None,
              artifacts: Callable[[Path], list[Path]] | None = None) -> dict:
    """Run every trial of `specs` that is not finished or stopped yet; returns {trial id: state}.
    Ray must be connected. The caller has written each trial's run directory and config. The
    trials' `[run] track` (the first trial's) turns on Tune's tracking callbacks
    (simfed.sweeps.tracking); `artifacts(run_dir)` gives the files to attach to a finished trial."""
    # Tune's default result loggers (CSV, JSON, TensorBoard) duplicate what the run directories hold.
    os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")
    # Trials report every round; only the evaluated rounds carry the scheduler's metric (val_acc).
    os.environ.setdefault("TUNE_DISABLE_STRICT_METRIC_CHECKING", "1")
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")  # with verbose=0: no tables of our own trials on the console
    # Ctrl-C is ours, as SIGTERM and SIGHUP are (engine.signals): Tune's own handler would end fit()
    # as if the sweep were done, with its running trials left "running".
    os.environ.setdefault("TUNE_DISABLE_SIGINT_HANDLER", "1")
    import ray
    from ray import tune

    from simfed.engine.raybackend import release_pool

    emit = on_event or (lambda e: None)
    sweep_dir = Path(sweep_dir).absolute()
    tracker, todo = _pending(sweep_dir, specs, emit)
    if not todo:
        return {k: v["state"] for k, v in tracker.states.items()}

    release_pool()  # actors this process kept from earlier runs would hold CPUs the trials need
    # CRITICAL, not ERROR: Tune logs a failed trial's whole traceback at ERROR; the sweep prints its
    # own line per failed trial (id and reason) and the traceback stays in Tune's error file.
    logging.getLogger("ray.tune").setLevel(logging.CRITICAL)
    logging.getLogger("ray.train").setLevel(logging.ERROR)
    by_id = {s.id: s for s in todo}
    driver_node = ray.util.get_node_ip_address()
    trainable = tune.with_resources(tune.with_parameters(_trial_main, specs=by_id, sweep_dir=str(sweep_dir)),
                                    lambda cfg: tune.PlacementGroupFactory(
                                        trial_bundles(by_id[cfg["trial"]].experiment, driver_node)))
    sched = None
    if scheduler.name == "asha":
        from ray.tune.schedulers import ASHAScheduler

        max_t = max(s.experiment.run.rounds for s in todo)
        sched = ASHAScheduler(time_attr="round", max_t=max_t, grace_period=min(scheduler.grace_period, max_t),
                              reduction_factor=scheduler.reduction_factor)
    tuner = tune.Tuner(
        trainable,
        param_space={"trial": tune.grid_search([s.id for s in todo])},
        tune_config=tune.TuneConfig(metric="val_acc", mode="max", scheduler=sched, reuse_actors=False,
                                    max_concurrent_trials=max_concurrent or None,
                                    trial_name_creator=lambda t: t.config["trial"],
                                    trial_dirname_creator=lambda t: t.config["trial"]),
        run_config=tune.RunConfig(name=f"tune-{time.strftime('%Y%m%d-%H%M%S')}", storage_path=str(sweep_dir / "tune"),
                                  verbose=0, callbacks=[tracker.callback(), *_tracking(sweep_dir, specs, artifacts)],
                                  failure_config=tune.FailureConfig(max_failures=0)),
    )
    try:
        tuner.fit()
    except KeyboardInterrupt:  # a stop signal: the caller ends Ray (and so the trials) and reports
        tracker.interrupted()
        raise
    return {k: v["state"] for k, v in tracker.states.items()}


def settle_interrupted(sweep_dir: str | os.PathLike, ids: list[str], timeout: float = 20.0) -> None:
    """After the trials' processes were ended (Ray shut down): each trial run directory that still says
    "running" says "interrupted" once its owner's lock is free (at most `timeout` seconds in all)."""
    from simfed.engine import rundir

    deadline = time.monotonic() + timeout
    for tid in ids:
        run_dir = Path(sweep_dir) / "trials" / tid
        while rundir.owner_alive(run_dir) and time.monotonic() < deadline:
            time.sleep(0.2)
        status = read_json(run_dir / "status.json")
        if isinstance(status, dict) and status.get("state") == "running" and not rundir.owner_alive(run_dir):
            rundir.write_status(run_dir, {**status, "state": "interrupted"})


def _tracking(sweep_dir: Path, specs: list[TrialSpec], artifacts) -> list:
    """Tune's logger callbacks for the trackers the sweep's experiment names (none: no callback)."""
    run = specs[0].experiment.run
    if not run.track:
        return []
    from simfed.engine import config as expcfg
    from simfed.sweeps import tracking

    configs = {s.id: expcfg.to_dict(s.experiment) for s in specs}
    return tracking.callbacks(sweep_dir, configs, run.track, run.mlflow_uri, artifacts)
