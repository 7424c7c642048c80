"""`simfed launch`: run or resume an experiment, with a progress bar."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import List, Optional

import typer

from simfed.cli import config as cfgio
from simfed.core.config import apply_overrides
from simfed.engine import config as expcfg
from simfed.core.errors import SimfedError


def _run_dir(exp, out: Optional[str]) -> Path:
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


class _Progress:
    """A rich progress bar on stderr: round M/N with clients/s, last accuracy, elapsed and ETA; during an
    evaluation a second bar shows the cohort being evaluated and its clients done. When stderr is not
    a terminal (logs, CI) each evaluation prints one line as it starts and one with its accuracy."""

    def __init__(self, console=None):
        from rich.console import Console
        from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                                   TimeRemainingColumn)

        self.console = console or Console(stderr=True)
        self.progress = Progress(TextColumn("[bold]{task.description}"), MofNCompleteColumn(), BarColumn(),
                                 TextColumn("{task.fields[rate]}"), TextColumn("{task.fields[acc]}"),
                                 TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
                                 console=self.console, transient=False)
        self.task = None
        self.eval_task = None
        self.window: list[tuple[float, int]] = []
        self.acc = ""

    def _rate(self, clients: int) -> str:
        now = time.perf_counter()
        self.window = [(t, n) for t, n in self.window if now - t < 30] + [(now, clients)]
        span = now - self.window[0][0]
        return f"{sum(n for _, n in self.window) / span if span > 0 else 0.0:6.1f} clients/s"

    def __call__(self, event: dict) -> None:
        kind = event["type"]
        if kind == "generate":
            self.console.print(f"generating synthetic FEMNIST ({event['clients']} clients) at {event['path']}")
        elif kind == "start" and self.task is not None:  # the server was restarted from a checkpoint
            self.progress.update(self.task, completed=event["start_round"])
        elif kind == "start":
            w = event["workers"]
            self.console.print(f"{len(w)} worker(s) on {len({x['node_id'] for x in w})} node(s); "
                               f"{event['seen']} seen / {event['unseen']} unseen clients")
            self.progress.start()
            self.task = self.progress.add_task("round", total=event["rounds"], completed=event["start_round"],
                                               rate="", acc="")
        elif kind == "chunk" and self.task is not None:
            self.progress.update(self.task, rate=self._rate(event["clients"]))
        elif kind == "round" and self.task is not None:
            self.progress.update(self.task, completed=event["round"])
        elif kind == "eval_start":
            what = f"eval {event['cohort']}"
            if event.get("phases", 1) > 1:
                what += f" ({event['phases']} phases)"
            total = event["clients"] * max(event.get("phases", 1), 1)
            if self.eval_task is None:
                self.eval_task = self.progress.add_task(what, total=total, rate="", acc="")
            else:
                self.progress.reset(self.eval_task, description=what, total=total, rate="", acc="")
            if not self.console.is_terminal:
                self.console.print(f"round {event['round']}: evaluating {event['cohort']} clients "
                                   f"({event['clients']}, {event.get('phases', 1)} phase(s))")
        elif kind == "eval_chunk" and self.eval_task is not None:
            self.progress.update(self.eval_task, advance=event["clients"], rate=self._rate(event["clients"]))
        elif kind == "eval":
            if self.eval_task is not None:
                self.progress.remove_task(self.eval_task)
                self.eval_task = None
            parts = [f"{s['cohort']} {100 * s['acc_mean']:.1f}%" for s in event["summary"]]
            self.acc = "acc " + " / ".join(parts)
            if self.task is not None:
                self.progress.update(self.task, acc=self.acc)
            if not self.console.is_terminal:
                self.console.print(f"round {event['round']}: {self.acc}")

    def stop(self) -> None:
        self.progress.stop()


def _load_saved_config(run_dir: Path) -> dict:
    from simfed.core.safeio import load_json

    saved = run_dir / "config.json"
    if not os.path.lexists(saved):
        raise SimfedError(f"--resume {run_dir}: no config.json there; pass the directory `simfed launch` printed")
    doc = load_json(saved, 16 << 20, "saved config")
    if not isinstance(doc, dict):
        raise SimfedError(f"{saved}: not a simfed config (expected a JSON object); the run directory is damaged")
    return doc


def _check_writable(run_dir: Path) -> None:
    """The run directory exists as a directory, or its nearest existing ancestor is writable."""
    p = run_dir.absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    if not (p.is_dir() and os.access(p, os.W_OK | os.X_OK)):
        raise SimfedError(f"--out {run_dir}: {p} is not a writable directory; pick a writable --out")


def _check_machine(exp) -> None:
    """Before Ray starts: the address answers as Ray, or the pool fits this machine."""
    from simfed.engine import probe, resources

    if exp.engine.backend != "ray":
        return
    if exp.engine.address == "":
        resources.check(exp.engine, resources.local_resources(), "this machine")
    elif exp.engine.address != "auto":
        probe.ray_gcs(exp.engine.address)


def launch(
    experiment: Optional[str] = typer.Argument(None, help="Experiment TOML; none runs the embedded quickstart."),
    set_: List[str] = typer.Option([], "--set", help="Override a key: section.key=value (repeatable)."),
    address: Optional[str] = typer.Option(None, "--address", help="Ray cluster: 'auto' or HOST:PORT of the head."),
    out: Optional[str] = typer.Option(None, "--out", help="Run directory (default runs/<algorithm>-<time>)."),
    resume: Optional[str] = typer.Option(None, "--resume", help="Continue the run in this directory."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
    verify: bool = typer.Option(True, "--verify/--no-verify",
                                help="Check the store's sha256 checksums before starting (sizes are always checked)."),
) -> None:
    """Run an experiment; prints the run directory."""
    from simfed.algorithms import registry
    from simfed.engine import cluster, resources, rundir, storage
    from simfed.core import validate
    from simfed.engine.loop import check_experiment, run_experiment

    # Everything below up to mkdir only reads: bad input never leaves a run directory or a Ray behind.
    for flag, value in (("--out", out), ("--resume", resume), ("--address", address)):
        if value is not None:
            validate.text(flag, value)
    if resume:
        if experiment or set_:
            raise SimfedError("--resume takes the run's saved config; drop the experiment file and --set")
        if not Path(resume).is_dir():
            raise SimfedError(f"--resume {resume}: not a run directory; pass the directory `simfed launch` printed")
        doc = _load_saved_config(Path(resume))
    else:
        notes: list[str] = []
        doc = apply_overrides(cfgio.load(experiment), set_, notes)
        for note in notes:
            sys.stderr.write(f"simfed: note: {note}\n")
    if address is not None:
        if not isinstance(doc.setdefault("engine", {}), dict):
            raise SimfedError("[engine] must be a table")
        doc["engine"]["address"] = address
    exp = expcfg.parse(doc, experiment or ("quickstart" if not resume else str(Path(resume) / "config.json")))
    restart = 0
    if resume:
        with rundir.hold(Path(resume)):  # a run still going (its owner alive) is refused first
            restart = _resume_round(Path(resume), exp)
        if restart is None:
            return  # a finished run: said so, without opening the data or starting Ray
    else:
        target = Path(out) if out else Path("runs") / (exp.run.name or ".")
        if target.exists() and not target.is_dir():
            raise SimfedError(f"--out {target}: exists and is not a directory; pick another --out")
        if (target / "checkpoint.pt").exists():
            raise SimfedError(f"{target} already holds a run; resume it with --resume {target} or pick another --out")
        _check_writable(target)
    _check_machine(exp)
    progress = None if quiet else _Progress()
    store, *_ = check_experiment(exp, progress, resume)
    if verify:
        store.verify()
    started = False
    if exp.engine.backend == "ray":
        import ray

        started = cluster.connect(exp.engine.address)  # an unreachable cluster fails before anything is written
        try:
            resources.check(exp.engine, ray.cluster_resources(), f"the Ray cluster at {exp.engine.address or 'this machine'}")
            if (not exp.engine.storage and registry.get(exp.algorithm).capabilities.client_state
                    and cluster.alive_nodes() > 1):
                raise SimfedError(storage.unshared_message("", ""))
        except SimfedError:
            if started:
                cluster.disconnect()
            raise
    run_dir = Path(resume) if resume else _run_dir(exp, out)
    if resume:
        sys.stderr.write(f"simfed: resuming {run_dir} from its checkpoint after round {restart}: rounds "
                         f"{restart + 1}-{exp.run.rounds} of {exp.run.rounds} remain\n")
    with rundir.hold(run_dir):  # a second launch or resume into this directory is refused meanwhile
        if not resume and (run_dir / "checkpoint.pt").exists():
            raise SimfedError(f"{run_dir} already holds a run; resume it with --resume {run_dir} or pick another "
                              "--out")
        if not resume:
            resolved = expcfg.to_dict(exp)
            for name, text in (("config.json", json.dumps(resolved, indent=2)),
                               ("config.toml", expcfg.to_text(exp))):
                tmp = run_dir / f".{name}.tmp"
                tmp.write_text(text)
                os.replace(tmp, run_dir / name)
        typer.echo(str(run_dir))
        try:
            result = run_experiment(exp, run_dir, resume=bool(resume), on_event=progress)
        except KeyboardInterrupt:
            if progress:
                progress.stop()
            sys.stderr.write(f"simfed: interrupted; continue with: simfed launch --resume {run_dir}\n")
            raise SystemExit(130)
        finally:
            if progress:
                progress.stop()
    print_summary(result["summary"])
    if result["dropped"] or result["retries"] or result.get("server_restarts"):
        typer.echo(f"dropped client updates: {result['dropped']}; retried chunks: {result['retries']}; "
                   f"server restarts: {result.get('server_restarts', 0)}", err=True)


def _resume_round(run_dir: Path, exp) -> int | None:
    """The round a resumed run restarts after; None when it is finished (said so, summary printed)."""
    from simfed.engine import checkpoint, metrics

    ckpt = checkpoint.load(run_dir)
    if ckpt is None:
        raise SimfedError(f"{run_dir}: no checkpoint to resume from (it is written every run.checkpoint_every "
                          "rounds); start it again without --resume")
    done, total = int(ckpt["round"]), exp.run.rounds
    if done > total:
        raise SimfedError(f"{run_dir}: checkpoint round {done} is beyond the run's {total} rounds; the run directory "
                          "is damaged: restore checkpoint.pt or start a new run")
    if done < total:
        return done
    sys.stderr.write(f"simfed: {run_dir} already finished ({done} of {total} rounds); nothing to resume. "
                     f"See `simfed metrics {run_dir}` or `simfed plot {run_dir}`\n")
    typer.echo(str(run_dir))
    print_summary(metrics.summarize(metrics.load(run_dir)).to_dicts())
    return None


def print_summary(rows: list[dict]) -> None:
    if not rows:
        return
    keys = ["acc_mean", "acc_weighted", "acc_std", "acc_p10", "acc_worst10", "acc_best", "loss_mean"]
    typer.echo(f"{'cohort':8} {'clients':>7} " + " ".join(f"{k:>12}" for k in keys))
    for s in rows:
        typer.echo(f"{s['cohort']:8} {s['clients']:>7} " + " ".join(f"{s[k]:>12.4f}" for k in keys))


def register(app: typer.Typer) -> None:
    app.command("launch")(launch)
