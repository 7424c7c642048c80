"""Figures for `simfed plot` and the trackers' artifact: learning curves of one run or of a sweep
(a directory of run directories).

Four panels, 1200 x 800 pixels: test (or val) accuracy per round and loss per round, seen clients
solid and unseen dashed, each the client-mean with the band from the 10th to the 90th percentile
over clients; the ECDF of per-client accuracy at the last evaluated round; the training loss per
round (client-mean of the mean local loss each client reports, same band). For a sweep each run
is a series with its own hue, seen dark and unseen light (two legend entries); beyond MAX_SERIES
runs, the runs of one method are averaged into one series whose band spans the runs' client-means
(min to max). With one or two evaluated rounds the x axis spans a round either side. The HTML
report is one self-contained file: the figure as a base64 PNG, per-series tables, each run's
configuration, and every plotted number as JSON in
`<script type="application/json" id="simfed-data">`. Files are written to a temporary name and
renamed. matplotlib is an optional extra (`pip install 'simfed[plot]'`).

`virtual_time`: the per-round panels take each round's virtual end time (runs with a [system]
clock, the round stat `virtual_time`) as x instead of the round: time-to-accuracy; a run without
a clock is refused with one line.
"""

from __future__ import annotations

import base64
import html
import io
import json
import os
from pathlib import Path

import numpy as np
import polars as pl

from simfed.engine import metrics
from simfed.core.errors import SimfedError

MAX_SERIES = 10
SIZE_IN, DPI = (12.0, 8.0), 100  # 1200 x 800 pixels
STYLE = {"seen": "-", "unseen": "--"}


def find_runs(path: str | os.PathLike) -> list[Path]:
    """PATH itself when it is a run directory, else the run directories below it (3 levels at most)."""
    root = Path(path)
    if not root.is_dir():
        raise SimfedError(f"{path}: no such directory; pass a run directory or a sweep directory")
    if (root / "metrics").is_dir():
        return [root]
    found = sorted({p.parent for depth in ("*/", "*/*/", "*/*/*/") for p in root.glob(depth + "metrics")
                    if p.is_dir()})
    if not found:
        raise SimfedError(f"{path}: neither a run directory (no metrics/) nor a directory of run directories")
    return found


def _method(run: Path) -> str:
    try:
        return str(json.loads((run / "config.json").read_text())["algorithm"]["name"])
    except (OSError, ValueError, KeyError, TypeError):
        return "?"


def _run_series(run: Path, label: str, split: str, virtual_time: bool = False) -> dict | None:
    df = metrics.load(run)
    cv = metrics.curve(df)
    if cv.height == 0 or cv.filter(pl.col("split") == split).height == 0:
        return None
    cv = cv.filter(pl.col("split") == split)
    last = int(cv["round"].max())
    ev = df.filter((pl.col("split") == split) & (pl.col("round") == last) & ~pl.col("dropped"))
    tr = metrics.train_curve(df)
    x = ["round"]
    if virtual_time:
        rounds = metrics.load_rounds(run)
        if "virtual_time" not in rounds.columns:
            raise SimfedError(f"{run}: no virtual clock in this run (no [system] table); plot it without "
                              "--virtual-time")
        cv, tr = metrics.with_virtual_time(cv, rounds), metrics.with_virtual_time(tr, rounds)
        x.append("virtual_time")
    return {"label": label, "runs": [str(run)], "band": "p10-p90 over clients",
            "eval": cv.select(*x, "cohort", "clients", "acc_mean", "acc_p10", "acc_p90", "acc_weighted",
                              "loss_mean", "loss_p10", "loss_p90").to_dicts(),
            "train": tr.select(*x, "clients", "loss_mean", "loss_p10", "loss_p90").to_dicts() if tr.height
            else [],
            "last_round": last,
            "last_accuracy": {c: sorted(ev.filter(pl.col("cohort") == c)["accuracy"].to_list())
                              for c in ("seen", "unseen")}}


def _merge(label: str, parts: list[dict]) -> dict:
    """Average runs of one method: mean of their client-means per round, band = min..max over runs."""
    def combine(key: str, rows_of, by: tuple[str, ...], value: str) -> list[dict]:
        df = pl.DataFrame([{**{b: r[b] for b in by}, "v": r[value]} for p in parts for r in rows_of(p)
                           if r[value] is not None])
        if df.height == 0:
            return []
        g = df.group_by(*by).agg(pl.col("v").mean().alias(f"{key}_mean"), pl.col("v").min().alias(f"{key}_p10"),
                                 pl.col("v").max().alias(f"{key}_p90"))
        return g.sort(*by).to_dicts()

    acc = combine("acc", lambda p: p["eval"], ("round", "cohort"), "acc_mean")
    loss = {(r["round"], r["cohort"]): r for r in combine("loss", lambda p: p["eval"], ("round", "cohort"),
                                                           "loss_mean")}
    ev = [{**r, **{k: v for k, v in loss.get((r["round"], r["cohort"]), {}).items() if k.startswith("loss")}}
          for r in acc]
    return {"label": label, "runs": [r for p in parts for r in p["runs"]], "band": "min-max over runs",
            "eval": ev, "train": combine("loss", lambda p: p["train"], ("round",), "loss_mean"),
            "last_round": max(p["last_round"] for p in parts),
            "last_accuracy": {c: sorted(a for p in parts for a in p["last_accuracy"][c]) for c in ("seen", "unseen")}}


