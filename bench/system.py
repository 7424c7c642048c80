"""Clients as they really are: time to accuracy under sync, over-commitment + deadline, and FedBuff;
PeFLL vs FedAvg under dropout; the clock's own overhead. One run of this script, three parts:

1. `time_to_accuracy`: FedAvg on synthetic FEMNIST with lognormal device speeds ([system]
   defaults, log-spread `--spread`), three ways: sync rounds of K clients; sync with
   overcommit 1.3 and a deadline (the `--deadline-quantile` of the clients' round durations);
   FedBuff with concurrency 2K and buffer K. Each runs `--rounds` server steps, evaluated every
   `--eval-every`; the target is the highest seen-client test accuracy all three reach (times
   0.99), and each reports the virtual seconds and the wall seconds of training (evaluation
   excluded) to the first evaluation at the target, and the server steps it took.
2. `dropout`: PeFLL vs FedAvg with [system] dropout 0 / 0.2 / 0.5 (availability always, no
   deadline), seen and unseen test accuracy after `--dropout-rounds` rounds, mean ± std over
   `--seeds`, on Fashion-MNIST with 2 classes per client (100 clients, 10 unseen: the store and
   the PeFLL settings of bench/table1_baselines.py, where PeFLL is known to learn in a few dozen
   rounds; on synthetic FEMNIST it needs far more).
3. `overhead`: wall seconds per round of the same FedAvg run without [system] and with an ideal
   [system] table (lognormal speeds, availability always: the same cohorts and numbers), the
   runs interleaved `--overhead-reps` times, median over rounds 2..R; plus the clock's own
   planning time per round with availability 0.8 (a draw per seen client per round).

Serial backend, one torch thread. Timings on a loaded machine are unreliable: re-measure the wall
figures (part 1's wall seconds, part 3) on an idle machine.

    python bench/system.py --json --out system.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import ensure_store, loadavg  # noqa: E402

from simfed.engine import metrics  # noqa: E402
from simfed.engine.config import parse  # noqa: E402
from simfed.engine.loop import run_experiment  # noqa: E402


FMNIST = "/usr/share/datasets/fashion-mnist"


def fmnist_store(path: str) -> str:
    """Fashion-MNIST, 2 classes per client, 100 clients (built through the CLI when absent)."""
    if not (Path(path) / "manifest.json").exists():
        subprocess.run([sys.executable, "-m", "simfed.cli.main", "partition", "idx", FMNIST, path, "--scheme",
                        "classes", "--classes-per-client", "2", "--clients", "100", "--seed", "0"], check=True)
    return path


def experiment(a, algorithm: dict, *, seed: int = 0, rounds: int, eval_every: int, system: dict | None = None,
               run: dict | None = None, store: str = "") -> object:
    doc = {"data": {"path": store or a.store},
           "run": {"rounds": rounds, "clients_per_round": a.clients_per_round, "eval_every": eval_every,
                   "checkpoint_every": 0, "seed": seed, "eval_clients": a.eval_clients, **(run or {})},
           "algorithm": algorithm, "engine": {"backend": "serial"}}
    if system is not None:
        doc["system"] = system
    return parse(doc, "bench")


def timed_run(exp, run_dir: Path) -> dict:
    """Run `exp`; per round its wall seconds (training only) and virtual end time; the curve."""
    rounds: list[dict] = []
    run_experiment(exp, run_dir, backend="serial",
                   on_event=lambda e: rounds.append({"wall": e["seconds"], "virtual": e.get("virtual_time")})
                   if e["type"] == "round" else None)
    cv = metrics.curve(metrics.load(run_dir))
    seen = cv.filter((cv["split"] == "test") & (cv["cohort"] == "seen")).sort("round")
    return {"rounds": rounds, "acc": dict(zip(seen["round"].to_list(), seen["acc_mean"].to_list()))}


def fedavg(a) -> dict:
    return {"name": "fedavg", "local_steps": a.local_steps, "lr": a.lr}


def deadline_for(a, system: dict) -> float:
    """The `--deadline-quantile` of the seen clients' FedAvg round durations under `system`."""
    from simfed.engine.clock import RoundClock
    from simfed.engine.plan import check_experiment, n_train

    exp = experiment(a, fedavg(a), rounds=1, eval_every=0, system=system)
    plan = check_experiment(exp)
    rc = RoundClock(exp, plan.task, plan.seen, n_train(plan.store.clients), ["update"])
    works = rc.works.of(["update"])
    durations = sorted(sum(sum(rc.clock.seconds(c, w)) for w in works(c)) for c in plan.seen)
    return durations[min(len(durations) - 1, int(a.deadline_quantile * len(durations)))]


