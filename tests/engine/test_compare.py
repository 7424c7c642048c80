"""The choice per method: best mean validation score over seeds, finished configurations first."""

from __future__ import annotations

import polars as pl

from simfed.sweeps.compare import mean_std, table


def _row(trial, group, config, seed, cohort, select_acc, acc, state="finished"):
    return {"trial": trial, "group": group, "config": config, "seed": seed, "cohort": cohort, "state": state,
            "select_acc": select_acc, "acc_mean": acc, "acc_weighted": acc, "acc_p10": acc / 2,
            "acc_worst10": acc / 4, "rounds_completed": 10, "wall_s": 1.0}


def test_choice_uses_the_mean_over_seeds_and_skips_unfinished():
    rows = []
    # config A: best single seed (0.9) but worse mean (0.6); config B: mean 0.7; config C: best but stopped.
    for cfg, vals, state in (('{"lr": 1}', (0.9, 0.3), "finished"), ('{"lr": 2}', (0.7, 0.7), "finished"),
                             ('{"lr": 3}', (0.95, 0.95), "running")):
        for seed, v in enumerate(vals):
            tid = f"{cfg}-{seed}"
            rows.append(_row(tid, "fedavg", cfg, seed, "seen", v, v + 0.01, state))
            rows.append(_row(tid, "fedavg", cfg, seed, "unseen", v, v - 0.01, state))
    result, marked = table(pl.DataFrame(rows))
    (g,) = result
    assert g["config"] == {"lr": 2} and g["select_score"] == 0.7 and g["all_finished"]
    assert g["cohorts"]["unseen"]["acc_mean"]["mean"] == 0.69
    assert marked.filter(pl.col("selected"))["config"].unique().to_list() == ['{"lr": 2}']


def test_mean_std_is_the_sample_std():
    s = mean_std([1.0, 2.0, 4.0])
    assert s["mean"] == 7 / 3 and abs(s["std"] - 1.5275252316519468) < 1e-15 and s["n"] == 3
    assert mean_std([0.5])["std"] is None
