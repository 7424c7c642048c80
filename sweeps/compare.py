"""The paper table from a sweep: choose on validation, report on test, mean ± std over seeds.

Rows: one per trial and cohort (seen/unseen), taken from each trial's run directory with
`metrics.summarize` at its last evaluation round (the same summaries `simfed metrics` prints),
for the test split, plus the selection score: the seen clients' client-mean accuracy on the
selection split (validation by default; unseen clients never take part in choosing).

Table: trials are grouped by the value of one key (`algorithm.name` by default); inside a group,
a configuration is the trial's sweep overrides without `run.seed`; the configuration with the best
mean score over its seeds wins (configurations whose trials all finished come first, so a
configuration that ASHA stopped early cannot win on the score of an early round); the winner's
test figures are reported as mean and sample standard deviation (n - 1) over its seeds.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import polars as pl

from simfed.engine import metrics
from simfed.core.errors import SimfedError
from simfed.sweeps.sweep import read_json, run_status

STATS = ("acc_mean", "acc_weighted", "acc_p10", "acc_worst10")


def lookup(doc: dict, key: str) -> Any:
    section, _, name = key.partition(".")
    if section not in doc or name not in doc[section]:
        raise SimfedError(f"--by {key}: not a key of the sweep's experiments; use section.key, e.g. algorithm.name")
    return doc[section][name]


def trial_rows(sweep_dir: str | os.PathLike, trials: list[dict], by: str = "algorithm.name",
               select: str = "val") -> pl.DataFrame:
    """One row per trial x cohort with test summaries, the selection score and bookkeeping."""
    sweep_dir = Path(sweep_dir)
    # The sweep's own record says "stopped" for a trial ASHA ended (its process was ended inside a
    # report, so its status.json still says running, read as interrupted); the run's status is the
    # fallback for trials the sweep has no word on.
    swept = read_json(sweep_dir / "state.json") or {}
    out = []
    for t in trials:
        run_dir = sweep_dir / "trials" / t["id"]
        if not (run_dir / "metrics").is_dir():
            continue
        df = metrics.load(run_dir)
        test = metrics.summarize(df, split="test")
        if test.height == 0:
            continue
        chosen = metrics.summarize(df, split=select).to_dicts()
        score = next((s["acc_mean"] for s in chosen if s["cohort"] == "seen"), float("nan"))
        status = read_json(run_dir / "status.json") or {}
        record = read_json(run_dir / "trial.json") or {}
        wall = sum(a["wall_s"] or 0.0 for a in record.get("attempts", []))
        config = {k: v for k, v in t["overrides"].items() if k not in ("run.seed", by)}
        for s in test.to_dicts():
            out.append({"sweep": sweep_dir.name, "trial": t["id"], "group": str(lookup(t["doc"], by)),
                        "config": json.dumps(config, sort_keys=True), "seed": int(t["doc"]["run"]["seed"]),
                        "cohort": s["cohort"], "state": _state(swept.get(t["id"]), run_dir),
                        "round": int(s["round"]), "rounds_completed": int(status.get("completed_rounds", s["round"])),
                        "wall_s": float(wall), "select_split": select, "select_acc": float(score),
                        "clients": int(s["clients"]), **{k: float(s[k]) for k in STATS},
                        "acc_std": float(s["acc_std"]), "acc_best": float(s["acc_best"]),
                        "loss_mean": float(s["loss_mean"])})
    return pl.DataFrame(out)


def _state(swept: Any, run_dir: Path) -> str:
    if isinstance(swept, dict) and swept.get("state") in ("finished", "stopped", "failed"):
        return str(swept["state"])
    return run_status(run_dir) or "unknown"


def trial_list(rows: pl.DataFrame) -> list[dict]:
    """One entry per trial (not per cohort): its group, seed, state and the rounds it ran."""
    seen = rows.unique(subset=["trial"], keep="first", maintain_order=True)
    return [{"trial": r["trial"], "group": r["group"], "config": json.loads(r["config"]), "seed": r["seed"],
             "state": r["state"], "rounds": r["rounds_completed"], "select_acc": r["select_acc"]}
            for r in seen.to_dicts()]


def mean_std(values: list[float]) -> dict:
    """Mean and sample standard deviation (n - 1); std is None for a single seed."""
    n = len(values)
    m = sum(values) / n
    std = math.sqrt(sum((v - m) ** 2 for v in values) / (n - 1)) if n > 1 else None
    return {"mean": m, "std": std, "n": n}


def table(rows: pl.DataFrame) -> tuple[list[dict], pl.DataFrame]:
    """Per group, the chosen configuration and its per-cohort figures; also `rows` with a `selected` column."""
    if rows.height == 0:
        return [], rows.with_columns(pl.lit(False).alias("selected"))
    seen = rows.filter(pl.col("cohort") == "seen")
    groups = list(dict.fromkeys(rows["group"].to_list()))
    result, selected = [], set()
    for g in groups:
        cand = []
        for cfg in dict.fromkeys(seen.filter(pl.col("group") == g)["config"].to_list()):
            part = seen.filter((pl.col("group") == g) & (pl.col("config") == cfg))
            scores = [v for v in part["select_acc"].to_list() if not math.isnan(v)]
            complete = all(s == "finished" for s in part["state"].to_list())
            score = sum(scores) / len(scores) if scores else float("-inf")
            cand.append((complete, score, cfg))
        # max over (all finished, score); on ties the first configuration in sweep order wins.
        complete, score, cfg = max(cand, key=lambda c: (c[0], c[1]))
        chosen = rows.filter((pl.col("group") == g) & (pl.col("config") == cfg))
        selected.update(chosen["trial"].to_list())
        cohorts = {}
        for cohort in ("seen", "unseen"):
            c = chosen.filter(pl.col("cohort") == cohort).sort("seed")
            if c.height == 0:
                continue
            cohorts[cohort] = {k: mean_std(c[k].to_list()) for k in STATS}
            cohorts[cohort]["rounds"] = mean_std([float(v) for v in c["rounds_completed"].to_list()])
            cohorts[cohort]["wall_s"] = mean_std(c["wall_s"].to_list())
        result.append({"group": g, "config": json.loads(cfg), "select_score": score, "all_finished": complete,
                       "seeds": sorted(set(chosen["seed"].to_list())), "trials": sorted(set(chosen["trial"].to_list())),
                       "cohorts": cohorts})
    return result, rows.with_columns(pl.col("trial").is_in(sorted(selected)).alias("selected"))


def write_parquet(df: pl.DataFrame, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    df.write_parquet(tmp)
    os.replace(tmp, path)
