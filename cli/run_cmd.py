"""`simfed launch`: run or resume an experiment (simfed.launch), with its progress on stderr
(simfed.cli.progress: a bar on a terminal, plain lines elsewhere)."""

from __future__ import annotations

import enum
import sys
from typing import List, Optional

import typer


class ProgressMode(str, enum.Enum):
    auto = "auto"
    bar = "bar"
    plain = "plain"
    none = "none"


class _Console:
    """The command's listener: notes and the resume line on stderr, the run directory on stdout as
    soon as it is written, every event to the progress bar (if any), and the result at the end."""

    def __init__(self, progress):
        self.progress = progress
        self.run_dir: Optional[str] = None
        self.result: Optional[dict] = None

    def __call__(self, event: dict) -> None:
        kind = event["type"]
        if kind == "generate":
            sys.stderr.write(f"generating synthetic FEMNIST ({event['clients']} clients) at {event['path']}\n")
        elif kind == "note":
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
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress (as --progress none)."),
    progress_mode: ProgressMode = typer.Option(ProgressMode.auto, "--progress",
                                               help="bar, plain (one line per round and per evaluation step, "
                                                    "for logs), none; auto: bar on a terminal, else plain."),
    verify: bool = typer.Option(True, "--verify/--no-verify",
                                help="Check the store's sha256 checksums before starting (sizes are always checked)."),
) -> None:
    """Run an experiment; prints the run directory."""
    from simfed.cli import progress as views
    from simfed.runs import launch as run

    progress = views.make("none" if quiet else progress_mode.value)
    console = _Console(progress)
    try:
        run(experiment, out=out, overrides=set_, resume=resume, address=address, verify=verify, on_event=console,
            progress=isinstance(progress, views.BarProgress))
    except KeyboardInterrupt:
        if console.run_dir is None:
            raise
        if progress:
            progress.stop()
        sys.stderr.write(f"simfed: interrupted; continue with: simfed launch --resume {console.run_dir}\n")
        raise SystemExit(130)
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
