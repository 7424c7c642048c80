"""Engine efficiency: FedAvg through the real engine (Ray backend) vs plain PyTorch on the same samples.

Engine side: embedded local Ray with num_cpus = cores (what `simfed launch` starts), a pool of
`cores` workers with 1 CPU each, `run_experiment` with eval/checkpoint only after the last round.
Per-round times come from the engine's own events ("round" -> seconds, "chunk" -> samples):
- ray_startup_s: `ray.init` (cluster.connect), not in any throughput figure;
- pool_startup_s: run_experiment call -> "start" event (store open, server + worker actors up,
  each worker's warm-up: one tiny forward/backward of the method's model, `workers[].warmup_s`);
- round 1 ("warmup_round" in the JSON for continuity: since the workers warm up at pool start it
  is an ordinary round) is reported apart;
- timed rounds 2..R: samples / wall time from the end of round 1 to the end of round R (this wall
  also holds the engine's between-round work, e.g. the server memory query and status file);
  `sum_round_seconds` is the engine's own per-round figure for comparison;
- all rounds 1..R: the same from the start of round 1 (for `ratio_round1`);
- eval_s: end of the last round -> "eval" event (run.eval_clients per cohort), excluded.

Plain side (bench/_common.PlainPool): the cohorts of every round (same client ids, same local
steps, batch size and batch indices), one 1-thread process per core, clients split LPT, started and
warmed up before Ray. Paired design: right after each engine round, inside the engine's "round"
event (Ray workers idle), the plain processes train that round's cohort; those pauses are taken
out of the engine's wall time. Pairs see the same background load, which matters on a shared
machine. Both sides are warm before their round 1 (plain: a few steps at process start; engine:
the workers' warm-up at pool start), and neither side's start-up is in any ratio. Figures:
- ratio = engine samples/s / plain samples/s over rounds 2..R, steady state (target >= 0.95);
- ratio_round1 = the same over rounds 1..R, the first round included (target >= 0.90);
- ratio_median_of_pairs: median over rounds of plain_s / engine_s (robust to one disturbed round);
- niceness: Ray runs every worker process (actors included) at nice 15 (RAY_worker_niceness); the
  plain processes get the same niceness by default (--plain-nice), else on a loaded machine the
  comparison measures the scheduler, not the engine;
- worker_busy_imbalance: worst round's max/mean - 1 of the workers' summed client seconds;
- cpu_ratio: the same in samples per CPU-second (engine: every process of the run; plain: its
  processes), worker_cpu_ratio: engine worker actors only (isolates per-client overhead from the
  cost of the driver/server/Ray daemons).

Models (--model, a built-in name or "package.module:factory"; --model-key KEY=VALUE for its keys,
values in TOML syntax): both sides train the same network on the same samples. The default store
fits the model: synthetic FEMNIST for lenet, a CIFAR-10-layout store for resnet18 and a LEAF
Shakespeare-layout store for charlstm (bench/_common.ensure_model_store; --clients clients).

Usage: python bench/efficiency.py [--clients 400] [--rounds 6] [--clients-per-round 40]
       [--local-steps 20] [--batch-size 32] [--store DIR] [--no-plain] [--json]
       [--model lenet|resnet18|charlstm|pkg.mod:factory] [--model-key KEY=VALUE ...]
       [--profile-serial N]  (cProfile of N clients through the serial backend's Worker.run; no Ray)
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _common as C  # noqa: E402


def profile_serial(store: str, cfg, n_clients: int, top: int = 25, model: dict | None = None) -> str:
    """cProfile of the engine's client path (Worker.run) in this process, for the overhead diagnosis."""
    import cProfile
    import io
    import pstats
    import tempfile

    import torch

    from simfed.algorithms.base import RoundInfo, Task
    from simfed.engine.server import Server
    from simfed.engine.worker import Worker, WorkerSpec
    from simfed.partitions.store import PartitionStore

    torch.set_num_threads(1)
    st = PartitionStore.open(store)
    from simfed.algorithms.kit.models import parse_spec

    task = Task(**st.task_fields(), model=parse_spec(model or {"name": "lenet"}))
    ids = [int(c) for c in st.client_ids("seen")][:n_clients]
    with tempfile.TemporaryDirectory() as d:
        spec = WorkerSpec(store_path=store, algorithm="fedavg", cfg=cfg, task=task, seed=0, state_dir=d, threads=1)
        server, worker = Server("fedavg", cfg, task, 0), Worker(spec, 0)
        info = RoundInfo(round=0, seed=0)
        bcast = server.begin("update", info)
        worker.run("update", info, bcast, None, ids[:1])  # warm-up
        prof = cProfile.Profile()
        prof.enable()
        meta, res = worker.run("update", info, bcast, None, ids)
        server.receive(res, "update", info)
        server.end("update", info)
        prof.disable()
    out = io.StringIO()
    pstats.Stats(prof, stream=out).sort_stats("tottime").print_stats(top)
    return out.getvalue()


