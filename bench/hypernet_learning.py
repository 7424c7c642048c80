"""Learning check for the hypernetwork methods on real Fashion-MNIST (2 classes per client).

Store: `simfed partition idx /usr/share/datasets/fashion-mnist STORE --scheme classes
--classes-per-client 2 --clients 100 --seed 0` (90 seen / 10 unseen; built here if missing).
Runs PeFLL, pFedHN and FedAvg through the engine (Ray backend with `--workers` 1-CPU workers, or
`--backend serial`) for the same number of rounds, cohort size and local steps, for each run seed
of `--seeds` (same store), evaluates test accuracy per client on every seen and unseen client
after the last round, and prints a table (method x cohort: client mean, p10, worst-10% mean, each
mean +- std over the seeds) and one JSON line (`--out` also writes it, after every seed). Each
run's collapse gauges (model/descriptor/embedding spread of the first and last round) are in the
JSON; `--eval-every N` adds a learning curve to each run's metrics (`--work` keeps the runs).

Evaluation protocols (as in the PeFLL paper):
- pefll: zero-shot for seen and unseen clients, theta = h(v(S_train)); no label masking
  (comparable with the others). `pefll+mask` re-evaluates the SAME final PeFLL server state with
  label_mask = true (classes absent from the client's train split cannot be predicted), serially
  in this process from the run's checkpoint: an upper reference, not comparable with the others.
- pfedhn: seen clients use their trained embeddings; unseen clients get a new embedding fitted
  by `--unseen-exchanges` client-server exchanges with h frozen (20 in PeFLL's protocol).
- fedavg: the global model, no fine-tuning (the paper's FedAvg baseline); `fedavg_ft` adds
  5 local fine-tuning steps before evaluation.

Targets: PeFLL's unseen accuracy >= 0.90, within 3 points of its seen
accuracy, and above FedAvg's and pFedHN's unseen accuracy, all unmasked.

    python bench/hypernet_learning.py --rounds 150 --seeds 0,1,2 [--backend serial] [--methods pefll,pfedhn,fedavg]
    python bench/hypernet_learning.py --merge A.json B.json   # one table over earlier --out files
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from simfed.engine import checkpoint, cluster, metrics
from simfed.engine.backends import open_backend
from simfed.engine.config import parse
from simfed.engine.evaluate import evaluate
from simfed.engine.loop import run_experiment
from simfed.engine.plan import check_experiment

FMNIST = "/usr/share/datasets/fashion-mnist"


def ensure_store(path: str) -> str:
    if not (Path(path) / "manifest.json").exists():
        subprocess.run(["simfed", "partition", "idx", FMNIST, path, "--scheme", "classes",
                        "--classes-per-client", "2", "--clients", "100", "--seed", "0"], check=True)
    return path


def method_configs(args) -> dict[str, dict]:
    return {
        # embed_dim: the default int(1 + 100/4) = 26 over all 100 clients, as the authors' code
        "pefll": {"name": "pefll", "local_steps": args.local_steps, "lr": args.pefll_lr,
                  "server_lr": args.pefll_server_lr, "label_mask": False,
                  "descriptor_norm": args.descriptor_norm, "decay": args.decay},
        "pfedhn": {"name": "pfedhn", "local_steps": args.local_steps,
                   "unseen_exchanges": args.unseen_exchanges},
        "fedavg": {"name": "fedavg", "local_steps": args.local_steps, "lr": args.fedavg_lr},
        "fedavg_ft": {"name": "fedavg", "local_steps": args.local_steps, "lr": args.fedavg_lr, "finetune_steps": 5,
                      "finetune_lr": 0.01},
    }


def experiment(store: str, algo: dict, args):
    return parse({"data": {"path": store},
                  "run": {"rounds": args.rounds, "clients_per_round": args.clients_per_round,
                          "eval_every": getattr(args, "eval_every", 0), "checkpoint_every": 0, "seed": args.seed},
                  "algorithm": algo,
                  "engine": {"backend": args.backend, "workers": args.workers, "cpus_per_worker": 1}})


def run_one(store: str, algo: dict, args, out: Path) -> tuple[dict, dict]:
    exp = experiment(store, algo, args)
    marks: dict = {}

    def on_event(e: dict) -> None:
        now = time.perf_counter()
        marks.setdefault("first_" + e["type"], now)
        marks["last_" + e["type"]] = now
        if e["type"] == "round":  # the collapse gauges of the hypernetwork methods
            spreads = {k: round(v, 4) for k, v in e.get("stats", {}).items() if k.endswith("_spread")}
            if spreads:
                marks.setdefault("spreads", {})[e["round"]] = spreads

    t0 = time.perf_counter()
    res = run_experiment(exp, out, backend=args.backend, on_event=on_event)
    t1 = time.perf_counter()
    train_s = marks.get("last_round", t1) - marks.get("first_start", t0)
    times = {"seconds": round(t1 - t0, 1), "train_s": round(train_s, 1),
             "s_per_round": round(train_s / args.rounds, 3),
             "eval_s": round(marks.get("last_eval", t1) - marks.get("last_round", t1), 1)}
    sp = marks.get("spreads", {})
    if sp:  # first and last round's spreads
        times["spread_first_round"], times["spread_last_round"] = sp[min(sp)], sp[max(sp)]
    return {row["cohort"]: row for row in res["summary"]}, times


def reevaluate(store: str, algo: dict, args, run_dir: Path, out: Path) -> dict:
    """Evaluate the final server state of `run_dir` again with another algorithm config, serially,
    with the engine's own evaluation (same client draw and chunking as in a run)."""
    exp = experiment(store, algo, args)
    plan = check_experiment(exp)
    ckpt = checkpoint.load(run_dir)
    out.mkdir(parents=True, exist_ok=True)
    with open_backend(exp, plan, str(out / "client_state"), ckpt["server"], kind="serial") as be:
        summ = evaluate(be, plan, exp.run, args.rounds - 1, metrics.MetricsWriter(out, out.name), args.rounds)
    return {row["cohort"]: row for row in summ}


