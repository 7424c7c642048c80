"""simfed from Python: `launch` runs an experiment as `simfed launch` does; `load_run` (results.py)
reads a run.

    import simfed
    run_dir = simfed.launch("examples/quickstart.toml", overrides=["run.rounds=2"])
    run = simfed.load_run(run_dir)
    run.metrics()   # polars DataFrame: one row per client, round, phase and split
    run.curve()     # accuracy and loss per evaluation round, split and cohort

Bad input raises `SimfedError` with the one-line message the command prints; nothing is written
and no Ray is started before every check has passed, but for the store's checksums, checked while
Ray starts (a mismatch stops the Ray this call started, before anything is written). The command
line is a thin layer over this module: it adds option parsing, the progress bar and printing.
"""

from __future__ import annotations

import copy
import json
import os
import time
import tomllib
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from simfed.core import validate
from simfed.core.config import apply_overrides, load_toml
from simfed.core.errors import SimfedError
from simfed.core.safeio import local_path
from simfed.results import saved_config

Event = Callable[[dict], None]
Config = str | os.PathLike | Mapping[str, Any] | None


def quickstart_text() -> str:
    """The default experiment (`launch()` with no config): FedAvg on a generated synthetic FEMNIST."""
    from importlib import resources

    return resources.files("simfed").joinpath("quickstart.toml").read_text()


def launch(config: Config = None, *, out: str | os.PathLike | None = None, overrides: Sequence[str] = (),
           resume: str | os.PathLike | None = None, address: str | None = None, verify: bool = True,
           on_event: Event | None = None, progress: bool = False) -> Path:
    """Run an experiment to its end, as `simfed launch` does; returns the run directory.

    config: an experiment TOML file, a dict with the file's tables ({"data": {...}, "run": {...},
        "algorithm": {"name": ..., ...}, "engine": {...}}), or None for the quickstart.
    out: the run directory (default: runs/<run.name>, else runs/<algorithm>-<date>-<time>).
    overrides: "section.key=value" items applied in order, as `--set`.
    resume: a run directory to continue from its last checkpoint, with its saved config (give no
        config and no overrides); a finished run is left as it is.
    address: the Ray cluster to join ("auto" or HOST:PORT), as engine.address.
    verify: check the store's sha256 checksums before starting (sizes are always checked).
    on_event: called with each progress event, a dict with a "type": "note" (an override dropped
        keys), "generate", "resume", "already_finished", "timing" (Ray's start), "run_dir" (written,
        about to start), "eval_plan" (the clients each evaluation covers), "startup" (seconds of the
        checks, Ray's start, the pool's start and its warm-up), "start" (with "privacy" under [privacy]), "chunk", "round"
        (with the clients, their mean training loss and "epsilon" under [privacy]), "eval_start", "eval_chunk", "eval", "checkpoint",
        "saved", "server_restart", and last "done" (the result: summary, retries, dropped, ...).
        With `[run] track`, the trackers (simfed.engine.tracking) see the same events.
    progress: draw a progress bar on stderr while [data] generate builds the store.

    With engine.backend = "ray" Ray is started on this machine, or joined, and stays up for the next
    launch in this process (`ray.shutdown()` ends it). Raises SimfedError (one line) for bad input,
    RunFailed when the run cannot go on (its last checkpoint stands: resume it).
    """
    emit = _Startup(on_event or (lambda e: None))
    for flag, value in (("--out", out), ("--resume", resume), ("--address", address)):
        if value is not None:
            validate.text(flag, os.fspath(value) if isinstance(value, os.PathLike) else value)
    for flag, value in (("--out", out), ("--resume", resume)):
        if value is not None:  # run directories are local: a URI or a symlink loop is one line
            local_path(flag, value)
    if resume is not None:
        if config is not None or overrides:
            raise SimfedError("--resume takes the run's saved config; drop the experiment file and --set")
        return _resume(resume, address, verify, emit, progress)
    exp = _experiment(config, overrides, address, emit)
    from simfed.engine import checkpoint, rundir

    target = Path(out) if out else Path("runs") / (exp.run.name or ".")
    if target.exists() and not target.is_dir():
        raise SimfedError(f"--out {target}: exists and is not a directory; pick another --out")
    if (target / checkpoint.NAME).exists():
        raise SimfedError(f"{target} already holds a run; resume it with --resume {target} or pick another --out")
    _check_writable(target)
    plan = _prepare(exp, emit, verify, progress)
    run_dir = _run_dir(exp, out)
    with rundir.hold(run_dir):  # a second launch or resume into this directory is refused meanwhile
        if (run_dir / checkpoint.NAME).exists():
            raise SimfedError(f"{run_dir} already holds a run; resume it with --resume {run_dir} or pick another "
                              "--out")
        _write_config(run_dir, exp)
        result = _run(exp, run_dir, plan, False, emit)
    emit({"type": "done", **result})
    return run_dir


