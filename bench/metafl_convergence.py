"""Rounds to a target accuracy: nu-step meta-FL (nu = 5) vs Per-FedAvg (nu = 1), both evaluated after
5 fine-tuning steps (the seed's claim: ~37% faster convergence under multi-step fine-tuning).

Datasets (non-IID, built once with the partitions API if absent under --data-dir):
- synthetic FEMNIST, `--clients` writers (natural split by writer, 62 classes);
- Fashion-MNIST (the real one in /usr/share/datasets/fashion-mnist), Dirichlet(0.1) label skew.
Both methods share every setting (alpha, beta, tau, batches, gradient, rounds, cohort, seed) except nu;
runs go through the engine (serial backend). Target per dataset: `--target-frac` x the lower of the
two methods' best seen client-mean test accuracy (so both reach it), unless `--target` is given.
Prints JSON: per run the accuracy curve (seen and unseen client-mean test accuracy per eval round),
rounds to target, final accuracy, wall seconds; per dataset the relative reduction in rounds.
Defaults run in roughly 15-20 minutes on 2 cores; --quick is a ~3 minute smoke run.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

FMNIST = "/usr/share/datasets/fashion-mnist"


def build_stores(data_dir: Path, clients: int) -> dict[str, str]:
    from simfed.partitions.idx import import_idx
    from simfed.partitions.synthetic import make_synthetic_femnist

    data_dir.mkdir(parents=True, exist_ok=True)
    stores = {"synthetic-femnist": data_dir / f"sfemnist-{clients}",
              "fmnist-dirichlet0.1": data_dir / f"fmnist-dir01-{clients}"}
    if not (stores["synthetic-femnist"] / "manifest.json").exists():
        make_synthetic_femnist(str(stores["synthetic-femnist"]), clients=clients, seed=0)
    if not (stores["fmnist-dirichlet0.1"] / "manifest.json").exists():
        import_idx(FMNIST, str(stores["fmnist-dirichlet0.1"]), scheme="dirichlet", alpha=0.1, clients=clients, seed=0)
    return {k: str(v) for k, v in stores.items()}


def run_one(store: str, name: str, algo: dict, a, run_dir: Path) -> dict:
    import polars as pl

    from simfed.engine.config import parse
    from simfed.engine import metrics
    from simfed.engine.loop import run_experiment

    doc = {"data": {"path": store},
           "run": {"rounds": a.rounds, "clients_per_round": a.cohort, "eval_every": a.eval_every,
                   "checkpoint_every": 0, "seed": a.seed, "eval_clients": a.eval_clients},
           "algorithm": {"name": name, **algo},
           "engine": {"backend": "serial"}}
    t0 = time.perf_counter()
    run_experiment(parse(doc), run_dir, backend="serial")
    seconds = time.perf_counter() - t0
    df = metrics.load(run_dir)
    ev = df.filter((pl.col("split") == "test") & ~pl.col("dropped"))
    curve = (ev.group_by("round", "cohort").agg(pl.col("accuracy").mean().alias("acc"))
             .sort("round"))
    out = {"seen": {}, "unseen": {}}
    for row in curve.iter_rows(named=True):
        out[row["cohort"]][int(row["round"])] = round(float(row["acc"]), 4)
    totals = metrics.train_totals(df)
    return {"curve_seen": out["seen"], "curve_unseen": out["unseen"], "wall_seconds": round(seconds, 1),
            "dropped": totals.get("dropped", 0)}


def rounds_to(curve: dict[int, float], target: float) -> int | None:
    return next((r for r, acc in sorted(curve.items()) if acc >= target), None)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-dir", default="/tmp/simfed-bench-data")
    ap.add_argument("--runs-dir", default="/tmp/simfed-bench-runs/metafl")
    ap.add_argument("--clients", type=int, default=100)
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--cohort", type=int, default=5)
    ap.add_argument("--eval-every", type=int, default=3)
    ap.add_argument("--eval-clients", type=int, default=0)
    ap.add_argument("--tau", type=int, default=4)
    ap.add_argument("--alpha", type=float, default=0.05)
    ap.add_argument("--beta", type=float, default=0.1)
    ap.add_argument("--gradient", default="exact", choices=["exact", "first_order", "hessian_free"])
    ap.add_argument("--eval-steps", type=int, default=5)
    ap.add_argument("--target", type=float, default=None)
    ap.add_argument("--target-frac", type=float, default=0.9)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--datasets", default="synthetic-femnist,fmnist-dirichlet0.1")
    ap.add_argument("--quick", action="store_true", help="tiny smoke run (6 rounds, tau 1)")
    a = ap.parse_args()
    if a.quick:
        a.rounds, a.tau, a.eval_every, a.eval_clients = 6, 1, 3, 20
    stores = build_stores(Path(a.data_dir), a.clients)
    common = {"alpha": a.alpha, "beta": a.beta, "tau": a.tau, "batch_size": 32, "outer_batch_size": 32,
              "gradient": a.gradient, "hessian_batch": "inner", "eval_steps": a.eval_steps}
    methods = {"metafl_nu5": ("metafl", {**common, "nu": 5}), "perfedavg_nu1": ("perfedavg", dict(common))}
    stamp = time.strftime("%Y%m%d-%H%M%S")
    report = {"settings": {k: v for k, v in vars(a).items() if k not in ("data_dir", "runs_dir")}, "datasets": {}}
    for ds in a.datasets.split(","):
        res = {m: run_one(stores[ds], name, cfg, a, Path(a.runs_dir) / f"{stamp}-{ds}-{m}")
               for m, (name, cfg) in methods.items()}
        best = min(max(r["curve_seen"].values()) for r in res.values())
        target = a.target if a.target is not None else round(a.target_frac * best, 4)
        for r in res.values():
            r["rounds_to_target"] = rounds_to(r["curve_seen"], target)
            last = max(r["curve_seen"])
            r["final_acc_seen"], r["final_acc_unseen"] = r["curve_seen"][last], r["curve_unseen"].get(last)
        rm, rp = res["metafl_nu5"]["rounds_to_target"], res["perfedavg_nu1"]["rounds_to_target"]
        res["target_acc_seen"] = target
        res["rounds_reduction_vs_perfedavg"] = round(1 - rm / rp, 3) if rm and rp else None
        report["datasets"][ds] = res
        print(json.dumps({ds: res}), flush=True)  # partial result, in case a later dataset is cut short
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
