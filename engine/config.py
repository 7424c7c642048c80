"""Typed experiment configuration. The CLI parses TOML into these; the engine only sees them."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class DataConfig:
    path: str = ""  # a partition store; with `generate`, where the generated store goes
    generate: str = ""  # "synthetic-femnist": build the store at `path` if it is absent
    clients: int = 200  # for `generate`
    seed: int = 0  # for `generate`
    style_strength: float = 1.0  # for `generate`
    unseen_fraction: float = 0.1  # for `generate`


@dataclass(frozen=True)
class RunConfig:
    rounds: int = 10
    clients_per_round: int = 10
    eval_every: int = 5  # 0: evaluate only after the last round
    checkpoint_every: int = 5  # 0: checkpoint only after the last round
    seed: int = 0
    eval_clients: int = 0  # per cohort; 0 evaluates every client of the cohort
    name: str = ""  # run directory name; default: <algorithm>-<timestamp>


@dataclass(frozen=True)
class EngineConfig:
    backend: str = "ray"  # "ray" or "serial" (in-process, same code)
    workers: int = 0  # 0: as many as the cluster's resources allow
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 0.0  # fractional: 0.25 packs four workers on one GPU
    address: str = ""  # "" starts Ray on this machine; "auto" or "host:port" (the head's GCS) joins a cluster
    chunk_clients: int = 0  # clients per worker task; 0 picks from cohort and pool size
    max_retries: int = 3  # per chunk, when a worker dies
    inflight_per_worker: int = 2  # chunks queued per worker (bounds per-client payload memory)
    storage: str = ""  # client state: a pyarrow.fs URI or shared path (multi-node); "" = the run directory
    # "auto": train a chunk of clients at once (torch.func.vmap) on CUDA workers when the method
    # supports it; "on": also on CPU; "off": always the per-client loop.
    vectorize: str = "auto"


@dataclass(frozen=True)
class Experiment:
    algorithm: str
    algorithm_config: Any
    data: DataConfig = field(default_factory=DataConfig)
    run: RunConfig = field(default_factory=RunConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