def collect(runs: list[Path], split: str, base: Path | None = None, virtual_time: bool = False) -> list[dict]:
    series = []
    for run in runs:
        name = str(run.relative_to(base)) if base is not None and run != base else run.name
        s = _run_series(run, f"{name} ({_method(run)})" if len(runs) > 1 else _method(run), split, virtual_time)
        if s is not None:
            s["method"] = _method(run)
            series.append(s)
    if not series:
        where = runs[0] if len(runs) == 1 else f"{len(runs)} runs"
        raise SimfedError(f"{where}: no '{split}' evaluation rows yet; evaluation runs every run.eval_every rounds "
                          "and after the last")
    if len(series) > MAX_SERIES and not virtual_time:  # runs of one method share rounds, not virtual times
        methods = sorted({s["method"] for s in series})
        series = [_merge(f"{m} ({sum(s['method'] == m for s in series)} runs)", [s for s in series if s["method"] == m])
                  for m in methods]
    return series


def _figure(series: list[dict], split: str, title: str, virtual_time: bool = False):
    try:
        import matplotlib

        matplotlib.use("Agg")
        from matplotlib import pyplot as plt
    except ImportError:
        raise SimfedError("simfed plot needs matplotlib: pip install 'simfed[plot]'") from None
    fig, axes = plt.subplots(2, 2, figsize=SIZE_IN, dpi=DPI, layout="constrained")
    xkey, xlabel = ("virtual_time", "virtual time (s)") if virtual_time else ("round", "round")
    (ax_acc, ax_loss), (ax_ecdf, ax_train) = axes
    single = len(series) == 1
    palette = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    pairs = plt.get_cmap("tab20").colors  # (dark, light) of one hue per series: seen dark, unseen light
    for i, s in enumerate(series):
        for j, cohort in enumerate(("seen", "unseen")):
            color = palette[j] if single else pairs[(2 * i + j) % len(pairs)]
            label = cohort if single else f"{s['label']} {cohort}"
            rows = [r for r in s["eval"] if r["cohort"] == cohort]
            if rows:
                x = [r[xkey] for r in rows]
                for ax, key in ((ax_acc, "acc"), (ax_loss, "loss")):
                    mean = np.array([np.nan if r[f"{key}_mean"] is None else r[f"{key}_mean"] for r in rows])
                    ax.plot(x, mean, STYLE[cohort], color=color, marker="o", ms=3, label=label)
                    if single or len(series) <= 3:
                        lo = np.array([np.nan if r[f"{key}_p10"] is None else r[f"{key}_p10"] for r in rows])
                        hi = np.array([np.nan if r[f"{key}_p90"] is None else r[f"{key}_p90"] for r in rows])
                        ax.fill_between(x, lo, hi, color=color, alpha=0.15, linewidth=0)
            acc = s["last_accuracy"][cohort]
            if acc:
                ys = np.arange(1, len(acc) + 1) / len(acc)
                ax_ecdf.step(acc, ys, STYLE[cohort], where="post", color=color,
                             label=f"{label} (round {s['last_round']}, {len(acc)} clients)")
        tr = [r for r in s["train"] if r["loss_mean"] is not None]
        if tr:
            color = palette[2] if single else palette[i % len(palette)]
            x = [r[xkey] for r in tr]
            ax_train.plot(x, [r["loss_mean"] for r in tr], "-", color=color, label=s["label"])
            if single or len(series) <= 3:
                ax_train.fill_between(x, [r["loss_p10"] for r in tr], [r["loss_p90"] for r in tr], color=color,
                                      alpha=0.15, linewidth=0)
    _decorate(fig, axes, series, split, title, xlabel, virtual_time)
    return fig, plt


