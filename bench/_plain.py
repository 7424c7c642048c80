"""The plain-PyTorch baseline of bench/efficiency.py and bench/femnist_scale.py (not part of the package).

The same clients, the same network ([model] table in cfg["model"], default LeNet), the same local
steps, batch size and even the same batch indices as the engine (its per-client generator seed is
reproduced), trained by a hand-written PyTorch loop in one
1-thread process per core (multiprocessing, spawn), clients split across the processes
largest-first (LPT), with a barrier at each round (FedAvg rounds are synchronous).
"""

from __future__ import annotations

import heapq
import multiprocessing as mp
import os
import time


def lpt_split(jobs: list[tuple[int, int]], sizes: dict[int, int], parts: int) -> list[list[tuple[int, int]]]:
    """Largest job first to the least-loaded part. jobs: (round, client_id); weight = steps of the client."""
    order = sorted(jobs, key=lambda j: (-sizes[j[1]], j))
    heap = [(0, p) for p in range(parts)]
    out: list[list[tuple[int, int]]] = [[] for _ in range(parts)]
    for j in order:
        load, p = heapq.heappop(heap)
        out[p].append(j)
        heapq.heappush(heap, (load + max(sizes[j[1]], 1), p))
    return out


def ray_worker_niceness() -> int:
    """The niceness Ray gives worker processes (actors included): RAY_worker_niceness, default 15."""
    return int(os.environ.get("RAY_worker_niceness", "15"))


def as_input(x, kind: str):
    """The store's samples as the model takes them (ClientData's rule): "unit" images / 255,
    "raw" float32 values, "tokens" int64 ids."""
    import torch

    if kind == "unit":
        return torch.from_numpy(x).float().div_(255.0)
    if kind == "raw":
        return torch.from_numpy(x).float()
    return torch.from_numpy(x).long()


def _plain_worker(rank: int, store_path: str, jobs_by_round: list[list[tuple[int, int]]], cfg: dict, seed: int,
                  commands, results, nice: int = 0) -> None:
    """One plain-PyTorch process: loads its clients, warms up, then trains round i on command i."""
    os.environ["OMP_NUM_THREADS"] = "1"
    if nice:
        os.setpriority(os.PRIO_PROCESS, 0, nice)
    import numpy as np
    import torch
    from torch.nn import functional as F

    from simfed.algorithms.base import Task
    from simfed.algorithms.kit import models
    from simfed.algorithms.kit.models import flat_params
    from simfed.algorithms.kit.training import batches
    from simfed.core.seeds import derive_seed
    from simfed.partitions.store import PartitionStore

    torch.set_num_threads(1)
    store = PartitionStore.open(store_path)
    # The engine's task for this store and [model] table (plan.py), so both sides train one network.
    task = Task(**store.task_fields(), model=models.parse_spec(cfg.get("model") or {"name": "lenet"}))
    # The data, copied out of the memory map before timing (a plain script holds its data in memory).
    data = {}
    for jobs in jobs_by_round:
        for _, cid in jobs:
            if cid not in data:
                x, y = store.read(cid, "train")
                data[cid] = (np.array(x), np.array(y, dtype=np.int64))
    model = models.build(task)
    theta = flat_params(models.initial(task, seed)).clone()
    params = list(model.parameters())
    numels = [p.numel() for p in params]
    bs_cfg, lr, momentum, wd = cfg["batch_size"], cfg["lr"], cfg["momentum"], cfg["weight_decay"]

    def load_theta() -> None:
        with torch.no_grad():
            for p, chunk in zip(params, torch.split(theta, numels)):
                p.copy_(chunk.view_as(p))

    def train_client(rnd: int, cid: int, steps_override: int = 0) -> int:
        xu, yu = data[cid]
        x = as_input(xu, task.input)
        y = torch.from_numpy(yu)
        n = int(y.shape[0])
        epochs = 0.0 if steps_override else cfg["local_epochs"]
        # The engine's per-client generator (ClientContext.generator("sgd") in FedAvg.client) and its
        # batch rule, so both sides train the very same samples (one epoch: each sample once).
        gen = torch.Generator().manual_seed(derive_seed(seed, rnd, "train", cid, "update", "sgd"))
        load_theta()
        opt = torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=wd)
        model.train()
        seen = 0
        for idx in batches(n, bs_cfg, steps_override or cfg["local_steps"], gen, epochs):
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
            seen += int(idx.numel())
        with torch.no_grad():
            acc.add_((theta - torch.cat([p.reshape(-1) for p in params])) * float(n))
        return seen

    acc = torch.zeros_like(theta)
    # Warm-up outside timing: torch's lazy kernels/allocator, a few steps on one client.
    first = next((j for jobs in jobs_by_round for j in jobs), None)
    if first is not None:
        train_client(*first, steps_override=2)
        acc.zero_()
    results.put(("ready", rank, None))
    while True:
        i = commands.get()
        if i is None:
            break
        t0, c0 = time.perf_counter(), time.process_time()
        samples = sum(train_client(r, c) for r, c in jobs_by_round[i])
        t1, c1 = time.perf_counter(), time.process_time()
        results.put(("done", rank, {"t0": t0, "t1": t1, "cpu": c1 - c0, "samples": samples,
                                    "clients": len(jobs_by_round[i])}))


