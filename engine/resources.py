"""Does the worker pool fit the machine or cluster? Checked before Ray starts when we start it,
and right after connecting when we join one, so a request that can never be placed fails in
seconds instead of after Ray's placement timeout (it used to take 300 s for workers = 1000).

A pool is also bounded by what its processes cost: every worker is a Python process with torch
(~0.3 GB resident, a CUDA context on a GPU), so fractional resources cannot multiply it without
limit (cpus_per_worker = 0.001 asked for 2000 workers on 2 CPUs; Ray started 41 processes and
6 GiB within a minute). At most MAX_PER_CPU workers per CPU and MAX_PER_GPU per GPU.
"""

from __future__ import annotations

import math
import os

from simfed.engine.config import EngineConfig
from simfed.core.errors import SimfedError

MAX_PER_CPU = 4  # workers beyond this per core only take turns, each with its own ~0.3 GB
MAX_PER_GPU = 16  # one CUDA context each (0.3-0.5 GB of the GPU's memory)


def local_resources() -> dict[str, float]:
    """What an embedded Ray started on this machine will offer (CPU count, visible GPUs)."""
    gpus = 0
    try:
        import torch

        gpus = torch.cuda.device_count()
    except Exception:  # no usable CUDA runtime: no GPUs for Ray either
        gpus = 0
    return {"CPU": float(os.cpu_count() or 1), "GPU": float(gpus)}


def pool_size(engine: EngineConfig, totals: dict[str, float]) -> int:
    """Workers that fit: engine.workers when set, else as many as the resources allow."""
    if engine.workers:
        return engine.workers
    n = math.floor(totals.get("CPU", 0) / engine.cpus_per_worker + 1e-9)
    if engine.gpus_per_worker > 0:
        n = min(n, math.floor(totals.get("GPU", 0) / engine.gpus_per_worker + 1e-9))
    return int(n)


def check(engine: EngineConfig, totals: dict[str, float], where: str) -> int:
    """Raise SimfedError unless the pool fits `totals`; returns the number of workers."""
    cpus, gpus = totals.get("CPU", 0.0), totals.get("GPU", 0.0)
    if engine.gpus_per_worker > 0 and gpus <= 0:
        raise SimfedError(f"[engine] gpus_per_worker = {engine.gpus_per_worker} but {where} has no GPU; "
                          "set engine.gpus_per_worker = 0 or join a cluster with GPUs (--address)")
    n = pool_size(engine, totals)
    if n < 1:
        raise SimfedError(f"{where} has no room for one worker with {engine.cpus_per_worker} CPUs and "
                          f"{engine.gpus_per_worker} GPUs ({cpus:g} CPUs, {gpus:g} GPUs in all); lower "
                          "engine.cpus_per_worker/gpus_per_worker")
    _bounded(engine, n, cpus, gpus, where)
    need_cpu, need_gpu = n * engine.cpus_per_worker, n * engine.gpus_per_worker
    if need_cpu > cpus + 1e-9 or need_gpu > gpus + 1e-9:
        fit = pool_size(EngineConfig(cpus_per_worker=engine.cpus_per_worker,
                                     gpus_per_worker=engine.gpus_per_worker), totals)
        raise SimfedError(f"[engine] workers = {n} need {need_cpu:g} CPUs and {need_gpu:g} GPUs but {where} "
                          f"has {cpus:g} CPUs and {gpus:g} GPUs; use at most {fit} workers (or 0 for "
                          "as many as fit)")
    return n


def _bounded(engine: EngineConfig, n: int, cpus: float, gpus: float, where: str) -> None:
    """Raise SimfedError when `n` workers exceed MAX_PER_CPU per CPU or MAX_PER_GPU per GPU."""
    cap_cpu = max(1, math.floor(MAX_PER_CPU * cpus))
    cap_gpu = max(1, math.floor(MAX_PER_GPU * gpus)) if engine.gpus_per_worker > 0 else n
    if n <= min(cap_cpu, cap_gpu):
        return
    what = (f"workers = {engine.workers}" if engine.workers else
            f"cpus_per_worker = {engine.cpus_per_worker:g}" + (f" and gpus_per_worker = {engine.gpus_per_worker:g}"
                                                               if engine.gpus_per_worker > 0 else ""))
    if n > cap_cpu:
        limit, fix = cap_cpu, f"cpus_per_worker to at least {1 / MAX_PER_CPU:g}"
        per = f"{MAX_PER_CPU} per CPU ({cap_cpu} for its {cpus:g} CPUs)"
    else:
        limit, fix = cap_gpu, f"gpus_per_worker to at least {1 / MAX_PER_GPU:g}"
        per = f"{MAX_PER_GPU} per GPU ({cap_gpu} for its {gpus:g} GPUs)"
    fix = f"set engine.workers to at most {limit}" if engine.workers else \
        f"raise {fix}, or set engine.workers to at most {limit}"
    raise SimfedError(f"[engine] {what} makes a pool of {n} workers on {where}; each worker is a process (~0.3 GB "
                      f"with torch), so a pool holds at most {per}: {fix}")
