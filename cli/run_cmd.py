"""`simfed launch`, `simfed metrics` and `simfed algorithms`."""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from pathlib import Path
from typing import List, Optional

import typer

from simfed.cli import config as cfgio
from simfed.engine.errors import SimfedError


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
    """A rich progress bar on stderr: round, clients/s, last accuracy."""

    def __init__(self):
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self.console = Console(stderr=True)
        self.progress = Progress(TextColumn("[bold]round"), MofNCompleteColumn(), BarColumn(),
                                 TextColumn("{task.fields[rate]}"), TextColumn("{task.fields[acc]}"),
                                 TimeElapsedColumn(), console=self.console, transient=False)
        self.task = None
        self.window: list[tuple[float, int]] = []
        self.acc = ""

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
            self.task = self.progress.add_task("run", total=event["rounds"], completed=event["start_round"],
                                               rate="", acc="")
        elif kind == "chunk" and self.task is not None:
            now = time.perf_counter()
            self.window = [(t, n) for t, n in self.window if now - t < 30] + [(now, event["clients"])]
            span = now - self.window[0][0]
            rate = sum(n for _, n in self.window) / span if span > 0 else 0.0
            self.progress.update(self.task, rate=f"{rate:6.1f} clients/s")
        elif kind == "round" and self.task is not None:
            self.progress.update(self.task, completed=event["round"])
        elif kind == "eval":
            parts = [f"{s['cohort']} {100 * s['acc_mean']:.1f}%" for s in event["summary"]]
            self.acc = "acc " + " / ".join(parts)
            if self.task is not None:
                self.progress.update(self.task, acc=self.acc)
            if not self.console.is_terminal:
                self.console.print(f"round {event['round']}: {self.acc}")

    def stop(self) -> None:
        self.progress.stop()


def _load_saved_config(run_dir: Path) -> dict:
    from simfed.partitions.safeio import load_json

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
    from simfed.engine import cluster, resources, rundir, storage, validate
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
        doc = cfgio.apply_overrides(cfgio.load_toml(experiment), set_)
    if address is not None:
        if not isinstance(doc.setdefault("engine", {}), dict):
            raise SimfedError("[engine] must be a table")
        doc["engine"]["address"] = address
    exp = cfgio.parse(doc, experiment or ("quickstart" if not resume else str(Path(resume) / "config.json")))
    if resume:
        if rundir.owner_alive(resume):
            raise SimfedError(f"{resume} is in use by another run; wait for it to end")
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
            if (not exp.engine.storage and registry.get(exp.algorithm).uses_client_state
                    and cluster.alive_nodes() > 1):
                raise SimfedError(storage.unshared_message("", ""))
        except SimfedError:
            if started:
                cluster.disconnect()
            raise
    run_dir = Path(resume) if resume else _run_dir(exp, out)
    with rundir.hold(run_dir):  # a second launch or resume into this directory is refused meanwhile
        if not resume and (run_dir / "checkpoint.pt").exists():
            raise SimfedError(f"{run_dir} already holds a run; resume it with --resume {run_dir} or pick another "
                              "--out")
        if not resume:
            resolved = cfgio.to_dict(exp)
            for name, text in (("config.json", json.dumps(resolved, indent=2)),
                               ("config.toml", cfgio.to_toml(resolved))):
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
    _print_summary(result["summary"])
    if result["dropped"] or result["retries"] or result.get("server_restarts"):
        typer.echo(f"dropped client updates: {result['dropped']}; retried chunks: {result['retries']}; "
                   f"server restarts: {result.get('server_restarts', 0)}", err=True)


def _print_summary(rows: list[dict]) -> None:
    if not rows:
        return
    keys = ["acc_mean", "acc_weighted", "acc_std", "acc_p10", "acc_worst10", "acc_best"]
    typer.echo(f"{'cohort':8} {'clients':>7} " + " ".join(f"{k:>12}" for k in keys))
    for s in rows:
        typer.echo(f"{s['cohort']:8} {s['clients']:>7} " + " ".join(f"{s[k]:>12.4f}" for k in keys))


def metrics_cmd(
    run_dir: str = typer.Argument(..., help="A run directory."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
    split: str = typer.Option("test", "--split", help="Evaluation split: test or val."),
    round_: Optional[int] = typer.Option(None, "--round", help="Evaluation round (default: the last)."),
) -> None:
    """Summarize a run's per-client metrics per cohort."""
    from simfed.engine import metrics, rundir, validate

    validate.text("RUN_DIR", run_dir)
    validate.choice("--split", split, ("test", "val"))
    if round_ is not None:
        validate.integer("--round", round_, 1, 2**31 - 1)
    if not (Path(run_dir) / "metrics").is_dir():
        raise SimfedError(f"{run_dir}: no metrics/ directory; pass a directory printed by `simfed launch`")
    df = metrics.load(run_dir)
    table = metrics.summarize(df, split=split, round=round_)
    if table.height == 0:
        raise SimfedError(f"{run_dir}: no '{split}' evaluation rows" + (f" at round {round_}" if round_ else "")
                          + " yet; evaluation runs every run.eval_every rounds")
    rows = table.to_dicts()
    if as_json:
        out = {"run_dir": str(run_dir), "round": rows[0]["round"], "split": split,
               "cohorts": {r["cohort"]: {k: v for k, v in r.items() if k not in ("cohort", "split", "round")}
                           for r in rows},
               "train": metrics.train_totals(df)}
        status = rundir.read_status(run_dir)
        if status is not None:
            out["status"] = status
        typer.echo(json.dumps(out, indent=2))
    else:
        status = rundir.read_status(run_dir) or {}
        state = f" ({status['state']})" if "state" in status else ""
        typer.echo(f"{run_dir}{state}: round {rows[0]['round']}, split {split}")
        _print_summary(rows)
        totals = metrics.train_totals(df)
        typer.echo(f"train: {totals['client_updates']} client updates, {totals['dropped']} dropped, "
                   f"{totals['bytes_up'] / 1e6:.1f} MB up, {totals['bytes_down'] / 1e6:.1f} MB down")


def algorithms_cmd(as_json: bool = typer.Option(False, "--json", help="Print JSON with config keys.")) -> None:
    """List the registered methods."""
    from simfed.algorithms import registry

    info = {}
    for name in registry.names():
        algo = registry.get(name)
        info[name] = {"summary": algo.summary,
                      "config": {f.name: f.default for f in dataclasses.fields(algo.Config)}}
    if as_json:
        typer.echo(json.dumps(info, indent=2, default=str))
    else:
        for name, item in info.items():
            typer.echo(f"{name:14} {item['summary']}")


def register(app: typer.Typer) -> None:
    app.command("launch")(launch)
    app.command("metrics")(metrics_cmd)
    app.command("algorithms")(algorithms_cmd)