def mean_std(values) -> dict:
    a = [float(v) for v in values]
    m = sum(a) / len(a)
    sd = (sum((v - m) ** 2 for v in a) / (len(a) - 1)) ** 0.5 if len(a) > 1 else 0.0
    return {"mean": round(m, 4), "std": round(sd, 4), "values": [round(v, 4) for v in a]}


def aggregate(per_seed: dict, keys=("acc_mean", "acc_p10", "acc_worst10")) -> dict:
    """{method: {cohort: {key: mean/std/values over seeds}}} from {seed: {method: {cohort: {...}}}}."""
    out: dict = {}
    seeds = list(per_seed)
    for m in per_seed[seeds[0]]:
        for c in ("seen", "unseen"):
            if all(c in per_seed[sd].get(m, {}) for sd in seeds):
                out.setdefault(m, {})[c] = {k: mean_std([per_seed[sd][m][c][k] for sd in seeds]) for k in keys}
    return out


def print_table(agg: dict, keys=("acc_mean", "acc_p10", "acc_worst10")) -> None:
    print(f"{'method':<11} {'cohort':<7} " + " ".join(f"{k.replace('acc_', ''):>15}" for k in keys))
    for m, r in agg.items():
        for c, v in r.items():
            print(f"{m:<11} {c:<7} " + " ".join(f"{v[k]['mean']:>8.3f}+-{v[k]['std']:<5.3f}" for k in keys))


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--store", default=str(Path(tempfile.gettempdir()) / "simfed-bench" / "fmnist-c2-100"))
    ap.add_argument("--rounds", type=int, default=150)
    ap.add_argument("--clients-per-round", type=int, default=10)
    ap.add_argument("--local-steps", type=int, default=50)
    ap.add_argument("--pefll-lr", type=float, default=2e-3)
    ap.add_argument("--pefll-server-lr", type=float, default=1e-3)
    ap.add_argument("--descriptor-norm", default="first", choices=("first", "none"))
    ap.add_argument("--decay", default="decoupled", choices=("decoupled", "none"))
    ap.add_argument("--fedavg-lr", type=float, default=0.01)
    ap.add_argument("--unseen-exchanges", type=int, default=20)
    ap.add_argument("--methods", default="pefll,pfedhn,fedavg")
    ap.add_argument("--no-mask-eval", action="store_true", help="skip the pefll+mask re-evaluation")
    ap.add_argument("--backend", default="ray", choices=("ray", "serial"))
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--seeds", default="0", help="comma-separated run seeds (same store); mean +- std over them")
    ap.add_argument("--out", default="", help="also write the JSON here (temp file, then rename)")
    ap.add_argument("--eval-every", type=int, default=0,
                    help="also evaluate every N rounds (learning curve in each run's metrics; costs eval time)")
    ap.add_argument("--work", default="", help="keep the runs here (default: a new temp folder)")
    ap.add_argument("--merge", nargs="+", default=[], metavar="JSON",
                    help="run nothing: one table over the seeds and methods of earlier --out files")
    args = ap.parse_args(argv)
    if args.merge:
        per_seed, runs, setup = merge(args.merge, "hypernet_learning")
        return report(per_seed, runs, setup, args.out)
    store = ensure_store(args.store)
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="simfed-hn-bench-"))
    keys = ("clients", "acc_mean", "acc_p10", "acc_worst10")
    if args.backend == "ray":
        cluster.connect("", num_cpus=args.workers)
    per_seed, runs = {}, {}
    for seed in [int(v) for v in args.seeds.split(",")]:
        args.seed = seed
        cfgs = method_configs(args)
        results = per_seed.setdefault(seed, {})
        for m in args.methods.split(","):
            summ, times = run_one(store, cfgs[m], args, work / f"s{seed}" / m)
            results[m] = {c: {k: summ[c][k] for k in keys} for c in summ}
            runs.setdefault(m, {"config": cfgs[m]})[seed] = times
            print(f"# seed {seed} {m}: {times} {results[m]}", file=sys.stderr, flush=True)
            if m == "pefll" and not args.no_mask_eval:
                summ = reevaluate(store, {**cfgs[m], "label_mask": True}, args, work / f"s{seed}" / m,
                                  work / f"s{seed}" / "pefll-mask")
                results["pefll+mask"] = {c: {k: summ[c][k] for k in keys} for c in summ}
        if args.out:
            partial(args.out, {"bench": "hypernet_learning", "partial": True, **settings(args, store),
                               "per_seed": per_seed, "runs": runs})
    return report(per_seed, runs, settings(args, store), args.out)


