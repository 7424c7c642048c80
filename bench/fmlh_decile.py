"""FMLH vs Per-FedAvg vs FedAvg, all with nu fine-tuning steps: lowest-decile (p10) accuracy.

Real Fashion-MNIST, 2 classes per client, 100 clients (90 seen / 10 unseen; store built by
`simfed partition idx ... --scheme classes --classes-per-client 2 --clients 100 --seed 0` if missing).
All three methods run through the engine (Ray backend, embedded local Ray, `--workers` 1-CPU workers)
for the same rounds and cohort size, and every client (seen and unseen) is evaluated on its test
split after the last round, after the SAME fine-tuning: nu = `--nu` plain SGD steps of lr `--ft-lr`
(batch 32) on the client's train split:
- fmlh: from w_i = w + delta_i (seen) or w (unseen); finetune_steps = nu.
- perfedavg: from the global meta-model; eval_steps = nu, eval_lr = ft-lr (hessian-free by default).
- fedavg: from the global model; finetune_steps = nu.
Local compute per round is of the same order: fmlh 10 meta-steps x (5 inner + 1 outer) gradients,
perfedavg tau = 10 meta-steps (~5 gradient evaluations each, hessian-free), fedavg 50 SGD steps.
The paper (seed 000) claims up to +18.71 points of lowest-decile accuracy over pFL baselines.

    python bench/fmlh_decile.py --rounds 3            # timing trial
    python bench/fmlh_decile.py --rounds R --clients-per-round 10 --nu 5
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from hypernet_learning import ensure_store, run_one  # same store, same timed engine run

from simfed.engine import cluster

KEYS = ("clients", "acc_mean", "acc_p10", "acc_worst10", "acc_best")


def method_configs(args) -> dict[str, dict]:
    nu, lr = args.nu, args.ft_lr
    return {
        "fmlh": {"name": "fmlh", "embed_dim": 23, "inner_steps": nu, "meta_steps": 10,
                 "finetune_steps": nu, "finetune_lr": lr},
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
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    store = ensure_store(args.store)
    cfgs = method_configs(args)
    work = Path(tempfile.mkdtemp(prefix="simfed-fmlh-bench-"))
    if args.backend == "ray":
        cluster.connect("", num_cpus=args.workers)
    results = {}
    for m in args.methods.split(","):
        summ, times = run_one(store, cfgs[m], args, work / m)
        results[m] = {**times, "config": cfgs[m], **{c: {k: summ[c][k] for k in KEYS} for c in summ}}
        print(f"# {m}: {times}", file=sys.stderr, flush=True)
    print(f"{'method':<10} {'cohort':<7} {'clients':>7} {'mean':>7} {'p10':>7} {'worst10':>8} {'best':>7} {'s/round':>8}")
    for m, r in results.items():
        for c in ("seen", "unseen"):
            if c in r:
                s = r[c]
                print(f"{m:<10} {c:<7} {s['clients']:>7} {s['acc_mean']:>7.3f} {s['acc_p10']:>7.3f} "
                      f"{s['acc_worst10']:>8.3f} {s['acc_best']:>7.3f} {r['s_per_round']:>8.2f}")
    out = {"bench": "fmlh_decile", "rounds": args.rounds, "clients_per_round": args.clients_per_round,
           "nu": args.nu, "ft_lr": args.ft_lr, "workers": args.workers, "seed": args.seed, "results": results}
    if "fmlh" in results:
        for base in ("perfedavg", "fedavg"):
            if base in results:
                out[f"p10_gain_fmlh_minus_{base}"] = {
                    c: round(results["fmlh"][c]["acc_p10"] - results[base][c]["acc_p10"], 4)
                    for c in ("seen", "unseen") if c in results["fmlh"] and c in results[base]}
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