class PlainPool:
    """`procs` persistent 1-thread plain-PyTorch processes (spawned, data preloaded, warmed up).

    `run_round(i)` trains round i's clients (split LPT across the processes) and returns its wall
    time (first start to last finish), samples and per-process CPU seconds. Persistent so that the
    plain rounds can be interleaved with the engine's rounds (paired under the same background
    load) at no per-round process start cost.
    """

    def __init__(self, store: str, round_cohorts: list[list[int]], *, procs: int, cfg: dict, seed: int = 0,
                 nice: int = 0):
        from simfed.partitions.store import PartitionStore

        tab = PartitionStore.open(store).clients
        sizes = dict(zip(tab.column("client_id").to_pylist(), tab.column("n_train").to_pylist()))
        split = [lpt_split([(r, c) for c in cohort], sizes, procs) for r, cohort in enumerate(round_cohorts)]
        per_proc = [[split[i][p] for i in range(len(split))] for p in range(procs)]
        ctx = mp.get_context("spawn")
        self.commands = [ctx.Queue() for _ in range(procs)]
        self.results = ctx.Queue()
        env_before = os.environ.get("OMP_NUM_THREADS")
        os.environ["OMP_NUM_THREADS"] = "1"  # inherited by the spawned children before torch loads
        t0 = time.perf_counter()
        self.procs = [ctx.Process(target=_plain_worker, daemon=True,
                                  args=(p, store, per_proc[p], dict(cfg), seed, self.commands[p], self.results, nice))
                      for p in range(procs)]
        for p in self.procs:
            p.start()
        if env_before is None:
            os.environ.pop("OMP_NUM_THREADS", None)
        else:
            os.environ["OMP_NUM_THREADS"] = env_before
        for _ in self.procs:
            self._get("ready")
        self.start_s = time.perf_counter() - t0
        self.nice = nice
        self.rounds: list[dict] = []

    def _get(self, kind: str):
        while True:
            try:
                k, rank, payload = self.results.get(timeout=5)
            except Exception:
                if any(p.exitcode not in (None, 0) for p in self.procs):
                    raise RuntimeError("a plain-baseline process failed") from None
                continue
            if k == kind:
                return rank, payload

    def run_round(self, i: int) -> dict:
        for q in self.commands:
            q.put(i)
        rs = [self._get("done")[1] for _ in self.procs]
        out = {"index": i, "seconds": max(r["t1"] for r in rs) - min(r["t0"] for r in rs),
               "samples": sum(r["samples"] for r in rs),
               "busy_seconds": [round(r["t1"] - r["t0"], 3) for r in rs],
               "cpu_seconds": [round(r["cpu"], 3) for r in rs]}
        self.rounds.append(out)
        return out

    def close(self) -> None:
        for q in self.commands:
            q.put(None)
        for p in self.procs:
            p.join(timeout=30)

    def summary(self) -> dict:
        samples = sum(r["samples"] for r in self.rounds)
        seconds = sum(r["seconds"] for r in self.rounds)
        cpu = sum(sum(r["cpu_seconds"]) for r in self.rounds)
        return {"processes": len(self.procs), "threads_per_process": 1, "nice": self.nice, "samples": samples,
                "seconds": round(seconds, 3), "samples_per_s": round(samples / seconds, 1) if seconds else None,
                "cpu_seconds": round(cpu, 3), "samples_per_cpu_s": round(samples / cpu, 1) if cpu else None,
                "process_start_load_warmup_s": round(self.start_s, 3),
                "rounds": [{**r, "seconds": round(r["seconds"], 3)} for r in self.rounds]}


def plain_baseline(store: str, round_cohorts: list[list[int]], *, procs: int, cfg: dict, seed: int = 0,
                   nice: int = 0) -> dict:
    """Train the given cohorts (one list of client ids per round) with `procs` 1-thread processes."""
    pool = PlainPool(store, round_cohorts, procs=procs, cfg=cfg, seed=seed, nice=nice)
    try:
        for i in range(len(round_cohorts)):
            pool.run_round(i)
    finally:
        pool.close()
    return pool.summary()
