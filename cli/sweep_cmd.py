"""`simfed sweep` (a grid of runs on Ray Tune) and `simfed compare` (the paper table from it).

A sweep directory holds `sweep.toml` (the file as given), `sweep.json` (every trial: id, the
keys the sweep set, the resolved experiment), `state.json` (each trial's state), one ordinary
run directory per trial under `trials/`, Ray Tune's own records under `tune/`, and, after
`simfed compare`, `compare.parquet` (one row per trial x cohort).
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Optional

import typer

from simfed.core.config import load_toml, to_toml
from simfed.core.errors import SimfedError

MAX_TRIALS = 200  # larger sweeps need --yes: a typo in a grid should not start thousands of runs


def _write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _load_trials(sweep_dir: Path):
    from simfed.engine import config as expcfg
    from simfed.sweeps.config import Trial
    from simfed.sweeps.sweep import SchedulerConfig

    info = load_record(sweep_dir)
    saved = sweep_dir / "sweep.json"
    check_trial_records(sweep_dir, info, with_state=True)
    try:
        trials = [Trial(id=t["id"], overrides=t["overrides"], doc=t["doc"],
                        experiment=expcfg.parse(t["doc"], f"{saved} trial {t['id']}")) for t in info["trials"]]
        return trials, SchedulerConfig(**info["scheduler"])
    except (ValueError, KeyError, TypeError) as exc:
        raise SimfedError(f"{saved}: not a sweep record ({exc}); restore it or start the sweep again "
                          "with simfed sweep FILE --out NEW_DIR") from None


def _json_object(path: Path, fix: str) -> dict:
    """A JSON object from `path`, or one line saying what is wrong with the file and how to fix it."""
    try:
        text = path.read_text()
    except OSError as exc:
        raise SimfedError(f"{path}: cannot read ({exc.strerror or exc}); {fix}") from None
    try:
        obj = json.loads(text)
    except ValueError as exc:
        what = "empty" if not text.strip() else f"truncated or invalid JSON ({getattr(exc, 'msg', exc)}, " \
                                                f"line {getattr(exc, 'lineno', '?')})"
        raise SimfedError(f"{path}: {what}; {fix}") from None
    if not isinstance(obj, dict):
        raise SimfedError(f"{path}: not a JSON object but {type(obj).__name__}; {fix}")
    return obj


def load_record(sweep_dir: Path) -> dict:
    """sweep.json of `sweep_dir`, checked for the shape `simfed sweep` writes. A missing directory,
    a run directory, any other directory and a damaged record each get their own one-line error:
    the commands that read a sweep must never meet a half-written or foreign file in a traceback."""
    start_again = "start the sweep again with simfed sweep FILE --out NEW_DIR"
    if not sweep_dir.exists():
        raise SimfedError(f"{sweep_dir}: no such directory; pass the directory `simfed sweep` printed")
    if not sweep_dir.is_dir():
        raise SimfedError(f"{sweep_dir}: not a directory; pass the sweep directory `simfed sweep` printed")
    saved = sweep_dir / "sweep.json"
    if not saved.is_file():
        if (sweep_dir / "status.json").exists() or (sweep_dir / "checkpoint.pt").exists():
            raise SimfedError(f"{sweep_dir}: a run directory, not a sweep (no sweep.json); use simfed metrics "
                              f"{sweep_dir} or simfed launch --resume {sweep_dir}")
        raise SimfedError(f"{sweep_dir}: not a sweep directory (no sweep.json); pass the directory `simfed sweep` "
                          "printed")
    info = _json_object(saved, f"the sweep record is damaged: restore it, or {start_again}")
    trials, sched = info.get("trials"), info.get("scheduler")
    problem = ""
    if not isinstance(trials, list) or not trials:
        problem = "no list of trials"
    elif not isinstance(sched, dict):
        problem = "no scheduler table"
    else:
        for t in trials:
            tid = t.get("id") if isinstance(t, dict) else None
            # ids name directories under trials/: one plain path component, as sweep_config writes them
            if not isinstance(tid, str) or not tid or tid in (".", "..") or "/" in tid or "\\" in tid or "\0" in tid:
                problem = f"trial id {tid!r} is not a directory name"
                break
            doc = t.get("doc")
            if not isinstance(t.get("overrides"), dict) or not isinstance(doc, dict) \
                    or not isinstance(doc.get("run"), dict) or not isinstance(doc["run"].get("seed"), int):
                problem = f"trial {tid} lacks its overrides or its experiment"
                break
    if problem:
        raise SimfedError(f"{saved}: not a sweep record ({problem}); restore it, or {start_again}")
    return info


def check_trial_records(sweep_dir: Path, info: dict, with_state: bool) -> None:
    """Every JSON file the sweep commands read besides sweep.json: each trial's status.json and
    trial.json and (for --resume) state.json. Absent is fine (a trial not started yet); present but
    damaged (a crash mid-write on a filesystem without atomic rename, a hand edit) is an error."""
    resume = f"simfed sweep --resume {sweep_dir}"
    if with_state and (sweep_dir / "state.json").exists():
        _json_object(sweep_dir / "state.json", f"delete it and run {resume}: the trial states are rebuilt from each "
                                                "trial's status.json (trials ASHA stopped then run again)")
    for t in info["trials"]:
        run_dir = sweep_dir / "trials" / t["id"]
        if (run_dir / "status.json").exists():
            _json_object(run_dir / "status.json", f"delete it and run {resume}: the trial then continues from its "
                                                  "last checkpoint")
        if (run_dir / "trial.json").exists():
            fix = "delete it (it only records the trial's attempts and wall time)"
            record = _json_object(run_dir / "trial.json", fix)
            attempts = record.get("attempts", [])
            walls_ok = isinstance(attempts, list) and all(
                isinstance(a, dict) and isinstance(a.get("wall_s"), (int, float, type(None))) for a in attempts)
            if not walls_ok:
                raise SimfedError(f"{run_dir / 'trial.json'}: not a trial record (attempts); {fix}")


class _Console:
    def __init__(self, quiet: bool, describe):
        self.quiet = quiet
        self.describe = describe

    def __call__(self, event: dict) -> None:
        if event["type"] == "plan":
            done = event["total"] - len(event["todo"])
            typer.echo(f"{event['total']} trials: {len(event['todo'])} to run" +
                       (f", {done} finished earlier (not rerun)" if done else ""), err=True)
        elif event["type"] == "trial" and not (self.quiet and event["state"] == "running"):
            c = event["counts"]
            extra = ""
            if event.get("val_acc") is not None:
                extra = f", val {event['val_acc']:.4f} at round {event.get('round')}"
            if event.get("error"):
                extra = f": {event['error']}"
            typer.echo(f"[{c['finished'] + c['stopped']}/{event['total']} done, {c['running']} running, "
                       f"{c['failed']} failed] {event['trial']} ({self.describe(event['trial'])}) "
                       f"{event['state']}{extra}", err=True)


def _trials(sweep_file: Optional[str], out: Optional[str], resume: Optional[str], yes: bool):
    """(sweep directory, trials, scheduler): a new sweep's from its file, or a resumed one's saved trials."""
    from simfed.sweeps import config as sweep_config

    if resume:
        if sweep_file:
            raise SimfedError("--resume takes the sweep's saved trials; drop the sweep file")
        return Path(resume), *_load_trials(Path(resume))
    if not sweep_file:
        raise SimfedError("give a sweep file (an experiment file plus [sweep]; see examples/table1_fmnist.toml) "
                          "or --resume SWEEP_DIR")
    spec = sweep_config.parse_sweep(load_toml(sweep_file), sweep_file)
    if len(spec.trials) > MAX_TRIALS and not yes:
        raise SimfedError(f"{sweep_file}: the sweep has {len(spec.trials)} trials (more than {MAX_TRIALS}); "
                          "pass --yes to run it anyway, or shrink the grid")
    sweep_dir = Path(out) if out else Path("sweeps") / f"{Path(sweep_file).stem}-{time.strftime('%Y%m%d-%H%M%S')}"
    if (sweep_dir / "sweep.json").exists():
        raise SimfedError(f"{sweep_dir} already holds a sweep; continue it with --resume {sweep_dir} "
                          "or pick another --out")
    return sweep_dir, spec.trials, spec.scheduler


def _write_sweep(sweep_dir: Path, sweep_file: str, trials, scheduler) -> None:
    """Each trial's run directory with its config, sweep.toml (the file as given) and sweep.json."""
    from simfed.engine import config as expcfg

    for t in trials:
        run_dir = sweep_dir / "trials" / t.id
        run_dir.mkdir(parents=True, exist_ok=True)
        _write(run_dir / "config.json", json.dumps(t.doc, indent=2))
        _write(run_dir / "config.toml", to_toml(t.doc, expcfg.TOML_ORDER))
    shutil.copyfile(sweep_file, sweep_dir / ".sweep.toml.tmp")
    os.replace(sweep_dir / ".sweep.toml.tmp", sweep_dir / "sweep.toml")
    record = {"version": 1, "source": str(sweep_file), "scheduler": scheduler.__dict__,
              "trials": [{"id": t.id, "overrides": t.overrides, "doc": t.doc} for t in trials]}
    _write(sweep_dir / "sweep.json", json.dumps(record, indent=2))


