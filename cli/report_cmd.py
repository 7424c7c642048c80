"""`simfed metrics`, `simfed plot` and `simfed algorithms`: reading runs and describing methods.

Everything here reads finished (or running) run directories and never starts Ray. Bad option
values are refused before any file is read: `--split` is a choice, `--round` must name a round
that was evaluated (the error lists the ones that were).
"""

from __future__ import annotations

import dataclasses
import enum
import inspect
import json
import sys
from pathlib import Path
from typing import Optional

import typer

from simfed.core.errors import SimfedError


class Split(str, enum.Enum):
    test = "test"
    val = "val"


def _fmt(v) -> str:
    return "-" if v is None else f"{v:.4f}"


def _epsilons(run) -> dict[int, float]:
    """{training round: epsilon after it} of a run with [privacy] (round statistic `epsilon`), else {}."""
    rounds = run.rounds()
    if "epsilon" not in rounds.columns:
        return {}
    return {int(r): float(e) for r, e in zip(rounds["round"].to_list(), rounds["epsilon"].to_list()) if e is not None}


def _delta(run) -> float | None:
    """The run's [privacy] delta, as its status.json states it."""
    return ((run.status or {}).get("privacy") or {}).get("delta")


def _privacy_line(run, eps: dict[int, float], at: int) -> str:
    delta = _delta(run)
    upto = max((r for r in eps if r <= at), default=None)
    if upto is None:
        return ""
    return f"privacy: epsilon {eps[upto]:.4g} at delta {delta} after {upto} rounds"


def _json_eps(e: float) -> float | None:
    return e if e != float("inf") else None  # JSON has no infinity: no finite bound (noise_multiplier 0)


def _print_curve(cv, tr, eps: dict[int, float]) -> None:
    if cv.height:
        cols = ["acc_mean", "acc_p10", "acc_weighted", "loss_mean"] + (["virtual_time"] if "virtual_time" in cv.columns
                                                                       else [])
        typer.echo(f"{'round':>5} {'split':5} {'cohort':7} {'clients':>7} " + " ".join(f"{c:>12}" for c in cols))
        for r in cv.sort("split", "round", "cohort").iter_rows(named=True):
            typer.echo(f"{r['round']:>5} {r['split']:5} {r['cohort']:7} {r['clients']:>7} "
                       + " ".join(f"{_fmt(r[c]):>12}" for c in cols))
    if tr.height:
        typer.echo("")
        typer.echo(f"{'round':>5} {'clients':>7} {'train_loss':>12} {'dropped':>7}" + (f" {'epsilon':>10}" if eps else ""))
        for r in tr.iter_rows(named=True):
            typer.echo(f"{r['round']:>5} {r['clients']:>7} {_fmt(r['loss_mean']):>12} {r['dropped']:>7}"
                       + (f" {eps.get(r['round'], float('nan')):>10.4g}" if eps else ""))


def _curve_cmd(run_dir: str, run, df, eps: dict[int, float], as_json: bool) -> None:
    """`simfed metrics --curve`: the learning curve and training table (JSON or text)."""
    from simfed.engine import metrics

    # with a [system] clock, each round's virtual end time (time-to-accuracy)
    cv, tr = (metrics.with_virtual_time(t, run.rounds()) for t in (metrics.curve(df), metrics.train_curve(df)))
    if as_json:
        out = {"run_dir": str(run_dir), "eval": cv.to_dicts(), "train": tr.to_dicts()}
        if eps:
            out["epsilon"] = [{"round": r, "epsilon": _json_eps(e)} for r, e in sorted(eps.items())]
        typer.echo(json.dumps(out, indent=2))
    elif df.height == 0:
        raise SimfedError(f"{run_dir}: no metric rows yet; they appear as rounds finish")
    else:
        _print_curve(cv, tr, eps)


