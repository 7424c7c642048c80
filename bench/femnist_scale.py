"""FEMNIST scale: one FedAvg round over all 3,597 synthetic-FEMNIST writers, one local epoch each.

The store is generated with unseen_fraction = 0 (every writer is a "seen" training client) at
data/synthetic-femnist-3597-all if absent; `--unseen-fraction 0.1` gives the default store layout
instead (then the round trains the 3,237 seen writers, and says so in the output).

Engine: embedded local Ray (num_cpus = cores), `cores` workers with 1 CPU each, rounds = 1,
clients_per_round = every seen client, fedavg local_epochs = 1 (each sample once, last batch
partial), then the engine's final evaluation over run.eval_clients (default 50) seen clients,
timed separately.
Both sides are timed the same way: warm, start-up excluded and reported apart.
- round_s: the engine's own "round" event. The workers warmed up at pool start (one tiny
  forward/backward, `worker_warmup_s`), so this single round is what any round costs;
- ray_startup_s, pool_startup_s (actors up, warm-up included), eval_s, end_to_end_s;
- plain: the same clients, samples and batch indices with one 1-thread process per core
  (bench/_common.PlainPool: processes started, data loaded and warmed up before Ray starts, at
  the niceness Ray gives its workers, 15 by default), timed on its round only; it trains right
  after the engine's round, inside the engine's "round" event (Ray workers idle), so both see
  about the same background load. ratio = plain seconds / engine round seconds (= engine
  samples/s over plain samples/s; target >= 0.90); cpu_ratio is the same in CPU seconds;
- memory: the peak over the run of the summed RSS of the driver and all processes it started
  (gcs_server, raylet, Ray agents, server and worker actors; the plain processes excluded),
  sampled every --memory-interval seconds (default 2) from /proc, RSS only: a few ms of CPU per
  sample (`sampler_cpu_s`; 16.7 CPU-s over a 32-minute run at load 25-90 with 1 s sampling, under
  1% of one core), where PSS sampling every 0.5 s took 3.6-4.4 CPU-s of a ~70 s run;
  --pss adds the summed PSS (shared pages counted once), which reads every process's smaps.
  Target: the summed RSS under 3 GiB.

Usage: python bench/femnist_scale.py [--json] [--store DIR] [--eval-clients 50] [--no-plain]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _common as C  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clients", type=int, default=3597)
    ap.add_argument("--unseen-fraction", type=float, default=0.0)
    ap.add_argument("--store", default="", help="default data/synthetic-femnist-<clients>-all (or "
                                                "-<clients> when --unseen-fraction > 0)")
    ap.add_argument("--local-epochs", type=float, default=1.0)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--eval-clients", type=int, default=50)
    ap.add_argument("--workers", type=int, default=0, help="0: one per core")
    ap.add_argument("--no-plain", action="store_true", help="skip the plain-PyTorch baseline")
    ap.add_argument("--plain-nice", type=int, default=None,
                    help="niceness of the plain processes; default: Ray's worker niceness (RAY_worker_niceness, 15)")
    ap.add_argument("--ray-worker-niceness", type=int, default=None,
                    help="set RAY_worker_niceness before ray.init (default: leave Ray's default, 15)")
    ap.add_argument("--pss", action="store_true", help="also sample PSS (reads smaps: seconds of CPU in the driver)")
    ap.add_argument("--memory-interval", type=float, default=2.0, help="seconds between memory samples")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()

    from simfed.algorithms.fedavg import FedAvgConfig
    from simfed.partitions.store import PartitionStore

    ncores = C.cores()
    workers = a.workers or ncores
    suffix = "-all" if a.unseen_fraction == 0 else ""
    store, gen_s = C.ensure_store(a.store or C.ROOT / "data" / f"synthetic-femnist-{a.clients}{suffix}",
                                  a.clients, unseen_fraction=a.unseen_fraction)
    st = PartitionStore.open(store)
    seen = [int(c) for c in st.client_ids("seen")]
    n_all = len(st.client_ids())
    cfg = FedAvgConfig(local_epochs=a.local_epochs, batch_size=a.batch_size)
    plain_cfg = {"batch_size": cfg.batch_size, "lr": cfg.lr, "momentum": cfg.momentum,
                 "weight_decay": cfg.weight_decay, "local_steps": cfg.local_steps, "local_epochs": cfg.local_epochs}
    cohort = C.cohorts(store, a.seed, 1, len(seen))
    load0 = C.loadavg()

    if a.ray_worker_niceness is not None:
        os.environ["RAY_worker_niceness"] = str(a.ray_worker_niceness)
    plain_nice = C.ray_worker_niceness() if a.plain_nice is None else a.plain_nice
    pool = None if a.no_plain else C.PlainPool(store, cohort, procs=workers, cfg=plain_cfg, seed=a.seed,
                                               nice=plain_nice)
    plain_pids = {p.pid for p in pool.procs} if pool else set()

    def after_round(r: int):
        return pool.run_round(r - 1) if pool else None

    mem = C.MemorySampler(a.memory_interval, pss=a.pss, exclude=plain_pids).__enter__()
    ray_s = C.connect_ray(ncores)
    try:
        rec = C.run_engine(store, rounds=1, clients_per_round=len(seen), workers=workers, algo_cfg=cfg,
                           eval_clients=a.eval_clients, seed=a.seed, after_round=after_round,
                           exclude_pids=plain_pids)
        mem.sample()  # once more with Ray and the actors still up
    finally:
        mem.__exit__(None, None, None)  # stop sampling before Ray shuts down
        shutdown_s = C.disconnect_ray()
        if pool:
            pool.close()
    plain = pool.summary() if pool else None
    load1 = C.loadavg()

    rnd = rec.rounds[0]
    cpu_round = rnd["cpu"]
    engine = {
        "backend": "ray", "ray_init": C.RAY_INIT["how"], "workers": workers, "cpus_per_worker": 1, "worker_niceness": rec.worker_nice,
        "clients_trained": rnd["clients"], "samples": rnd["samples"],
        "round_s": round(rnd["seconds"], 3),
        "samples_per_s": round(rnd["samples"] / rnd["seconds"], 1),
        "ray_startup_s": round(ray_s, 3),
        "pool_startup_s": round(rec.t_start - rec.t_call, 3) if rec.t_start else None,
        "worker_warmup_s": [w.get("warmup_s") for w in rec.workers],
        "eval_clients_per_cohort": a.eval_clients,
        "eval_s": round(rec.t_eval - rnd["t_end"] - rnd["paused_s"], 3) if rec.t_eval else None,
        "end_to_end_s": round(rec.t_return - rec.t_call - rnd["paused_s"], 3),
        "ray_shutdown_s": round(shutdown_s, 3),
        # CPU seconds of every process of the run from the "start" event to the end of the round
        "round_cpu_seconds_by_process": cpu_round,
        "round_cpu_seconds": round(sum(cpu_round.values()), 3),
        "worker_busy_s": {w: round(v, 2) for w, v in sorted(rec.worker_busy.get(1, {}).items())},
    }
    out = {
        "benchmark": "femnist_scale", "cores": ncores, "loadavg_before": load0, "loadavg_after": load1,
        "store": store, "store_generated_s": round(gen_s, 1), "store_clients": n_all, "seen_clients": len(seen),
        "note": ("all writers are training clients (unseen_fraction = 0)" if len(seen) == n_all else
                 f"trained the {len(seen)} seen writers of {n_all}; the {n_all - len(seen)} unseen ones "
                 "only take part in evaluation"),
        "config": {"local_epochs": a.local_epochs, "batch_size": a.batch_size, "lr": cfg.lr,
                   "momentum": cfg.momentum, "seed": a.seed},
        "engine": engine,
        "memory": {**mem.report(), "target_GiB": 3.0, "target": "summed RSS under 3 GiB",
                   "meets_target": mem.peak_rss < 3 * (1 << 30)},
    }
    if plain:
        out["plain"] = plain
        out["same_samples"] = plain["samples"] == rnd["samples"]
        out["ratio"] = round(plain["seconds"] / rnd["seconds"], 4)
        out["target"] = 0.90
        out["meets_target"] = out["ratio"] >= 0.90
        if engine["round_cpu_seconds"] > 0:
            out["cpu_ratio"] = round(plain["cpu_seconds"] / engine["round_cpu_seconds"], 4)
            # the memory sampler runs in the driver (PSS reads /proc/PID/smaps: not free); take it out
            excl = engine["round_cpu_seconds"] - mem.cpu_s
            out["cpu_ratio_excl_memory_sampler"] = round(plain["cpu_seconds"] / excl, 4) if excl > 0 else None
            workers_cpu = cpu_round.get("worker_actor", 0.0)
            out["worker_cpu_ratio"] = round(plain["cpu_seconds"] / workers_cpu, 4) if workers_cpu else None
    if a.json:
        print(json.dumps(out, indent=2))
    else:
        print(f"round over {rnd['clients']} clients: {rnd['seconds']:.1f}s engine"
              + (f", {plain['seconds']:.1f}s plain, ratio {out['ratio']:.3f}" if plain else "")
              + f"; peak memory (sum RSS) {mem.peak_rss / (1 << 30):.2f} GiB")


if __name__ == "__main__":
    main()