SETTINGS = ("store", "backend", "workers", "rounds", "clients_per_round", "local_steps")


def settings(args, store: str) -> dict:
    """What must agree for seeds of different invocations to be merged into one table."""
    return dict(zip(SETTINGS, (store, args.backend, args.workers, args.rounds, args.clients_per_round,
                               args.local_steps)))


def report(per_seed: dict, runs: dict, setup: dict, out_path: str) -> dict:
    agg = aggregate(per_seed)
    print_table(agg)
    checks = {}
    if "pefll" in agg:
        pe = agg["pefll"]
        checks["pefll_unseen_mean"] = pe["unseen"]["acc_mean"]["mean"]
        checks["pefll_unseen_at_least_0.90"] = pe["unseen"]["acc_mean"]["mean"] >= 0.90
        checks["pefll_unseen_minus_seen"] = round(pe["unseen"]["acc_mean"]["mean"] - pe["seen"]["acc_mean"]["mean"], 4)
        checks["pefll_gap_within_3pts"] = abs(checks["pefll_unseen_minus_seen"]) <= 0.03
        for other in ("fedavg", "pfedhn"):
            if other in agg:
                checks[f"pefll_unseen_above_{other}"] = (pe["unseen"]["acc_mean"]["mean"]
                                                        > agg[other]["unseen"]["acc_mean"]["mean"])
    out = {"bench": "hypernet_learning", **setup, "seeds": ",".join(str(s) for s in per_seed),
           "mean_std": agg, "per_seed": per_seed, "runs": runs, "checks": checks}
    print(json.dumps(out))
    if out_path:
        partial(out_path, out)
    return out


def merge(paths: list[str], bench: str, keys: tuple = SETTINGS) -> tuple[dict, dict, dict]:
    """per_seed, runs and settings of earlier `--out` files (finished or partial) of the same bench.

    Each (seed, method) must come from one file only, and the files' settings and each method's
    config must agree: a table over seeds run with different rounds or learning rates would be
    meaningless."""
    per_seed, runs, setup, origin = {}, {}, {}, {}
    for path in paths:
        try:
            obj = json.loads(Path(path).read_text())
        except (OSError, ValueError) as e:
            fail(f"--merge {path}: not a readable JSON file ({e}); pass files written by --out")
        if not isinstance(obj, dict) or obj.get("bench") != bench or not isinstance(obj.get("per_seed"), dict):
            fail(f"--merge {path}: not a {bench} --out file")
        for k, v in ((k, obj[k]) for k in keys if k in obj):
            # backend and worker count do not change a run's numbers (bit-identical by design)
            if k in setup and setup[k] != v and k not in ("workers", "backend"):
                fail(f"--merge {path}: {k} = {v!r}, but {origin[k]} has {setup[k]!r}; "
                     "merge only runs with the same settings")
            setup.setdefault(k, v)
            origin.setdefault(k, path)
        for seed, methods in obj["per_seed"].items():
            for m, res in methods.items():
                if m in per_seed.get(seed, {}):
                    fail(f"--merge {path}: seed {seed} {m} is also in an earlier file; keep it in one file only")
                per_seed.setdefault(seed, {})[m] = res
        for m, r in obj.get("runs", {}).items():
            if m in runs and runs[m].get("config") != r.get("config"):
                fail(f"--merge {path}: {m} ran with config {r.get('config')}, an earlier file with "
                     f"{runs[m].get('config')}; merge only runs with the same settings")
            runs.setdefault(m, {}).update(r)
    return dict(sorted(per_seed.items(), key=lambda kv: int(kv[0]))), runs, setup


def fail(msg: str) -> None:
    print(f"error: {msg}", file=sys.stderr)
    raise SystemExit(2)


def partial(path: str, obj: dict) -> None:
    tmp = Path(path).with_suffix(".tmp")
    tmp.parent.mkdir(parents=True, exist_ok=True)
    tmp.write_text(json.dumps(obj, indent=1))
    tmp.replace(path)


if __name__ == "__main__":
    main()