def _decorate(fig, axes, series: list[dict], split: str, title: str, xlabel: str, virtual_time: bool) -> None:
    """Titles, labels, whole-round ticks, grids and legends of the four panels."""
    (ax_acc, ax_loss), (ax_ecdf, ax_train) = axes
    band = series[0]["band"] if len({s["band"] for s in series}) == 1 else "bands"
    ax_acc.set(title=f"{split} accuracy (client mean, band {band})", xlabel=xlabel, ylabel="accuracy")
    ax_loss.set(title=f"{split} loss (client mean, band {band})", xlabel=xlabel, ylabel="cross-entropy")
    ax_ecdf.set(title=f"per-client {split} accuracy at the last round (ECDF)", xlabel="accuracy",
                ylabel="fraction of clients", xlim=(-0.02, 1.02), ylim=(0, 1.02))
    ax_train.set(title="training loss (client mean of local mean loss)", xlabel=xlabel, ylabel="cross-entropy")
    if not any(s["train"] for s in series):
        ax_train.text(0.5, 0.5, "no training loss reported\n(this method has none)", ha="center", va="center",
                      transform=ax_train.transAxes)
    from matplotlib.ticker import MaxNLocator

    rounds = [r["round"] for s in series for r in s["eval"] + s["train"]]
    for ax in (ax_acc, ax_loss, ax_train):
        ax.xaxis.set_major_locator(MaxNLocator(integer=not virtual_time))
        if not virtual_time and rounds and max(rounds) - min(rounds) < 2:  # whole rounds either side, not 1.9-2.1
            ax.set_xlim(min(rounds) - 1, max(rounds) + 1)
    for ax in axes.flat:
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7 if len(series) > 3 else 9)
    fig.suptitle(title)


def _html(series: list[dict], split: str, title: str, png: bytes) -> str:
    esc = html.escape
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{esc(title)}</title>",
             "<style>body{font-family:sans-serif;margin:2em}table{border-collapse:collapse;margin:1em 0}"
             "td,th{border:1px solid #ccc;padding:2px 8px;text-align:right}</style></head><body>",
             f"<h1>{esc(title)}</h1>",
             f"<img alt='learning curves' width='1200' src='data:image/png;base64,{base64.b64encode(png).decode()}'>"]
    for s in series:
        parts.append(f"<h2>{esc(s['label'])}</h2><p>{esc(', '.join(s['runs']))}</p><table><tr><th>round</th>"
                     f"<th>cohort</th><th>{split} acc (mean)</th><th>p10</th><th>p90</th><th>loss (mean)</th></tr>")
        for r in s["eval"]:
            cells = [r["round"], r["cohort"], *(("-" if r[k] is None else f"{r[k]:.4f}")
                                                for k in ("acc_mean", "acc_p10", "acc_p90", "loss_mean"))]
            parts.append("<tr>" + "".join(f"<td>{esc(str(c))}</td>" for c in cells) + "</tr>")
        parts.append("</table>")
        parts += [_config_html(run, opened=len(series) == 1) for run in s["runs"]]
    data = json.dumps({"title": title, "split": split, "series": series,
                       "configs": {run: _config(Path(run)) for s in series for run in s["runs"]}}).replace("</", "<\\/")
    parts.append(f"<script type='application/json' id='simfed-data'>{data}</script></body></html>")
    return "\n".join(parts)


def _config(run: Path) -> dict:
    """A run's resolved configuration (config.json; {} when it cannot be read)."""
    try:
        doc = json.loads((run / "config.json").read_text())
        return doc if isinstance(doc, dict) else {}
    except (OSError, ValueError):
        return {}


def _config_html(run: str, opened: bool) -> str:
    """The run's configuration as its config.toml reads, in a collapsible block."""
    from simfed.core.config import to_toml
    from simfed.engine.config import TOML_ORDER

    doc = _config(Path(run))
    text = to_toml(doc, TOML_ORDER) if doc else "(no readable config.json)"
    return (f"<details{' open' if opened else ''}><summary>configuration of {html.escape(run)}</summary>"
            f"<pre>{html.escape(text)}</pre></details>")


def artifact(run_dir: Path) -> list[Path]:
    """RUN_DIR/curves.png drawn for a tracker to attach; none when matplotlib is absent or nothing
    was evaluated (a tracker must not fail a finished run)."""
    try:
        return [render([Path(run_dir)], Path(run_dir) / "curves.png", "test", title=Path(run_dir).name)]
    except SimfedError:
        return []


def render(runs: list[Path], target: Path, split: str, title: str, virtual_time: bool = False) -> Path:
    """Write the PNG or the HTML report at `target` (by its suffix); returns `target`."""
    base = Path(os.path.commonpath([str(r) for r in runs])) if len(runs) > 1 else None
    series = collect(runs, split, base, virtual_time)
    fig, plt = _figure(series, split, title, virtual_time)
    buf = io.BytesIO()
    try:
        fig.savefig(buf, format="png", dpi=DPI)
    finally:
        plt.close(fig)
    data = buf.getvalue() if target.suffix.lower() == ".png" else _html(series, split, title, buf.getvalue()).encode()
    tmp = target.with_name(f".{target.name}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, target)
    return target
