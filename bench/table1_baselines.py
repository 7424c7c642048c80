"""PeFLL's Table 1 on Fashion-MNIST: every baseline of the paper plus PeFLL (and Ditto), seen and unseen.

Store: the one bench/hypernet_learning.py builds (`simfed partition idx` of the real Fashion-MNIST,
2 classes per client, 100 clients, 90 seen / 10 unseen, seed 0). Every method runs through the
engine (serial backend, one process per seed when `--parallel`) for the same rounds, cohort size
and local SGD budget, and is evaluated once after the last round on every seen and unseen client
with its own new-client protocol (the module docstrings state them). Accuracy is the per-client
mean of test accuracy; the table gives mean ± std over seeds.

PeFLL's Table 1 is on CIFAR-10/100 and FEMNIST with 5000 rounds; here rounds are a few dozen, so
compare the *order* of methods and the seen-unseen gaps with the paper's, never the numbers.
The paper's order is printed next to ours (`paper_order_*`: its CIFAR-10 n=90 column).

    python bench/table1_baselines.py --rounds 40 --seeds 0,1,2 --out table1.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from hypernet_learning import ensure_store  # noqa: E402

from simfed.engine.config import parse  # noqa: E402
from simfed.engine.loop import run_experiment  # noqa: E402

# PeFLL Table 1, CIFAR-10 with 90 training clients (the setting closest to 90 seen Fashion-MNIST clients).
PAPER = {
    "seen": {"local": 82.2, "fedavg": 47.5, "perfedavg": 79.1, "fedrep": 84.6, "pfedme": 83.9, "knnper": 84.0,
             "pfedhn": 87.8, "pefll": 89.0},
    "unseen": {"local": 81.6, "fedavg": 48.6, "perfedavg": 77.6, "fedrep": 81.8, "pfedme": 78.4, "knnper": 82.4,
               "pfedhn": 63.3, "pefll": 89.3},
}
# cheapest first, so a run cut short still has the most methods
METHODS = ("fedavg", "knnper", "pefll", "local", "perfedavg", "ditto", "pfedhn", "pfedme", "fedrep")


def method_configs(a) -> dict[str, dict]:
    """One local budget for all: `--local-steps` SGD steps of batch 32 per sampled client and round."""
    s = a.local_steps
    return {
        "fedavg": {"name": "fedavg", "local_steps": s, "lr": a.lr},
        "local": {"name": "local", "local_steps": s, "lr": a.lr, "unseen_steps": a.local_unseen_steps},
        # PeFLL's appendix: first-order Per-FedAvg; evaluated after 5 fine-tuning steps
        "perfedavg": {"name": "perfedavg", "gradient": "first_order", "tau": max(1, s // 3), "alpha": a.lr,
                      "beta": a.lr, "eval_steps": 5},
        "fedrep": {"name": "fedrep", "lr": a.lr, "head_epochs": 5.0, "body_epochs": 1.0,
                   "unseen_head_epochs": 20.0},
        "pfedme": {"name": "pfedme", "local_steps": s, "lam": 15.0, "K": 3, "beta": 1.0,
                   "lr": a.pfedme_lr, "personal_lr": a.pfedme_personal_lr, "unseen_epochs": a.pfedme_unseen_epochs},
        "knnper": {"name": "knnper", "local_steps": s, "lr": a.lr, "scale": 100.0},
        "pfedhn": {"name": "pfedhn", "embed_dim": 23, "local_steps": s, "unseen_exchanges": 20},
        "pefll": {"name": "pefll", "embed_dim": 23, "local_steps": s, "lr": a.pefll_lr,
                  "server_lr": a.pefll_server_lr, "label_mask": False},
        "ditto": {"name": "ditto", "local_steps": s, "personal_steps": s, "lr": a.lr, "personal_lr": a.lr,
                  "lam": 1.0, "unseen_epochs": a.ditto_unseen_epochs},
    }


def run_seed(a, seed: int, store: str, work: Path) -> dict:
    import torch

    torch.set_num_threads(1)
    out = {}
    for m in a.methods.split(","):
        algo = method_configs(a)[m]
        exp = parse({"data": {"path": store},
                     "run": {"rounds": a.rounds, "clients_per_round": a.clients_per_round, "eval_every": 0,
                             "checkpoint_every": 0, "seed": seed, "eval_clients": a.eval_clients},
                     "algorithm": algo, "engine": {"backend": "serial"}})
        t0 = time.perf_counter()
        res = run_experiment(exp, work / f"{m}-s{seed}", backend="serial")
        summ = {row["cohort"]: row["acc_mean"] for row in res["summary"]}
        out[m] = {"seen": summ.get("seen"), "unseen": summ.get("unseen"),
                  "seconds": round(time.perf_counter() - t0, 1), "config": algo}
        print(f"# seed {seed} {m}: {out[m]}", file=sys.stderr, flush=True)
        part = work / f"seed{seed}.partial.json"  # what is done so far survives a cut-short run
        part.write_text(json.dumps(out))
    return out


def order(table: dict, cohort: str) -> list[str]:
    return sorted(table, key=lambda m: -table[m][cohort])


def report(a, per_seed: dict) -> dict:
    methods = [m for m in a.methods.split(",") if all(m in r for r in per_seed.values())]
    rows = {}
    for m in methods:
        rows[m] = {}
        for c in ("seen", "unseen"):
            vals = [100.0 * per_seed[s][m][c] for s in per_seed]
            rows[m][c] = round(statistics.mean(vals), 2)
            rows[m][c + "_std"] = round(statistics.stdev(vals), 2) if len(vals) > 1 else 0.0
        rows[m]["gap_unseen_minus_seen"] = round(rows[m]["unseen"] - rows[m]["seen"], 2)
        rows[m]["seconds"] = round(statistics.mean(per_seed[s][m]["seconds"] for s in per_seed), 1)
    print(f"{'method':<10} {'seen':>14} {'unseen':>14} {'gap':>7}   paper seen/unseen (CIFAR-10, n=90)")
    for m, r in rows.items():
        p = f"{PAPER['seen'].get(m, float('nan')):.1f} / {PAPER['unseen'].get(m, float('nan')):.1f}"
        print(f"{m:<10} {r['seen']:>7.2f} ± {r['seen_std']:<4.2f} {r['unseen']:>7.2f} ± {r['unseen_std']:<4.2f} "
              f"{r['gap_unseen_minus_seen']:>7.2f}   {p}")
    ours = {c: order({m: rows[m] for m in rows}, c) for c in ("seen", "unseen")}
    paper = {c: order({m: {c: v} for m, v in PAPER[c].items() if m in rows}, c) for c in ("seen", "unseen")}
    out = {"bench": "table1_baselines", "store": a.store, "seeds": list(per_seed), "rounds": a.rounds,
           "clients_per_round": a.clients_per_round, "local_steps": a.local_steps, "eval_clients": a.eval_clients, "lr": a.lr,
           "pfedme_lr": a.pfedme_lr, "pfedme_personal_lr": a.pfedme_personal_lr, "pefll_lr": a.pefll_lr,
           "pefll_server_lr": a.pefll_server_lr, "local_unseen_steps": a.local_unseen_steps,
           "pfedme_unseen_epochs": a.pfedme_unseen_epochs, "ditto_unseen_epochs": a.ditto_unseen_epochs, "table": rows,
           "order_seen": ours["seen"], "order_unseen": ours["unseen"],
           "paper_order_seen": paper["seen"], "paper_order_unseen": paper["unseen"],
           "per_seed": per_seed, "loadavg_end": [round(v, 2) for v in os.getloadavg()]}
    return out


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--store", default=str(Path(tempfile.gettempdir()) / "simfed-bench" / "fmnist-c2-100"))
    ap.add_argument("--rounds", type=int, default=40)
    ap.add_argument("--clients-per-round", type=int, default=10)
    ap.add_argument("--local-steps", type=int, default=25)
    ap.add_argument("--eval-clients", type=int, default=0, help="seen clients evaluated (0 = all); all unseen")
    ap.add_argument("--lr", type=float, default=0.01)
    ap.add_argument("--pfedme-lr", type=float, default=0.005)
    ap.add_argument("--pfedme-personal-lr", type=float, default=0.01)
    ap.add_argument("--pefll-lr", type=float, default=2e-3)
    ap.add_argument("--pefll-server-lr", type=float, default=2e-4)
    ap.add_argument("--local-unseen-steps", type=int, default=200)
    ap.add_argument("--pfedme-unseen-epochs", type=float, default=20.0)
    ap.add_argument("--ditto-unseen-epochs", type=float, default=20.0)
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--parallel", action="store_true", help="one process per seed")
    ap.add_argument("--work", default="")
    ap.add_argument("--out", default="")
    ap.add_argument("--report-partial", action="store_true", help="print the table of a cut-short --work dir")
    ap.add_argument("--one-seed", type=int, default=None, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    Path(a.store).parent.mkdir(parents=True, exist_ok=True)
    store = ensure_store(a.store)
    work = Path(a.work or tempfile.mkdtemp(prefix="simfed-table1-"))
    work.mkdir(parents=True, exist_ok=True)
    if a.report_partial:  # table from whatever the seeds have finished
        seeds = [int(s) for s in a.seeds.split(",")]
        per_seed = {s: json.loads((work / f"seed{s}.partial.json").read_text()) for s in seeds}
        out = report(a, per_seed)
        print(json.dumps(out))
        return out
    if a.one_seed is not None:  # child of --parallel
        res = run_seed(a, a.one_seed, store, work)
        (work / f"seed{a.one_seed}.json").write_text(json.dumps(res))
        return res
    seeds = [int(s) for s in a.seeds.split(",")]
    if a.parallel:
        base = [sys.executable, __file__] + [x for x in (argv if argv is not None else sys.argv[1:])
                                             if x != "--parallel"] + ["--work", str(work)]
        procs = [subprocess.Popen(base + ["--one-seed", str(s)]) for s in seeds]
        if any(p.wait() != 0 for p in procs):
            raise SystemExit("a seed failed; see its stderr above")
        per_seed = {s: json.loads((work / f"seed{s}.json").read_text()) for s in seeds}
    else:
        per_seed = {s: run_seed(a, s, store, work) for s in seeds}
    out = report(a, per_seed)
    print(json.dumps(out))
    if a.out:
        dest = Path(a.out)
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_suffix(".tmp")
        tmp.write_text(json.dumps(out, indent=1))
        tmp.rename(dest)
    return out


if __name__ == "__main__":
    main()