def _experiment(config: Config, overrides: Sequence[str], address: str | None, emit: Event):
    """The typed experiment of `config` with `overrides` applied (their notes emitted)."""
    if config is None:
        doc, where = tomllib.loads(quickstart_text()), "quickstart"
    elif isinstance(config, Mapping):
        doc, where = copy.deepcopy(dict(config)), "config"
    elif isinstance(config, (str, os.PathLike)):
        where = os.fspath(config)
        doc = load_toml(where)
    else:
        raise SimfedError(f"config must be a TOML file's path, a dict or None, got {type(config).__name__}")
    notes: list[str] = []
    doc = apply_overrides(doc, [overrides] if isinstance(overrides, str) else list(overrides), notes)
    exp = _parse(doc, address, where)  # a misspelled method fails here: no note about dropped keys first
    for note in notes:
        emit({"type": "note", "message": note})
    return exp


def _parse(doc: dict, address: str | None, where: str):
    from simfed.engine import config as expcfg

    if address is not None:
        if not isinstance(doc.setdefault("engine", {}), dict):
            raise SimfedError("[engine] must be a table")
        doc["engine"]["address"] = address
    return expcfg.parse(doc, where)


def _resume(resume: str | os.PathLike, address: str | None, verify: bool, emit: Event, progress: bool) -> Path:
    from simfed.engine import metrics, rundir

    run_dir = Path(resume)
    if not run_dir.is_dir():
        raise SimfedError(f"--resume {os.fspath(resume)}: not a run directory; pass the directory `simfed launch` "
                          "printed")
    doc = saved_config(run_dir, f"--resume {run_dir}: no config.json there; pass the directory `simfed launch` "
                                 "printed")
    exp = _parse(doc, address, str(run_dir / "config.json"))
    with rundir.hold(run_dir):  # a run still going (its owner alive) is refused first
        done = _resume_round(run_dir, exp)
        if done == exp.run.rounds:  # finished: said so, without opening the data or starting Ray
            emit({"type": "already_finished", "run_dir": str(run_dir), "round": done, "rounds": done,
                  "summary": metrics.summarize(metrics.load(run_dir)).to_dicts()})
            return run_dir
        plan = _prepare(exp, emit, verify, progress, resume_dir=run_dir)
        emit({"type": "resume", "run_dir": str(run_dir), "round": done, "rounds": exp.run.rounds})
        result = _run(exp, run_dir, plan, True, emit)
    emit({"type": "done", **result})
    return run_dir


def _resume_round(run_dir: Path, exp) -> int:
    """The round a resumed run restarts after (run.rounds: it is finished)."""
    from simfed.engine import checkpoint

    ckpt = checkpoint.load(run_dir)
    if ckpt is None:
        raise SimfedError(f"{run_dir}: no checkpoint to resume from (it is written every run.checkpoint_every "
                          "rounds); start it again without --resume")
    done, total = int(ckpt["round"]), exp.run.rounds
    if done > total:
        raise SimfedError(f"{run_dir}: checkpoint round {done} is beyond the run's {total} rounds; the run directory "
                          "is damaged: restore checkpoint.pt or start a new run")
    return done


def _prepare(exp, emit: Event, verify: bool, progress: bool, resume_dir: Path | None = None):
    """Every check before work, in order: the machine, the store and method (and the run to resume),
    then Ray (started or joined, the store's checksums checked meanwhile) and the pool against it.
    Returns the engine's plan."""
    from simfed.engine import address, cluster, resources, tracking
    from simfed.engine.plan import check_experiment

    if exp.engine.backend == "ray":  # before Ray starts: the address answers as Ray, or Ray and the pool fit here
        if exp.engine.address == "":
            cluster.ray_floor(embedded=True)
            resources.check(exp.engine, resources.local_resources(), "this machine")
        else:
            address.resolve(exp.engine.address)
    plan = check_experiment(exp, emit, resume_dir, progress=progress)
    tracking.require(exp.run.track)
    if exp.engine.backend != "ray":
        if verify:
            plan.store.verify()
        return plan
    # The checksum pass reads every byte of the store and mostly waits on disk and hashlib, which
    # release the GIL: it runs while Ray starts, instead of before. Ray itself must start on the
    # main thread (its processes die with the thread that started them).
    from concurrent.futures import ThreadPoolExecutor

    t0 = time.perf_counter()
    with ThreadPoolExecutor(1, thread_name_prefix="simfed-verify") as pool:
        checking = pool.submit(plan.store.verify) if verify else None
        try:
            started = _connect(exp, emit, plan.store.path)
        finally:
            failure = checking.exception() if checking else None  # waits for the pass to end
    if failure is not None:
        if started:
            cluster.disconnect()
        raise failure
    emit({"type": "timing", "step": "ray_start", "seconds": time.perf_counter() - t0})
    return plan


