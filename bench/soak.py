"""Soak: does a long run's memory stay flat? FedAvg and PeFLL for 500 rounds each on a small store.

Each method runs once through `simfed.launch` (Ray backend, embedded Ray, a pool of `--workers`),
evaluating every `--eval-every` rounds and checkpointing every `--checkpoint-every` rounds, so the
paths a long run repeats (training phases, evaluation, checkpoints, metrics files) all recur. At
every round's "saved" event the driver samples the resident set (RSS) of itself, the server actor
and every worker actor (the pids the run's "start" event names) and their private part (RSS less
the shared object-store pages Ray maps in).

Growth per 100 rounds: the least-squares slope of RSS over the rounds after `--warmup`, times 100,
as a percentage of the fitted RSS at the end of the warm-up. Target: < 2% for every process. The
figures are one run's; a process that was replaced during the run (a worker that died) is reported
with `replaced: true` and its growth is not comparable.

Usage: python bench/soak.py [--rounds 500] [--methods fedavg,pefll] [--json out.json]
Prints one JSON object: per method and process, RSS at the warm-up's end and at the end (MiB),
growth per 100 rounds (%), and whether it meets the target. Ours, not from a paper.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

TARGET_PCT = 2.0
METHODS = {
    # Small models and few local steps: the soak is about what repeats, not about compute.
    "fedavg": {"name": "fedavg", "local_steps": 2, "batch_size": 16},
    "pefll": {"name": "pefll", "local_steps": 2, "batch_size": 16, "descriptor_batch": 16},
}


class Sampler:
    """The run's listener: the pids from "start", then one RSS sample per process at every "saved"."""

    def __init__(self):
        import psutil

        self.psutil = psutil
        self.procs: dict[str, object] = {"driver": psutil.Process()}
        self.samples: dict[str, list[tuple[int, int, int]]] = {}  # name -> [(round, rss, private)]
        self.replaced: set[str] = set()
        self.t0 = time.perf_counter()
        self.seconds: list[float] = []

    def __call__(self, event: dict) -> None:
        if event["type"] == "start":
            ps = self.psutil
            pids = {"server": event["server_pid"], **{f"worker{w['index']}": w["pid"] for w in event["workers"]}}
            for name, pid in pids.items():
                old = self.procs.get(name)
                if old is not None and old.pid != pid:
                    self.replaced.add(name)
                self.procs[name] = ps.Process(pid)
        elif event["type"] == "round":
            self.seconds.append(float(event["seconds"]))
        elif event["type"] == "saved":
            for name, proc in self.procs.items():
                try:
                    rss = proc.memory_info().rss
                    shared = sum(m.rss for m in proc.memory_maps(grouped=True)
                                 if "plasma" in m.path or m.path.startswith("/dev/shm") or "memfd" in m.path)
                except self.psutil.Error:  # the process ended (a replaced worker): its series stops
                    self.replaced.add(name)
                    continue
                self.samples.setdefault(name, []).append((int(event["round"]), rss, rss - shared))
            if event["round"] % 50 == 0:  # progress on stderr: a soak on a busy machine takes a while
                rss = " ".join(f"{k} {v[-1][1] / 2**20:.0f}" for k, v in self.samples.items())
                print(f"round {event['round']}: RSS MiB {rss}", file=sys.stderr, flush=True)


def growth(series: list[tuple[int, int, int]], warmup: int, column: int) -> dict:
    """Least-squares slope after the warm-up, per 100 rounds, in MiB and in % of the fitted start."""
    pts = np.array([(t[0], t[column]) for t in series if t[0] > warmup], dtype=float)
    if len(pts) < 3:
        return {"points": int(len(pts))}
    slope, intercept = (float(v) for v in np.polyfit(pts[:, 0], pts[:, 1], 1))
    start = slope * warmup + intercept
    return {"points": int(len(pts)), "start_mib": round(start / 2**20, 1),
            "end_mib": round(float(pts[-1, 1]) / 2**20, 1), "max_minus_min_mib": round(float(np.ptp(pts[:, 1])) / 2**20, 1),
            "mib_per_100_rounds": round(100 * slope / 2**20, 3), "pct_per_100_rounds": round(100 * 100 * slope / start, 3)}


def soak(method: str, store: str, a, out_dir: Path) -> dict:
    import simfed

    sampler = Sampler()
    config = {"data": {"path": store},
              "run": {"rounds": a.rounds, "clients_per_round": a.cohort, "eval_every": a.eval_every,
                      "checkpoint_every": a.checkpoint_every, "seed": 0},
              "algorithm": METHODS[method],
              "engine": {"backend": "ray", "workers": a.workers, "cpus_per_worker": 1}}
    t0 = time.perf_counter()
    simfed.launch(config, out=out_dir / method, on_event=sampler)
    procs = {}
    for name, series in sampler.samples.items():
        rss, private = growth(series, a.warmup, 1), growth(series, a.warmup, 2)
        procs[name] = {"rss": rss, "private": private, "replaced": name in sampler.replaced,
                       "meets_target": name not in sampler.replaced
                       and rss.get("pct_per_100_rounds", float("inf")) < TARGET_PCT}
    return {"wall_s": round(time.perf_counter() - t0, 1),
            "round_s_median": round(float(np.median(sampler.seconds)), 4) if sampler.seconds else None,
            "processes": procs, "all_meet_target": all(p["meets_target"] for p in procs.values())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=500)
    ap.add_argument("--warmup", type=int, default=100, help="Rounds left out of the growth fit.")
    ap.add_argument("--methods", default="fedavg,pefll")
    ap.add_argument("--clients", type=int, default=40, help="Writers in the synthetic-FEMNIST store.")
    ap.add_argument("--cohort", type=int, default=8, help="Clients per round.")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--eval-every", type=int, default=50)
    ap.add_argument("--checkpoint-every", type=int, default=25)
    ap.add_argument("--store", default=None)
    ap.add_argument("--json", default=None, help="Also write the result to this file.")
    a = ap.parse_args()
    store, gen_s = C.ensure_store(a.store or C.ROOT / "data" / f"synthetic-femnist-{a.clients}", a.clients)
    out = {"rounds": a.rounds, "warmup": a.warmup, "target_pct_per_100_rounds": TARGET_PCT, "store": store,
           "clients": a.clients, "cohort": a.cohort, "workers": a.workers, "cores": C.cores(),
           "loadavg_before": C.loadavg(), "methods": {}}
    with tempfile.TemporaryDirectory(prefix="simfed-soak-") as tmp:
        for method in a.methods.split(","):
            out["methods"][method] = soak(method, store, a, Path(tmp))
    out["loadavg_after"] = C.loadavg()
    text = json.dumps(out, indent=2)
    if a.json:
        Path(a.json).write_text(text)
    print(text)


if __name__ == "__main__":
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    main()