def time_to_accuracy(a, work: Path) -> dict:
    base = {"compute_spread": a.spread, "down_spread": a.spread, "up_spread": a.spread}
    deadline = deadline_for(a, base)
    setups = {
        "sync": (base, {}),
        "sync_overcommit_deadline": ({**base, "overcommit": 1.3, "deadline": deadline}, {}),
        "fedbuff": (base, {"aggregation": "fedbuff", "buffer_size": a.clients_per_round}),
    }
    runs = {}
    for name, (system, run) in setups.items():
        k = {"clients_per_round": 2 * a.clients_per_round} if name == "fedbuff" else {}
        exp = experiment(a, fedavg(a), rounds=a.rounds, eval_every=a.eval_every, system=system, run={**run, **k})
        runs[name] = timed_run(exp, work / f"tta-{name}")
        print(f"# {name}: best seen acc {max(runs[name]['acc'].values()):.4f}", file=sys.stderr, flush=True)
    target = 0.99 * min(max(r["acc"].values()) for r in runs.values())
    table = {}
    for name, r in runs.items():
        at = min(rd for rd, acc in r["acc"].items() if acc >= target)
        table[name] = {"server_steps": at, "virtual_seconds": round(r["rounds"][at - 1]["virtual"], 1),
                       "wall_seconds": round(sum(x["wall"] for x in r["rounds"][:at]), 2),
                       "final_acc": round(r["acc"][max(r["acc"])], 4)}
    sync = table["sync"]
    for row in table.values():
        row["virtual_vs_sync"] = round(row["virtual_seconds"] / sync["virtual_seconds"], 3)
        row["wall_vs_sync"] = round(row["wall_seconds"] / sync["wall_seconds"], 3)
    return {"target_acc": round(target, 4), "deadline_s": round(deadline, 2), "table": table}


def dropout(a, work: Path) -> dict:
    store = fmnist_store(a.dropout_store)
    steps = a.dropout_local_steps
    methods = {"fedavg": {"name": "fedavg", "local_steps": steps, "lr": 0.01},
               "pefll": {"name": "pefll", "local_steps": steps, "embed_dim": 23, "lr": 2e-3, "server_lr": 2e-4,
                         "label_mask": False}}
    per: dict = {}
    for m, algo in methods.items():
        for p in a.dropouts:
            for seed in a.seeds:
                exp = experiment(a, algo, seed=seed, rounds=a.dropout_rounds, eval_every=0, system={"dropout": p},
                                 store=store)
                res = run_experiment(exp, work / f"drop-{m}-{p}-{seed}", backend="serial")
                summ = {row["cohort"]: 100.0 * row["acc_mean"] for row in res["summary"]}
                per.setdefault(m, {}).setdefault(p, []).append(summ)
                print(f"# dropout {m} p={p} seed={seed}: {summ}", file=sys.stderr, flush=True)
    table = {m: {str(p): {c: _mean_std([s[c] for s in runs]) for c in ("seen", "unseen")}
                 for p, runs in by_p.items()} for m, by_p in per.items()}
    return {"store": store, "rounds": a.dropout_rounds, "local_steps": steps, "seeds": a.seeds, "methods": methods,
            "table": table}


def _mean_std(values: list[float]) -> str:
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.2f} ± {sd:.2f}"


