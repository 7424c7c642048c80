"""FMLH vs Per-FedAvg vs FedAvg, all with nu fine-tuning steps: lowest-decile (p10) accuracy.

Real Fashion-MNIST, 2 classes per client, 100 clients (90 seen / 10 unseen; store built by
`simfed partition idx ... --scheme classes --classes-per-client 2 --clients 100 --seed 0` if missing).
All three methods run through the engine (Ray backend, embedded local Ray, `--workers` 1-CPU workers)
for the same rounds and cohort size, and every client (seen and unseen) is evaluated on its test
split after the last round, after the SAME fine-tuning: nu = `--nu` plain SGD steps of lr `--ft-lr`
(batch 32) on the client's train split:
- fmlh: from w_i = w + delta_i (seen); unseen clients (`--fmlh-unseen fit`, the default) first
  fit a new embedding with h frozen over `--fmlh-unseen-exchanges` exchanges and start from
  w + delta_new ("global": from w, the earlier behaviour); finetune_steps = nu.
- perfedavg: from the global meta-model; eval_steps = nu, eval_lr = ft-lr (hessian-free by default).
- fedavg: from the global model; finetune_steps = nu.
Local compute per round is of the same order: fmlh 10 meta-steps x (5 inner + 1 outer) gradients,
perfedavg tau = 10 meta-steps (~5 gradient evaluations each, hessian-free), fedavg 50 SGD steps.
The FMLH paper claims up to +18.71 points of lowest-decile accuracy over pFL baselines.

    python bench/fmlh_decile.py --rounds 3            # timing trial
    python bench/fmlh_decile.py --rounds R --clients-per-round 10 --nu 5 --seeds 0,1,2 --backend serial
    python bench/fmlh_decile.py --merge A.json B.json   # one table over earlier --out files (same settings)
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from hypernet_learning import aggregate, ensure_store, merge, partial, print_table, run_one  # same store, timed run

from simfed.engine import cluster

KEYS = ("clients", "acc_mean", "acc_p10", "acc_worst10", "acc_best")


def method_configs(args) -> dict[str, dict]:
    nu, lr = args.nu, args.ft_lr
    return {
        "fmlh": {"name": "fmlh", "inner_steps": nu, "meta_steps": 10, "finetune_steps": nu, "finetune_lr": lr,
                 "unseen": args.fmlh_unseen, "unseen_exchanges": args.fmlh_unseen_exchanges},
        "perfedavg": {"name": "perfedavg", "alpha": args.pfa_alpha, "beta": args.pfa_beta, "tau": 10,
                      "batch_size": 32, "gradient": args.pfa_gradient, "eval_steps": nu, "eval_lr": lr},
        "fedavg": {"name": "fedavg", "local_steps": 50, "lr": args.fedavg_lr, "finetune_steps": nu,
                   "finetune_lr": lr},
    }


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--store", default="data/fmnist-c2-100")
    ap.add_argument("--rounds", type=int, default=100)
    ap.add_argument("--clients-per-round", type=int, default=10)
    ap.add_argument("--nu", type=int, default=5, help="fine-tuning steps at evaluation, all methods")
    ap.add_argument("--ft-lr", type=float, default=0.01, help="fine-tuning lr at evaluation, all methods")
    ap.add_argument("--fedavg-lr", type=float, default=0.01)
    ap.add_argument("--pfa-alpha", type=float, default=0.01)
    ap.add_argument("--pfa-beta", type=float, default=0.05)
    ap.add_argument("--pfa-gradient", default="hessian_free", choices=("hessian_free", "first_order", "exact"))
    ap.add_argument("--methods", default="fmlh,perfedavg,fedavg")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--backend", default="ray", choices=("ray", "serial"))
    ap.add_argument("--seeds", default="0", help="comma-separated run seeds (same store); mean +- std over them")
    ap.add_argument("--fmlh-unseen", default="fit", choices=("fit", "global"))
    ap.add_argument("--fmlh-unseen-exchanges", type=int, default=5)
    ap.add_argument("--eval-every", type=int, default=0)
    ap.add_argument("--work", default="")
    ap.add_argument("--out", default="")
    ap.add_argument("--merge", nargs="+", default=[], metavar="JSON",
                    help="run nothing: one table over the seeds and methods of earlier --out files")
    args = ap.parse_args(argv)
    if args.merge:
        per_seed, runs, setup = merge(args.merge, "fmlh_decile", SETTINGS)
        return report(per_seed, runs, setup, args.out)
    store = ensure_store(args.store)
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="simfed-fmlh-bench-"))
    if args.backend == "ray":
        cluster.connect("", num_cpus=args.workers)
    per_seed, runs = {}, {}
    for seed in [int(v) for v in args.seeds.split(",")]:
        args.seed = seed
        cfgs = method_configs(args)
        for m in args.methods.split(","):
            summ, times = run_one(store, cfgs[m], args, work / f"s{seed}" / m)
            per_seed.setdefault(seed, {})[m] = {c: {k: summ[c][k] for k in KEYS} for c in summ}
            runs.setdefault(m, {"config": cfgs[m]})[seed] = times
            print(f"# seed {seed} {m}: {times} {per_seed[seed][m]}", file=sys.stderr, flush=True)
        if args.out:
            partial(args.out, {"bench": "fmlh_decile", "partial": True, **settings(args),
                               "per_seed": per_seed, "runs": runs})
    return report(per_seed, runs, settings(args), args.out)


SETTINGS = ("rounds", "clients_per_round", "nu", "ft_lr", "backend")


def settings(args) -> dict:
    """What must agree for seeds of different invocations to be merged into one table."""
    return {k: getattr(args, k) for k in SETTINGS}


def report(per_seed: dict, runs: dict, setup: dict, out_path: str) -> dict:
    keys = ("acc_mean", "acc_p10", "acc_worst10", "acc_best")
    agg = aggregate(per_seed, keys)
    print_table(agg, keys)
    out = {"bench": "fmlh_decile", **setup, "seeds": ",".join(str(s) for s in per_seed),
           "mean_std": agg, "per_seed": per_seed, "runs": runs}
    if "fmlh" in agg:
        for base in ("perfedavg", "fedavg"):
            if base in agg:
                out[f"p10_gain_fmlh_minus_{base}"] = {
                    c: round(agg["fmlh"][c]["acc_p10"]["mean"] - agg[base][c]["acc_p10"]["mean"], 4)
                    for c in ("seen", "unseen") if c in agg["fmlh"] and c in agg[base]}
    print(json.dumps(out))
    if out_path:
        partial(out_path, out)
    return out


if __name__ == "__main__":
    main()