def _summary_json(run_dir: str, run, rows: list[dict], rounds: list[int], split: str, totals: dict,
                  eps: dict[int, float]) -> dict:
    """`simfed metrics --json`: the cohorts at one evaluated round, the training totals, epsilon and status."""
    at = rows[0]["round"]
    out = {"run_dir": str(run_dir), "round": at, "split": split, "rounds": rounds,
           "cohorts": {r["cohort"]: {k: v for k, v in r.items() if k not in ("cohort", "split", "round")}
                       for r in rows},
           "train": totals}
    if eps:
        upto = max((r for r in eps if r <= at), default=None)
        out["privacy"] = {"epsilon": _json_eps(eps[upto]) if upto else None, "after_round": upto,
                          "delta": _delta(run)}
    if run.status is not None:
        out["status"] = run.status
    return out


def metrics_cmd(
    run_dir: str = typer.Argument(..., help="A run directory."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
    split: Split = typer.Option(Split.test, "--split", help="Evaluation split.", case_sensitive=True),
    round_: Optional[int] = typer.Option(None, "--round", help="Evaluation round (default: the last)."),
    curve: bool = typer.Option(False, "--curve", help="Accuracy and loss per evaluation round and cohort, "
                                                      "and the training loss per round."),
) -> None:
    """Summarize a run's per-client metrics per cohort (or per round with --curve)."""
    from simfed.engine import metrics
    from simfed.results import load_run

    run = load_run(run_dir)
    status = run.status
    if status is not None and status.get("state") == "unknown":  # never a summary beside a state nobody knows
        raise SimfedError(f"{status.get('error', run_dir)}: the run's state is unknown; delete status.json to read "
                          "the metrics without it (a resumed run writes it again)")
    df = run.metrics()
    eps = _epsilons(run)
    if curve:
        _curve_cmd(run_dir, run, df, eps, as_json)
        return
    split = split.value
    rounds = metrics.eval_rounds(df, split)
    if not rounds and as_json:  # a script still learns the run's state (killed before its first evaluation)
        out = {"run_dir": str(run_dir), "round": None, "split": split, "rounds": [], "cohorts": {},
               "train": metrics.train_totals(df)}
        typer.echo(json.dumps({**out, **({"status": run.status} if run.status is not None else {})}, indent=2))
        return
    if not rounds:
        raise SimfedError(f"{run_dir}: no '{split}' evaluation rows yet; evaluation runs every run.eval_every "
                          "rounds and after the last")
    if round_ is not None and round_ not in rounds:
        raise SimfedError(f"--round {round_}: no '{split}' evaluation at that round; evaluated rounds: "
                          f"{', '.join(map(str, rounds))}")
    table = metrics.summarize(df, split=split, round=round_)
    rows = table.to_dicts()
    at = rows[0]["round"]
    totals = metrics.train_totals(df, up_to=at)
    if as_json:
        typer.echo(json.dumps(_summary_json(run_dir, run, rows, rounds, split, totals, eps), indent=2))
        return
    from simfed.cli.run_cmd import print_summary

    status = status or {}
    state = f" ({status['state']})" if "state" in status else ""
    typer.echo(f"{run_dir}{state}: round {at}, split {split} (evaluated rounds: {', '.join(map(str, rounds))})")
    print_summary(rows)
    typer.echo(f"train rounds 1-{at}: {totals['client_updates']} client updates, {totals['dropped']} dropped, "
               f"{totals['bytes_up'] / 1e6:.1f} MB up, {totals['bytes_down'] / 1e6:.1f} MB down")
    line = _privacy_line(run, eps, at) if eps else ""
    if line:
        typer.echo(line)


def plot_cmd(
    path: str = typer.Argument(..., metavar="RUN_DIR|SWEEP_DIR",
                               help="A run directory, or a directory of run directories (a sweep)."),
    out: Optional[str] = typer.Option(None, "--out", help="FILE.png or FILE.html (default: PATH/curves.png)."),
    split: Split = typer.Option(Split.test, "--split", help="Evaluation split to plot."),
    virtual_time: bool = typer.Option(False, "--virtual-time",
                                      help="Virtual time (seconds, runs with a [system] clock) on the x axis instead "
                                           "of the round: time-to-accuracy."),
) -> None:
    """Learning curves (accuracy and loss per round, seen vs unseen, client-mean with the p10-p90 band),
    the per-client accuracy distribution at the last round, and the training loss per round."""
    from simfed import plots

    target = Path(out) if out else Path(path) / "curves.png"
    if target.suffix.lower() not in (".png", ".html"):
        raise SimfedError(f"--out {out}: the file name must end in .png or .html")
    runs = plots.find_runs(path)
    if not target.parent.is_dir():
        raise SimfedError(f"--out {out}: directory {target.parent} does not exist")
    written = plots.render(runs, target, split.value, title=str(path), virtual_time=virtual_time)
    typer.echo(str(written))


# --- methods ---------------------------------------------------------------------------------

def _key_comments(cls: type) -> dict[str, str]:
    """`key: type = default  # comment` lines of a config dataclass and of the field groups it
    inherits (a subclass's comment wins): the comment documents the key."""
    from simfed.cli.catalog import key_comments

    out: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        try:
            out.update(key_comments(inspect.getsource(klass).splitlines()))
        except (OSError, TypeError):
            continue
    return out


def describe(name: str) -> dict:
    from simfed.algorithms import registry

    algo = registry.get(name)
    module = sys.modules[type(algo).__module__]
    doc = inspect.cleandoc(module.__doc__ or "")
    comments = _key_comments(algo.Config)
    keys = {f.name: {"default": f.default if f.default is not dataclasses.MISSING else None,
                     "type": f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type)),
                     "help": comments.get(f.name, "")}
            for f in dataclasses.fields(algo.Config)}
    return {"summary": algo.summary, "doc": doc.split("\n\n")[0], "module": module.__name__,
            "config": {k: v["default"] for k, v in keys.items()}, "keys": keys, "privacy": _privacy(algo)}


