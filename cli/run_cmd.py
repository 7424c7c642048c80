"""`simfed launch`: run or resume an experiment (simfed.launch), with a progress bar."""

from __future__ import annotations

import sys
import time
from typing import List, Optional

import typer



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


class _Console:
    """The command's listener: notes and the resume line on stderr, the run directory on stdout as
    soon as it is written, every event to the progress bar (if any), and the result at the end."""

    def __init__(self, progress: Optional[_Progress]):
        self.progress = progress
        self.run_dir: Optional[str] = None
        self.result: Optional[dict] = None

    def __call__(self, event: dict) -> None:
        kind = event["type"]
        if kind == "note":
            sys.stderr.write(f"simfed: note: {event['message']}\n")
        elif kind == "already_finished":
            run_dir = event["run_dir"]
            sys.stderr.write(f"simfed: {run_dir} already finished ({event['round']} of {event['rounds']} rounds); "
                             f"nothing to resume. See `simfed metrics {run_dir}` or `simfed plot {run_dir}`\n")
            typer.echo(run_dir)
            print_summary(event["summary"])
        elif kind == "resume":
            done, total = event["round"], event["rounds"]
            sys.stderr.write(f"simfed: resuming {event['run_dir']} from its checkpoint after round {done}: rounds "
                             f"{done + 1}-{total} of {total} remain\n")
        elif kind == "run_dir":
            self.run_dir = event["run_dir"]
            typer.echo(self.run_dir)
        elif kind == "done":
            self.result = event
        if self.progress is not None:
            self.progress(event)


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
    from simfed.engine import signals
    from simfed.runs import launch as run

    progress = None if quiet else _Progress()
    console = _Console(progress)
    try:
        run(experiment, out=out, overrides=set_, resume=resume, address=address, verify=verify, on_event=console,
            progress=progress is not None)
    except KeyboardInterrupt as exc:  # Ctrl-C, SIGTERM or SIGHUP (engine.signals)
        if console.run_dir is None:
            raise
        if progress:
            progress.stop()
        sys.stderr.write(f"simfed: interrupted; continue with: simfed launch --resume {console.run_dir}\n")
        raise SystemExit(signals.exit_code(exc))
    finally:
        if progress and console.run_dir is not None:  # the bar ran (stop prints its last line)
            progress.stop()
    result = console.result
    if result is None:  # a finished run: nothing was run
        return
    print_summary(result["summary"])
    if result["dropped"] or result["retries"] or result.get("server_restarts"):
        typer.echo(f"dropped client updates: {result['dropped']}; retried chunks: {result['retries']}; "
                   f"server restarts: {result.get('server_restarts', 0)}", err=True)


def print_summary(rows: list[dict]) -> None:
    if not rows:
        return
    keys = ["acc_mean", "acc_weighted", "acc_std", "acc_p10", "acc_worst10", "acc_best", "loss_mean"]
    typer.echo(f"{'cohort':8} {'clients':>7} " + " ".join(f"{k:>12}" for k in keys))
    for s in rows:
        typer.echo(f"{s['cohort']:8} {s['clients']:>7} " + " ".join(f"{s[k]:>12.4f}" for k in keys))


def register(app: typer.Typer) -> None:
    app.command("launch")(launch)