def sweep(
    sweep_file: Optional[str] = typer.Argument(None, help="Sweep TOML: an experiment file plus a [sweep] table."),
    address: Optional[str] = typer.Option(None, "--address", help="Ray cluster: 'auto' or HOST:PORT of the head."),
    out: Optional[str] = typer.Option(None, "--out", help="Sweep directory (default sweeps/<file>-<time>)."),
    resume: Optional[str] = typer.Option(None, "--resume", help="Continue the sweep in this directory."),
    max_concurrent: Optional[int] = typer.Option(None, "--max-concurrent", help="At most N trials at once."),
    yes: bool = typer.Option(False, "--yes", help=f"Allow more than {MAX_TRIALS} trials."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Only finished/failed trials on the console."),
) -> None:
    """Run a grid of methods, hyperparameters and seeds as Ray Tune trials; prints the sweep directory."""
    from simfed import plots
    from simfed.engine import cluster, shared, signals, tracking
    from simfed.engine.plan import check_experiment
    from simfed.sweeps import config as sweep_config
    from simfed.sweeps.sweep import TrialSpec, run_sweep

    if max_concurrent is not None and max_concurrent < 1:
        raise SimfedError(f"--max-concurrent {max_concurrent}: give at least 1 (or leave it out: as many as fit)")
    sweep_dir, trials, scheduler = _trials(sweep_file, out, resume, yes)
    # Bad stores, methods that do not fit the data, cohorts too large: before anything runs; on a
    # cluster, also whether every node reads each store and reaches engine.storage.
    stores = {(check_experiment(t.experiment).store.path, t.experiment.algorithm, t.experiment.engine.storage): t
              for t in trials}
    tracking.require(trials[0].experiment.run.track)
    by_id = {t.id: t for t in trials}
    cluster.connect(address or "", on_note=lambda text: typer.echo(f"simfed: note: {text}", err=True))
    for (path, _, _), t in stores.items():
        shared.check_nodes(t.experiment, path)
    if not resume:
        _write_sweep(sweep_dir, sweep_file, trials, scheduler)
    typer.echo(str(sweep_dir))
    console = _Console(quiet, lambda tid: sweep_config.describe(by_id[tid]))
    try:
        states = run_sweep(sweep_dir, [TrialSpec(t.id, t.experiment) for t in trials], scheduler,
                           max_concurrent=max_concurrent, on_event=console, artifacts=plots.artifact)
    except KeyboardInterrupt as exc:  # Ctrl-C, SIGTERM or SIGHUP (engine.signals)
        _stop_trials(sweep_dir, [t.id for t in trials])
        sys.stderr.write(f"simfed: interrupted; continue with: simfed sweep --resume {sweep_dir}\n")
        raise SystemExit(signals.exit_code(exc))
    counts = {s: sum(1 for v in states.values() if v == s) for s in ("finished", "stopped", "failed", "pending")}
    typer.echo(f"{counts['finished']} finished, {counts['stopped']} stopped early, {counts['failed']} failed, "
               f"{counts['pending']} not run; table: simfed compare {sweep_dir}", err=True)
    if counts["failed"] or counts["pending"]:
        typer.echo(f"rerun the rest with: simfed sweep --resume {sweep_dir}", err=True)
        raise SystemExit(1)


def _stop_trials(sweep_dir: Path, ids: list[str]) -> None:
    """End the trials' processes (leaving Ray ends this driver's job and its actors) and mark the runs
    they left "interrupted"; a second signal meanwhile skips the wait."""
    from simfed.engine import cluster
    from simfed.sweeps.sweep import settle_interrupted

    cluster.disconnect()
    settle_interrupted(sweep_dir, ids)


def _pm(stat: dict, scale: float = 100.0, digits: int = 2) -> str:
    if stat["std"] is None:
        return f"{scale * stat['mean']:.{digits}f}"
    return f"{scale * stat['mean']:.{digits}f} ± {scale * stat['std']:.{digits}f}"


def compare(
    sweep_dir: str = typer.Argument(..., help="A sweep directory."),
    by: str = typer.Option("algorithm.name", "--by", help="Group trials by this key (one table row each)."),
    select: str = typer.Option("val", "--select", help="Choose each group's configuration on this split: val or test."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """Per method: the configuration with the best mean validation accuracy over seeds, and its test
    accuracy per cohort as mean ± std over seeds; writes SWEEP_DIR/compare.parquet."""
    from simfed.sweeps import compare as cmp

    if select not in ("val", "test"):
        raise SimfedError(f"--select {select!r}: use val (choose on validation, the honest default) or test")
    path = Path(sweep_dir)
    info = load_record(path)
    check_trial_records(path, info, with_state=False)
    rows = cmp.trial_rows(path, info["trials"], by=by, select=select)
    if rows.height == 0:
        raise SimfedError(f"{sweep_dir}: no trial has test metrics yet; run or resume the sweep first")
    result, rows = cmp.table(rows)
    cmp.write_parquet(rows, path / "compare.parquet")
    if as_json:
        typer.echo(json.dumps({"sweep_dir": str(path), "by": by, "select": select, "std": "sample (n - 1)",
                               "groups": result, "trials": cmp.trial_list(rows),
                               "parquet": str(path / "compare.parquet")}, indent=2))
        return
    typer.echo(f"{path}: chosen on seen-client {select} accuracy; test accuracy (%), mean ± std over seeds")
    head = f"{by:16} {'cohort':7} {'seeds':>5} {'acc_mean':>15} {'acc_p10':>15} {'acc_worst10':>15} {'rounds':>7} {'wall_s':>8}"
    typer.echo(head)
    for g in result:
        for cohort, c in g["cohorts"].items():
            typer.echo(f"{g['group']:16} {cohort:7} {c['acc_mean']['n']:>5} {_pm(c['acc_mean']):>15} "
                       f"{_pm(c['acc_p10']):>15} {_pm(c['acc_worst10']):>15} {c['rounds']['mean']:>7.0f} "
                       f"{c['wall_s']['mean']:>8.1f}")
    for g in result:
        cfg = ", ".join(f"{k}={v}" for k, v in g["config"].items()) or "(only seeds)"
        note = "" if g["all_finished"] else " (not every seed finished)"
        typer.echo(f"{g['group']}: {cfg}; {select} {100 * g['select_score']:.2f}%{note}")
    # Every trial's rounds: a trial ASHA stopped shows how far it got (it never wins a group
    # while a configuration whose trials all finished exists).
    typer.echo("trials: " + "; ".join(f"{t['trial']} {t['state']} {t['rounds']} rounds" for t in cmp.trial_list(rows)))
    typer.echo(f"rows: {path / 'compare.parquet'}")


def register(app: typer.Typer) -> None:
    app.command("sweep")(sweep)
    app.command("compare")(compare)
