"""What client-level DP costs: FedAvg, PeFLL and kNN-Per on real Fashion-MNIST (2 classes per client),
seen and unseen test accuracy at epsilon 1, 3, 8 (delta 1e-5) and without DP.

Store: `simfed partition idx /usr/share/datasets/fashion-mnist data/fmnist-c2-100 --scheme classes
--classes-per-client 2 --clients 100 --seed 0` (90 seen / 10 unseen; built here if missing).

Every run goes through the engine (`run_experiment`, serial backend by default) with the same
rounds, cohort (`--clients-per-round`, Poisson-sampled under DP) and local steps; the noise
multiplier is solved for each target epsilon over `--rounds` rounds (`target_epsilon`, RDP).
Two noise settings per epsilon, because the population is tiny:
- `noise_cohort_size = --noise-cohort` (default 1000, pfl-research's simulation device): the noise
  on the mean update is what a cohort of that many clients would carry; the epsilon is that of a
  deployment sampling at the same rate from a population noise_cohort / clients_per_round times
  larger. The simulated run itself is not private at that epsilon.
- `--honest` epsilons (default 8) without it: the guarantee holds for these 90 clients.
Clipping is adaptive (Andrew et al., target quantile 0.5, start 1.0); its count noise is the
default (cohort / 20) with noise_cohort_size and `--honest-count-std` without (cohort / 20 would
leave the update no noise budget at these noise levels). PeFLL uses descriptor_norm = "public".

Prints one JSON object (every run's accuracies, noise multiplier, epsilon reached, final clip and
wall time; `--out` also writes it after every run) and a Markdown table.

    python bench/privacy.py --rounds 30 --seeds 0,1,2 [--methods fedavg,knnper,pefll] [--eval-clients N] [--out FILE]
    python bench/privacy.py --merge A.json B.json   # one table over earlier --out files
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from simfed.engine import metrics
from simfed.engine.config import parse
from simfed.engine.loop import run_experiment

FMNIST = "/usr/share/datasets/fashion-mnist"
METHODS = {  # the learning rates of docs/benchmarks.md's Fashion-MNIST runs
    "fedavg": {"lr": 0.01},
    "pefll": {"lr": 0.002, "server_lr": 0.001, "descriptor_norm": "public"},
    "knnper": {"lr": 0.01},
}


def ensure_store(path: str) -> str:
    if not (Path(path) / "manifest.json").exists():
        subprocess.run([sys.executable, "-m", "simfed.cli.main", "partition", "idx", FMNIST, path, "--scheme",
                        "classes", "--classes-per-client", "2", "--clients", "100", "--seed", "0"], check=True)
    return path


def settings(args) -> list[dict]:
    """(label, [privacy] table or None) of every run of one method and seed."""
    out = [{"label": "no DP", "epsilon": None, "privacy": None}]
    base = {"delta": args.delta, "clip": 1.0, "target_quantile": 0.5}
    for eps in args.epsilons:
        out.append({"label": f"eps {eps:g}, noise cohort {args.noise_cohort}", "epsilon": eps,
                    "privacy": {**base, "target_epsilon": eps, "noise_cohort_size": args.noise_cohort}})
    for eps in args.honest:
        out.append({"label": f"eps {eps:g}, simulated cohort", "epsilon": eps,
                    "privacy": {**base, "target_epsilon": eps, "clip_count_stddev": args.honest_count_std}})
    return out


def one_run(args, method: str, seed: int, setting: dict, work: Path) -> dict:
    doc = {"data": {"path": args.store},
           "run": {"rounds": args.rounds, "clients_per_round": args.clients_per_round, "eval_every": 0,
                   "checkpoint_every": 0, "seed": seed, "eval_clients": args.eval_clients},
           "algorithm": {"name": method, "local_steps": args.local_steps, **METHODS[method]},
           "engine": {"backend": args.backend, "workers": args.workers}}
    if setting["privacy"] is not None:
        doc["privacy"] = setting["privacy"]
    exp = parse(doc, "bench/privacy.py")
    run_dir = work / f"{method}-s{seed}-{len(list(work.iterdir()))}"
    t0 = time.perf_counter()
    result = run_experiment(exp, run_dir)
    wall = time.perf_counter() - t0
    summary = {s["cohort"]: s for s in result["summary"]}
    status = json.loads((run_dir / "status.json").read_text())
    rounds = metrics.load_rounds(run_dir)
    clip_cols = [c for c in rounds.columns if c.endswith("privacy_clip")]
    return {"method": method, "seed": seed, **{k: setting[k] for k in ("label", "epsilon")},
            "seen": summary.get("seen", {}).get("acc_mean"), "unseen": summary.get("unseen", {}).get("acc_mean"),
            "noise_multiplier": (status.get("privacy") or {}).get("noise_multiplier"),
            "epsilon_reached": status.get("epsilon"), "final_clip": rounds[clip_cols[-1]][-1] if clip_cols else None,
            "wall_s": round(wall, 1)}


def table(runs: list[dict]) -> str:
    import statistics

    lines = ["| method | setting | noise multiplier | seen | unseen |", "|---|---|---|---|---|"]
    keys = list(dict.fromkeys((r["method"], r["label"]) for r in runs))
    for method, label in keys:
        rs = [r for r in runs if (r["method"], r["label"]) == (method, label)]

        def cell(col):
            vals = [r[col] for r in rs if r[col] is not None]
            if not vals:
                return "-"
            sd = f" ± {statistics.pstdev(vals):.3f}" if len(vals) > 1 else ""
            return f"{statistics.mean(vals):.3f}{sd}"

        sigma = rs[0]["noise_multiplier"]
        lines.append(f"| {method} | {label} | {'-' if sigma is None else f'{sigma:.3f}'} | {cell('seen')} | "
                     f"{cell('unseen')} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--store", default="data/fmnist-c2-100")
    ap.add_argument("--methods", default="fedavg,knnper,pefll")
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--clients-per-round", type=int, default=10)
    ap.add_argument("--local-steps", type=int, default=50)
    ap.add_argument("--eval-clients", type=int, default=0, help="evaluated per cohort (0: all)")
    ap.add_argument("--epsilons", default="1,3,8")
    ap.add_argument("--honest", default="8", help="epsilons also run without noise_cohort_size ('' for none)")
    ap.add_argument("--delta", type=float, default=1e-5)
    ap.add_argument("--noise-cohort", type=int, default=1000)
    ap.add_argument("--honest-count-std", type=float, default=5.0)
    ap.add_argument("--backend", default="serial")
    ap.add_argument("--workers", type=int, default=0)
    ap.add_argument("--out", default="")
    ap.add_argument("--merge", nargs="+", default=[], help="print one table over earlier --out files, run nothing")
    args = ap.parse_args()
    if args.merge:
        print(table([r for f in args.merge for r in json.loads(Path(f).read_text())["runs"]]))
        return
    args.epsilons = [float(e) for e in args.epsilons.split(",") if e]
    args.honest = [float(e) for e in args.honest.split(",") if e]
    ensure_store(args.store)
    runs: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="simfed-privacy-") as tmp:
        for method in args.methods.split(","):
            for seed in (int(s) for s in args.seeds.split(",")):
                for setting in settings(args):
                    runs.append(one_run(args, method, seed, setting, Path(tmp)))
                    print(json.dumps(runs[-1]), file=sys.stderr, flush=True)
                    if args.out:
                        Path(args.out).write_text(json.dumps({"args": vars(args), "runs": runs}, indent=2))
    print(json.dumps({"args": vars(args), "runs": runs}))
    print(table(runs))


if __name__ == "__main__":
    main()