def overhead(a, work: Path) -> dict:
    plain = experiment(a, fedavg(a), rounds=a.overhead_rounds, eval_every=a.overhead_rounds)
    clocked = experiment(a, fedavg(a), rounds=a.overhead_rounds, eval_every=a.overhead_rounds, system={})
    walls: dict[str, list[float]] = {"plain": [], "system": []}
    for rep in range(a.overhead_reps):
        for name, exp in (("plain", plain), ("system", clocked)):
            r = timed_run(exp, work / f"ovh-{name}-{rep}")
            walls[name] += [x["wall"] for x in r["rounds"][1:]]
    med = {k: statistics.median(v) for k, v in walls.items()}
    return {"rounds": a.overhead_rounds, "reps": a.overhead_reps, "median_round_s": {k: round(v, 4) for k, v in med.items()},
            "ratio_system_vs_plain": round(med["system"] / med["plain"], 4), "target_ratio_max": 1.05,
            "clock_plan_ms_per_round": round(plan_cost(a), 3)}


def plan_cost(a, rounds: int = 200) -> float:
    """Milliseconds the clock takes to plan one sync round with a per-client availability draw."""
    from simfed.engine.clock import RoundClock
    from simfed.engine.plan import check_experiment, n_train

    exp = experiment(a, fedavg(a), rounds=rounds, eval_every=0, system={"availability": 0.8, "dropout": 0.1})
    plan = check_experiment(exp)
    rc = RoundClock(exp, plan.task, plan.seen, n_train(plan.store.clients), ["update"])
    t0 = time.perf_counter()
    for r in range(rounds):
        rc.plan(r, ["update"])
    return 1e3 * (time.perf_counter() - t0) / rounds


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--store", default=str(Path(tempfile.gettempdir()) / "simfed-bench" / "synthetic-femnist-200"))
    ap.add_argument("--clients", type=int, default=200)
    ap.add_argument("--clients-per-round", type=int, default=10)
    ap.add_argument("--local-steps", type=int, default=10)
    ap.add_argument("--lr", type=float, default=0.05)
    ap.add_argument("--eval-clients", type=int, default=40)
    ap.add_argument("--rounds", type=int, default=60)
    ap.add_argument("--eval-every", type=int, default=5)
    ap.add_argument("--spread", type=float, default=0.8, help="log-spread of compute, down and up speeds")
    ap.add_argument("--deadline-quantile", type=float, default=0.7)
    ap.add_argument("--dropout-store", default=str(Path(tempfile.gettempdir()) / "simfed-bench" / "fmnist-c2-100"))
    ap.add_argument("--dropout-rounds", type=int, default=40)
    ap.add_argument("--dropout-local-steps", type=int, default=25)
    ap.add_argument("--dropouts", type=lambda s: [float(x) for x in s.split(",")], default=[0.0, 0.2, 0.5])
    ap.add_argument("--seeds", type=lambda s: [int(x) for x in s.split(",")], default=[0, 1, 2])
    ap.add_argument("--overhead-rounds", type=int, default=12)
    ap.add_argument("--overhead-reps", type=int, default=2)
    ap.add_argument("--parts", default="time_to_accuracy,dropout,overhead")
    ap.add_argument("--json", action="store_true", help="print the result as one JSON line")
    ap.add_argument("--out", default="")
    a = ap.parse_args(argv)
    import torch

    torch.set_num_threads(1)
    a.store, _ = ensure_store(a.store, a.clients)
    work = Path(tempfile.mkdtemp(prefix="simfed-system-"))
    out: dict = {"bench": "system", "store": a.store, "clients_per_round": a.clients_per_round,
                 "local_steps": a.local_steps, "loadavg_start": loadavg()}
    for part in a.parts.split(","):
        t0 = time.perf_counter()
        out[part] = {"time_to_accuracy": time_to_accuracy, "dropout": dropout, "overhead": overhead}[part](a, work)
        out[part]["seconds"] = round(time.perf_counter() - t0, 1)
        if a.out:  # what is done survives a cut-short run
            Path(a.out).write_text(json.dumps(out, indent=1))
    out["loadavg_end"] = loadavg()
    print(json.dumps(out) if a.json else json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    main()
