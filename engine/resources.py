"""Does the worker pool fit the machine or cluster? Checked before Ray starts when we start it,
and right after connecting when we join one, so a request that can never be placed fails in
seconds instead of after Ray's placement timeout (it used to take 300 s for workers = 1000).
"""

from __future__ import annotations

import math
import os

from simfed.engine.config import EngineConfig
from simfed.core.errors import SimfedError


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
    need_cpu, need_gpu = n * engine.cpus_per_worker, n * engine.gpus_per_worker
    if need_cpu > cpus + 1e-9 or need_gpu > gpus + 1e-9:
        fit = pool_size(EngineConfig(cpus_per_worker=engine.cpus_per_worker,
                                     gpus_per_worker=engine.gpus_per_worker), totals)
        raise SimfedError(f"[engine] workers = {n} need {need_cpu:g} CPUs and {need_gpu:g} GPUs but {where} "
                          f"has {cpus:g} CPUs and {gpus:g} GPUs; use at most {fit} workers (or 0 for "
                          "as many as fit)")
    return n
