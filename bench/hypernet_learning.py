"""Learning check for the hypernetwork methods on real Fashion-MNIST (2 classes per client).

Store: `simfed partition idx /usr/share/datasets/fashion-mnist STORE --scheme classes
--classes-per-client 2 --clients 100 --seed 0` (90 seen / 10 unseen; built here if missing).
Runs PeFLL, pFedHN and FedAvg through the engine (serial backend, one process) for the same
number of rounds and cohort size, evaluates test accuracy per client on seen and unseen clients,
and prints a table (method x cohort: client mean, p10, worst-10% mean) and one JSON line.

Targets (issue 4): PeFLL's unseen accuracy within 3 points of its seen accuracy, and above
FedAvg's and pFedHN's unseen accuracy.

    python bench/hypernet_learning.py --rounds 150 --clients-per-round 5 [--methods pefll,pfedhn,fedavg]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from simfed.cli.config import parse
from simfed.engine.loop import run_experiment

FMNIST = "/usr/share/datasets/fashion-mnist"


def ensure_store(path: str) -> str:
    if not (Path(path) / "manifest.json").exists():
        subprocess.run(["simfed", "partition", "idx", FMNIST, path, "--scheme", "classes",
                        "--classes-per-client", "2", "--clients", "100", "--seed", "0"], check=True)
    return path


def method_configs(args) -> dict[str, dict]:
    return {
        "pefll": {"name": "pefll", "embed_dim": 23, "local_steps": args.local_steps, "lr": args.pefll_lr,
                  "server_lr": args.pefll_server_lr},
        "pfedhn": {"name": "pfedhn", "embed_dim": 23, "local_steps": args.local_steps,
                   "unseen_exchanges": args.unseen_exchanges},
        "fedavg": {"name": "fedavg", "local_steps": args.local_steps, "lr": 0.05},
        "fedavg_ft": {"name": "fedavg", "local_steps": args.local_steps, "lr": 0.05, "finetune_steps": 5,
                      "finetune_lr": 0.01},
    }


def run_one(store: str, algo: dict, rounds: int, cpr: int, seed: int, out: Path) -> tuple[dict, float]:
    exp = parse({"data": {"path": store},
                 "run": {"rounds": rounds, "clients_per_round": cpr, "eval_every": 0, "checkpoint_every": 0,
                         "seed": seed},
                 "algorithm": algo, "engine": {"backend": "serial"}})
    t0 = time.perf_counter()
    res = run_experiment(exp, out, backend="serial")
    secs = time.perf_counter() - t0
    return {row["cohort"]: row for row in res["summary"]}, secs


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--store", default=str(Path(tempfile.gettempdir()) / "simfed-bench" / "fmnist-c2-100"))
    ap.add_argument("--rounds", type=int, default=150)
    ap.add_argument("--clients-per-round", type=int, default=5)
    ap.add_argument("--local-steps", type=int, default=50)
    ap.add_argument("--pefll-lr", type=float, default=2e-3)
    ap.add_argument("--pefll-server-lr", type=float, default=2e-4)
    ap.add_argument("--unseen-exchanges", type=int, default=10)
    ap.add_argument("--methods", default="pefll,pfedhn,fedavg")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    store = ensure_store(args.store)
    cfgs = method_configs(args)
    results, work = {}, Path(tempfile.mkdtemp(prefix="simfed-hn-bench-"))
    for m in args.methods.split(","):
        summ, secs = run_one(store, cfgs[m], args.rounds, args.clients_per_round, args.seed, work / m)
        results[m] = {"seconds": round(secs, 1),
                      **{c: {k: summ[c][k] for k in ("clients", "acc_mean", "acc_p10", "acc_worst10")}
                         for c in summ}}
        print(f"# {m}: {secs:.0f} s", file=sys.stderr, flush=True)
    print(f"{'method':<10} {'cohort':<7} {'clients':>7} {'mean':>7} {'p10':>7} {'worst10':>8}")
    for m, r in results.items():
        for c in ("seen", "unseen"):
            if c in r:
                s = r[c]
                print(f"{m:<10} {c:<7} {s['clients']:>7} {s['acc_mean']:>7.3f} {s['acc_p10']:>7.3f} {s['acc_worst10']:>8.3f}")
    checks = {}
    if "pefll" in results:
        pe = results["pefll"]
        checks["pefll_unseen_minus_seen"] = round(pe["unseen"]["acc_mean"] - pe["seen"]["acc_mean"], 4)
        checks["pefll_gap_within_3pts"] = abs(checks["pefll_unseen_minus_seen"]) <= 0.03
        for other in ("fedavg", "pfedhn"):
            if other in results:
                checks[f"pefll_unseen_above_{other}"] = pe["unseen"]["acc_mean"] > results[other]["unseen"]["acc_mean"]
    out = {"bench": "hypernet_learning", "rounds": args.rounds, "clients_per_round": args.clients_per_round,
           "local_steps": args.local_steps, "results": results, "checks": checks}
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