def _privacy(algo) -> str:
    """What [privacy] protects in the method, or why it refuses it (its declaration)."""
    from simfed.algorithms.base import NoPrivacy, PrivacySupport

    support = algo.capabilities.privacy
    if isinstance(support, PrivacySupport):
        return f"protects {support.covers}"
    return f"refused: {support.why}" if isinstance(support, NoPrivacy) else "refused: no declaration"


def _names() -> list[str]:
    """Every method's name; the built-in ones without importing them (no torch) unless a package
    registers more through the simfed.algorithms entry points."""
    from importlib.metadata import entry_points

    from simfed.algorithms import registry

    if entry_points(group="simfed.algorithms"):
        return registry.names()
    return sorted(registry.BUILTIN_NAMES)


def _describe(name: str) -> dict:
    """describe(name), read from a built-in method's source when it can be (simfed.cli.catalog)."""
    from simfed.algorithms import registry
    from simfed.cli import catalog

    if name in registry.BUILTIN_NAMES:
        found = catalog.describe(name, f"simfed.algorithms.{registry.BUILTIN_NAMES[name]}")
        if found is not None:
            return found
    return describe(name)


def _toml(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, tuple):
        return json.dumps(v)
    return repr(v)


def algorithms_cmd(
    name: Optional[str] = typer.Argument(None, help="One method: its summary, keys and defaults."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """List the registered methods with their config keys and defaults (or one method in detail)."""
    names = [name] if name else _names()
    info = {n: _describe(n) for n in names}
    if as_json:
        typer.echo(json.dumps(info[name] if name else info, indent=2, default=str))
        return
    if name:
        item = info[name]
        typer.echo(f"{name}: {item['summary']}\n")
        typer.echo(item["doc"] + "\n")
        typer.echo(f"[privacy]: {item['privacy']}\n")
        typer.echo(f"[algorithm] keys (defaults; full notes: python -m pydoc {item['module']}):")
        width = max(len(k) for k in item["keys"]) if item["keys"] else 0
        for k, v in item["keys"].items():
            note = f"  # {v['help']}" if v["help"] else ""
            typer.echo(f"  {k:<{width}} = {_toml(v['default'])}{note}")
        return
    for n, item in info.items():
        typer.echo(f"{n:14} {item['summary']}")
        keys = ", ".join(f"{k}={_toml(v)}" for k, v in item["config"].items())
        typer.echo(f"{'':14} {keys}")
    typer.echo("\n`simfed algorithms NAME` describes one method.")


def register(app: typer.Typer) -> None:
    app.command("metrics")(metrics_cmd)
    app.command("plot")(plot_cmd)
    app.command("algorithms")(algorithms_cmd)