def model_table(name: str, keys: list[str]) -> dict:
    """The [model] table of --model and --model-key KEY=VALUE (VALUE parsed as TOML)."""
    import tomllib

    table: dict = {"name": name}
    for item in keys:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--model-key: expected KEY=VALUE, got {item!r}")
        table[key.strip()] = tomllib.loads(f"v = {value.strip()}")["v"]
    return table


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clients", type=int, default=400, help="store size (synthetic FEMNIST writers)")
    ap.add_argument("--rounds", type=int, default=6, help="rounds in all; round 1 is reported apart (>= 2)")
    ap.add_argument("--clients-per-round", type=int, default=40)
    ap.add_argument("--local-steps", type=int, default=20)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--workers", type=int, default=0, help="0: one per core")
    ap.add_argument("--store", default="", help="partition store dir (generated if absent); "
                                                "default data/synthetic-femnist-<clients>")
    ap.add_argument("--eval-clients", type=int, default=10, help="run.eval_clients of the (untimed) final eval")
    ap.add_argument("--no-plain", dest="plain", action="store_false", help="engine only")
    ap.add_argument("--plain-nice", type=int, default=None,
                    help="niceness of the plain processes; default: the same as Ray's worker processes "
                         "(RAY_worker_niceness, Ray's default 15), so both compete equally with other load")
    ap.add_argument("--ray-worker-niceness", type=int, default=None,
                    help="set RAY_worker_niceness before ray.init (default: leave Ray's default, 15)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--profile-serial", type=int, default=0, metavar="N",
                    help="only print a cProfile of N clients through Worker.run (serial, no Ray)")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--model", default="lenet", help="[model] name (default lenet, today's network)")
    ap.add_argument("--model-key", action="append", default=[], metavar="KEY=VALUE",
                    help="a key of the [model] table, VALUE in TOML syntax (repeatable)")
    a = ap.parse_args()
    if a.rounds < 2:
        ap.error("--rounds must be >= 2 (round 1 is reported apart from the steady state)")

    from simfed.algorithms.fedavg import FedAvgConfig

    ncores = C.cores()
    workers = a.workers or ncores
    model = model_table(a.model, a.model_key)
    default_store = {"resnet18": "cifar10-sample", "charlstm": "shakespeare-sample"}.get(a.model, "synthetic-femnist")
    store, gen_s = C.ensure_model_store(a.store or C.ROOT / "data" / f"{default_store}-{a.clients}", a.model,
                                        a.clients, seed=0)
    cfg = FedAvgConfig(local_steps=a.local_steps, batch_size=a.batch_size)
    if a.profile_serial:
        print(profile_serial(store, cfg, a.profile_serial, model=model))
        return
    plain_cfg = {"batch_size": cfg.batch_size, "lr": cfg.lr, "momentum": cfg.momentum,
                 "weight_decay": cfg.weight_decay, "local_steps": cfg.local_steps, "local_epochs": cfg.local_epochs,
                 "model": model}
    round_cohorts = C.cohorts(store, a.seed, a.rounds, a.clients_per_round)
    load0 = C.loadavg()

    # Paired design: the plain processes are started (data loaded, warmed up) before Ray, then each
    # timed engine round is followed at once by the plain round over the same cohort, run inside the
    # engine's "round" event while the Ray workers sit idle. Both sides of a pair see the same
    # background load, which on a shared machine drifts far more than the engine/plain difference.
    if a.ray_worker_niceness is not None:
        os.environ["RAY_worker_niceness"] = str(a.ray_worker_niceness)
    plain_nice = C.ray_worker_niceness() if a.plain_nice is None else a.plain_nice
    pool = (C.PlainPool(store, round_cohorts, procs=workers, cfg=plain_cfg, seed=a.seed, nice=plain_nice)
            if a.plain else None)
    plain_pids = {p.pid for p in pool.procs} if pool else set()

    def after_round(r: int):
        return pool.run_round(r - 1) if pool else None

    ray_s = C.connect_ray(ncores)
    try:
        rec = C.run_engine(store, rounds=a.rounds, clients_per_round=a.clients_per_round, workers=workers,
                           algo_cfg=cfg, eval_clients=a.eval_clients, seed=a.seed, after_round=after_round,
                           exclude_pids=plain_pids, model=model)
    finally:
        shutdown_s = C.disconnect_ray()
        if pool:
            pool.close()
    load1 = C.loadavg()

    rounds = sorted(rec.rounds, key=lambda r: r["round"])
    warm, timed = rounds[0], rounds[1:]
    # wall from the end of round 1 to the end of round R, without the paired plain rounds
    wall = timed[-1]["t_end"] - warm["t_end"] - sum(r["paused_s"] for r in rounds[:-1])
    samples = sum(r["samples"] for r in timed)
    # from the start of round 1 (its end less its own duration) to the end of round R
    wall_all = timed[-1]["t_end"] - (warm["t_end"] - warm["seconds"]) - sum(r["paused_s"] for r in rounds[:-1])
    samples_all = samples + warm["samples"]
    sum_round = sum(r["seconds"] for r in timed)
    cpu = C.cpu_sum([r["cpu"] for r in timed])
    cpu_total = sum(cpu.values())
    cpu_workers = sum(v for k, v in cpu.items() if k == "worker_actor")
    engine = {
        "backend": "ray", "ray_init": C.RAY_INIT["how"], "workers": workers, "cpus_per_worker": 1,
        "worker_threads": sorted({w.get("threads") for w in rec.workers}),
        "worker_niceness": rec.worker_nice,
        "ray_startup_s": round(ray_s, 3),
        "pool_startup_s": round(rec.t_start - rec.t_call, 3) if rec.t_start else None,
        "warmup_round": {"seconds": round(warm["seconds"], 3), "samples": warm["samples"],
                         "samples_per_s": round(warm["samples"] / warm["seconds"], 1),
                         "cpu_seconds_by_process": warm["cpu"]},
        "timed_rounds": len(timed), "samples": samples, "wall_s": round(wall, 3),
        "sum_round_seconds": round(sum_round, 3),
        "between_rounds_s": round(wall - sum_round, 3),
        "samples_per_s": round(samples / wall, 1),
        "all_rounds_wall_s": round(wall_all, 3), "all_rounds_samples": samples_all,
        "all_rounds_samples_per_s": round(samples_all / wall_all, 1),
        "round1_over_round2": round(warm["seconds"] / timed[0]["seconds"], 4),
        "worker_warmup_s": [w.get("warmup_s") for w in rec.workers],
        "samples_per_s_from_round_seconds": round(samples / sum_round, 1),
        # CPU seconds over the timed rounds, every process of the run (driver, Ray daemons, actors):
        # less sensitive than wall time to other load on a shared machine.
        "cpu_seconds": round(cpu_total, 3), "cpu_seconds_by_process": cpu,
        "samples_per_cpu_s": round(samples / cpu_total, 1) if cpu_total else None,
        "samples_per_worker_cpu_s": round(samples / cpu_workers, 1) if cpu_workers else None,
        "worker_cpu_share": round(cpu_workers / cpu_total, 4) if cpu_total else None,
        "rounds": [{"round": r["round"], "seconds": round(r["seconds"], 3), "samples": r["samples"],
                    "clients": r["clients"], "cpu_seconds": round(sum(r["cpu"].values()), 3)} for r in rounds],
        # per round: the workers' summed client seconds (engine metric rows); max/mean - 1 is the
        # share of the round the busiest worker made the others wait (chunks go to free workers)
        "worker_busy_s": {r: {w: round(v, 2) for w, v in sorted(ws.items())}
                          for r, ws in sorted(rec.worker_busy.items()) if r >= 2},
        "worker_busy_imbalance": round(max((max(ws.values()) / (sum(ws.values()) / len(ws)) - 1)
                                           for r, ws in rec.worker_busy.items() if r >= 2), 4)
        if rec.worker_busy else None,
        "eval_s": round(rec.t_eval - rounds[-1]["t_end"] - rounds[-1]["paused_s"], 3) if rec.t_eval else None,
        "after_eval_to_return_s": round(rec.t_return - rec.t_eval, 3) if rec.t_eval else None,
        "ray_shutdown_s": round(shutdown_s, 3),
    }
    out = {
        "benchmark": "efficiency", "cores": ncores, "loadavg_before": load0, "loadavg_after": load1,
        "store": store, "store_generated_s": round(gen_s, 1),
        "config": {"clients": a.clients, "rounds": a.rounds, "clients_per_round": a.clients_per_round,
                   "local_steps": a.local_steps, "batch_size": a.batch_size, "lr": cfg.lr,
                   "momentum": cfg.momentum, "eval_clients": a.eval_clients, "seed": a.seed, "model": model},
        "engine": engine,
    }
    if pool:
        plain = pool.summary()
        steady = pool.rounds[1:]
        plain_steady = {"samples": sum(r["samples"] for r in steady), "seconds": sum(r["seconds"] for r in steady),
                        "cpu_seconds": sum(sum(r["cpu_seconds"]) for r in steady)}
        plain_steady["samples_per_s"] = plain_steady["samples"] / plain_steady["seconds"]
        plain_steady["samples_per_cpu_s"] = plain_steady["samples"] / plain_steady["cpu_seconds"]
        plain["steady_rounds"] = {k: round(v, 3) for k, v in plain_steady.items()}
        pairs = []
        for r in rounds:
            p = r["after"]
            e_cpu = sum(r["cpu"].values())
            pairs.append({"round": r["round"], "engine_s": round(r["seconds"], 3), "plain_s": round(p["seconds"], 3),
                          "ratio": round(p["seconds"] / r["seconds"], 4),
                          "cpu_ratio": round(sum(p["cpu_seconds"]) / e_cpu, 4) if e_cpu else None})
        ratios = sorted(x["ratio"] for x in pairs)
        out["plain"] = plain
        out["pairs"] = pairs
        out["same_samples"] = plain["samples"] == samples_all and plain_steady["samples"] == samples
        # ratio: engine samples/s (wall from round-1 end to round-R end, plain rounds taken out)
        # over plain samples/s (sum of its barrier-synchronized round walls), rounds 2..R;
        # ratio_round1: the same over rounds 1..R (engine wall from the start of round 1)
        out["ratio"] = round(engine["samples_per_s"] / plain_steady["samples_per_s"], 4)
        out["ratio_round1"] = round(engine["all_rounds_samples_per_s"] / plain["samples_per_s"], 4)
        out["ratio_from_round_seconds"] = round(engine["samples_per_s_from_round_seconds"]
                                                / plain_steady["samples_per_s"], 4)
        out["round1_pair"] = pairs[0]
        pairs = pairs[1:]
        out["ratio_median_of_pairs"] = ratios[len(ratios) // 2] if len(ratios) % 2 else \
            round((ratios[len(ratios) // 2 - 1] + ratios[len(ratios) // 2]) / 2, 4)
        out["cpu_ratio"] = round(engine["samples_per_cpu_s"] / plain_steady["samples_per_cpu_s"], 4)
        out["worker_cpu_ratio"] = round(engine["samples_per_worker_cpu_s"] / plain_steady["samples_per_cpu_s"], 4)
        out["target"] = {"ratio": 0.95, "ratio_round1": 0.90}
        out["meets_target"] = out["ratio"] >= 0.95 and out["ratio_round1"] >= 0.90
    if a.json:
        print(json.dumps(out, indent=2))
    else:
        print(f"engine {engine['samples_per_s']:.0f} samples/s over {len(timed)} rounds "
              f"(ray start {ray_s:.1f}s, pool {engine['pool_startup_s']}s, round 1 {warm['seconds']:.1f}s)")
        if pool:
            print(f"plain  {plain_steady['samples_per_s']:.0f} samples/s  ratio {out['ratio']:.3f} "
                  f"(round 1 included {out['ratio_round1']:.3f}) "
                  f"(median of pairs {out['ratio_median_of_pairs']:.3f}, CPU {out['cpu_ratio']:.3f}, "
                  f"same samples: {out['same_samples']})")


if __name__ == "__main__":
    main()