def _connect(exp, emit: Event, store_path: str) -> bool:
    """Start or join Ray (True when this call started it); the pool must fit the cluster, and on
    several nodes every node must read the store and reach engine.storage (an unreachable, too small
    or unshared one fails before anything is written, and a Ray this call started is stopped again)."""
    import ray

    from simfed.engine import cluster, resources, shared

    started = cluster.connect(exp.engine.address, on_note=lambda text: emit({"type": "note", "message": text}))
    try:
        resources.check(exp.engine, ray.cluster_resources(), f"the Ray cluster at {exp.engine.address or 'this machine'}")
        shared.check_nodes(exp, store_path)
    except SimfedError:
        if started:
            cluster.disconnect()
        raise
    return started


def _run(exp, run_dir: Path, plan, resume: bool, emit: Event) -> dict:
    from simfed.engine import noise, tracking
    from simfed.engine.loop import run_experiment

    emit({"type": "run_dir", "run_dir": str(run_dir), "resume": resume})
    emit(eval_plan(exp, plan))
    start = int(plan.checkpoint["round"]) if resume and plan.checkpoint else 0
    with tracking.open_trackers(exp, run_dir, start, artifacts=_plot_artifact) as track:
        def both(event: dict) -> None:
            track(event)
            emit(event)

        with noise.attach(run_dir):  # Ray's start-up output and library warnings: RUN_DIR/simfed.log
            return run_experiment(exp, run_dir, resume=resume, on_event=both, plan=plan)


def eval_plan(exp, plan) -> dict:
    """The "eval_plan" event: how many clients each evaluation covers per cohort, against the clients
    of a training round (a progress display estimates and warns from it)."""
    run = exp.run

    def covered(ids) -> int:
        return len(ids) if run.eval_clients <= 0 else min(run.eval_clients, len(ids))

    return {"type": "eval_plan", "seen": covered(plan.seen), "unseen": covered(plan.unseen),
            "seen_total": len(plan.seen), "unseen_total": len(plan.unseen), "eval_every": run.eval_every,
            "eval_clients": run.eval_clients, "rounds": run.rounds, "clients_per_round": run.clients_per_round}


def _plot_artifact(run_dir: Path) -> list[Path]:
    """The learning-curve PNG a tracker attaches at the end of a run (none without matplotlib)."""
    from simfed import plots

    return plots.artifact(run_dir)


class _Startup:
    """An event listener in front of the caller's: it times the start-up (the checks before Ray,
    Ray's start, the pool's start and its warm-up) and emits it as one "startup" event just before
    the run's "start" event, so that what the time before round 1 goes to is visible."""

    def __init__(self, emit: Event):
        self.emit, self.t0 = emit, time.perf_counter()
        self.steps: dict[str, float] = {}
        self.pool_t0: float | None = None

    def __call__(self, event: dict) -> None:
        kind = event["type"]
        if kind == "timing":
            self.steps[event["step"]] = event["seconds"]
        elif kind == "run_dir":
            self.pool_t0 = time.perf_counter()
        elif kind == "start" and self.pool_t0 is not None:
            now = time.perf_counter()
            warm = max((float(w.get("warmup_s") or 0.0) for w in event.get("workers", [])), default=0.0)
            pool = now - self.pool_t0
            ray_s = self.steps.get("ray_start", 0.0)
            self.emit({"type": "startup", "seconds": now - self.t0, "ray_start": ray_s, "pool_start": pool - warm,
                       "warmup": warm, "checks": self.pool_t0 - self.t0 - ray_s})
            self.pool_t0 = None  # a server restart's "start" is not a start-up
        self.emit(event)


def _check_writable(run_dir: Path) -> None:
    """The run directory exists as a directory, or its nearest existing ancestor is writable."""
    p = run_dir.absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    if not (p.is_dir() and os.access(p, os.W_OK | os.X_OK)):
        raise SimfedError(f"--out {run_dir}: {p} is not a writable directory; pick a writable --out")


def _run_dir(exp, out: str | os.PathLike | None) -> Path:
    """`out`, runs/<run.name>, or a fresh runs/<algorithm>-<date>-<time> (created here)."""
    if out:
        return Path(out)
    if exp.run.name:
        return Path("runs") / exp.run.name
    # A fresh name per launch: two launches within one second get -2, -3, ... (mkdir is atomic).
    base = Path("runs") / f"{exp.algorithm}-{time.strftime('%Y%m%d-%H%M%S')}"
    base.parent.mkdir(parents=True, exist_ok=True)
    for i in range(1, 1000):
        path = base if i == 1 else base.with_name(f"{base.name}-{i}")
        try:
            path.mkdir()
            return path
        except FileExistsError:
            continue
    raise SimfedError(f"runs/: could not find a free name for {base.name}; pass --out")


def _write_config(run_dir: Path, exp) -> None:
    """config.json (what `load_run` and a resume read) and config.toml (to rerun), each written atomically."""
    from simfed.engine import config as expcfg

    for name, text in (("config.json", json.dumps(expcfg.to_dict(exp), indent=2)), ("config.toml", expcfg.to_text(exp))):
        tmp = run_dir / f".{name}.tmp"
        tmp.write_text(text)
        os.replace(tmp, run_dir / name)
