"""PeFLL at FEMNIST scale: 3,597 synthetic writers (3,237 seen / 360 unseen) through the Ray backend.

Engine: embedded local Ray (`simfed.engine.cluster.connect("")`), `--workers` workers with 1 CPU
each, `--rounds` PeFLL rounds of `--clients-per-round` seen clients (three exchanges each:
describe, model, embed), then one evaluation after the last round. `run.eval_clients` caps every
cohort at the same number of clients; with the default 360 that is every unseen client (360) and
a seeded sample of 360 of the 3,237 seen ones, all zero-shot (theta = h(v(S_train))).

Recorded per round: the engine's round wall time and the server actor's RSS (psutil on the
actor's pid, read in the "round" event, i.e. after the round's Adam step, while the server is
idle); also the server RSS right after the actors start and after the evaluation. The RSS is
split into the pages of Ray's shared-memory object store mapped into the actor (the per-client
payloads theta_i = h(v_i) it returns are written there; those pages stay mapped and are reused
after the objects are freed, so they are bounded by the object store's size, not the number of
clients) and the rest. "Bounded" means the rest after the last round is within `--rss-slack-mb`
of the value after the first round (the first round allocates Adam's moments and autograd
buffers; later rounds must reuse them).

Usage: python bench/pefll_scale.py [--store data/synthetic-femnist-3597 (generated if absent)] [--rounds 4] [--clients-per-round 64]
       [--local-steps 10] [--embed-dim 64] [--eval-clients 360] [--workers 2]
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import psutil


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--store", default="data/synthetic-femnist-3597")
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--clients-per-round", type=int, default=64)
    ap.add_argument("--local-steps", type=int, default=10)
    ap.add_argument("--embed-dim", type=int, default=64)
    ap.add_argument("--eval-clients", type=int, default=360, help="per cohort; 0 = every client")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--rss-slack-mb", type=float, default=64.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--keep", action="store_true", help="keep the run directory")
    args = ap.parse_args(argv)

    from simfed.engine.config import parse
    from simfed.engine import cluster
    from simfed.engine.loop import run_experiment
    from simfed.partitions.store import PartitionStore

    if not (Path(args.store) / "manifest.json").exists():
        from simfed.partitions.synthetic import make_synthetic_femnist

        print(f"generating synthetic FEMNIST (3,597 writers) at {args.store}", file=sys.stderr)
        Path(args.store).parent.mkdir(parents=True, exist_ok=True)
        make_synthetic_femnist(args.store, clients=3597, seed=0)
    store = PartitionStore.open(args.store)
    n_seen, n_unseen = len(store.client_ids("seen")), len(store.client_ids("unseen"))

    exp = parse({"data": {"path": args.store},
                 "run": {"rounds": args.rounds, "clients_per_round": args.clients_per_round, "eval_every": 0,
                         "checkpoint_every": 0, "seed": args.seed, "eval_clients": args.eval_clients},
                 "algorithm": {"name": "pefll", "embed_dim": args.embed_dim, "local_steps": args.local_steps},
                 "engine": {"backend": "ray", "workers": args.workers, "cpus_per_worker": 1}})
    t0 = time.perf_counter()
    cluster.connect("", num_cpus=args.workers)
    t_ray = time.perf_counter() - t0

    rec: dict = {"rounds": [], "rss_start": None, "t_eval0": None}
    proc: dict = {}

    def server_rss() -> int:
        return proc["p"].memory_info().rss

    def server_mem() -> dict:
        """RSS split into Ray's shared-memory object store mapping (plasma: per-client payloads the
        actor returns are written there; the pages stay mapped after the objects are freed and are
        reused) and the rest (the actor's own heap: h, phi, Adam, autograd buffers)."""
        shm = 0
        for m in proc["p"].memory_maps(grouped=True):
            if "plasma" in m.path or m.path.startswith("/dev/shm") or "memfd" in m.path:
                shm += m.rss
        rss = server_rss()
        return {"rss_mb": round(rss / 2**20, 1), "object_store_mapped_mb": round(shm / 2**20, 1),
                "rss_minus_object_store_mb": round((rss - shm) / 2**20, 1)}

    def on_event(e: dict) -> None:
        now = time.perf_counter()
        if e["type"] == "start":
            pid = e["server_pid"]
            proc["p"] = psutil.Process(pid)
            rec["rss_start"] = server_rss()
            rec["mem_start"] = server_mem()
            rec["t_start"] = now
        elif e["type"] == "round":
            mem = server_mem()
            rec["rounds"].append({"round": e["round"], "seconds": round(e["seconds"], 2),
                                  "server_rss_mb": mem["rss_mb"], "server_mem": mem})
            rec["t_eval0"] = now
        elif e["type"] == "eval":
            rec["eval_s"] = round(now - rec["t_eval0"], 1)
            rec["mem_eval"] = server_mem()

    run_dir = Path(tempfile.mkdtemp(prefix="simfed-pefll-scale-")) / "run"
    try:
        res = run_experiment(exp, run_dir, on_event=on_event, backend="ray")
        rss_end = server_rss()
        status = json.loads((run_dir / "status.json").read_text())
    finally:
        if not args.keep:
            shutil.rmtree(run_dir.parent, ignore_errors=True)
    summ = {row["cohort"]: row for row in res["summary"]}
    rss = [r["server_rss_mb"] for r in rec["rounds"]]
    heap = [r["server_mem"]["rss_minus_object_store_mb"] for r in rec["rounds"]]
    growth = heap[-1] - heap[0] if heap else 0.0
    out = {
        "bench": "pefll_scale", "store": args.store, "seen_clients": n_seen, "unseen_clients": n_unseen,
        "workers": res["workers"], "rounds": args.rounds, "clients_per_round": args.clients_per_round,
        "local_steps": args.local_steps, "embed_dim": args.embed_dim, "eval_clients_cap": args.eval_clients,
        "rounds_completed": status["completed_rounds"], "state": status["state"],
        "ray_startup_s": round(t_ray, 1), "per_round": rec["rounds"],
        "round_s_mean_after_first": (round(sum(r["seconds"] for r in rec["rounds"][1:]) / (len(rec["rounds"]) - 1), 2)
                                     if len(rec["rounds"]) > 1 else None),
        "eval_s": rec.get("eval_s"),
        "server_rss_mb": {"after_start": round(rec["rss_start"] / 2**20, 1), "per_round": rss,
                          "after_eval": round(rss_end / 2**20, 1),
                          "status_json_last": round(status.get("server_rss_bytes", 0) / 2**20, 1),
                          "rss_minus_object_store_per_round": heap,
                          "after_start_detail": rec["mem_start"], "after_eval_detail": rec.get("mem_eval"),
                          "heap_growth_first_to_last_round": round(growth, 1)},
        "dropped": res["dropped"], "retries": res["retries"],
        "eval": {c: {k: (round(v, 4) if isinstance(v, float) else v) for k, v in s.items()
                     if k in ("clients", "samples", "acc_mean", "acc_weighted", "acc_p10", "acc_worst10", "acc_best")}
                 for c, s in summ.items()},
        "checks": {
            "all_rounds_completed": status["completed_rounds"] == args.rounds,
            "server_rss_bounded": abs(growth) <= args.rss_slack_mb,
            "all_unseen_evaluated": summ.get("unseen", {}).get("clients") == n_unseen,
        },
    }
    print(json.dumps(out))
    cluster.disconnect()
    return out


if __name__ == "__main__":
    main()
