"""The typed experiment: [data], [run], [engine], [algorithm] and [model] as frozen dataclasses,
and the optional [privacy] (engine.privacy) and [system] (clients as they really are,
engine/system.py; absent: None, today's ideal clients), parsed from a TOML document (a dict) and
checked before any work.

Sections map onto the dataclasses below; [algorithm] holds `name` plus the method's own keys (its
frozen Config dataclass); [model] holds the client network's `name` plus its own keys (a
`ModelSpec`; absent = the LeNet, kit/models/catalog.py). Unknown sections or keys are errors that
list the valid ones (every dict becomes a dataclass through simfed.core.config.config_from_dict). After parsing, `check` adds what
each key means: ranges, names that must be one path component, addresses simfed can reach, and the
method's keys by naming convention (every `*lr` is a step size in [0, MAX_LR], `momentum` in
[0, 1), ...). Machine-dependent limits (workers vs CPUs and GPUs) live in engine.resources; they
need the cluster, not just the file. Relative data paths are taken from the current directory.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from simfed.core import validate as v
from simfed.core.config import config_from_dict, to_toml
from simfed.core.errors import SimfedError
from simfed.engine.privacy import PrivacyConfig, check_config as check_privacy, parse_section as parse_privacy
from simfed.engine import system
from simfed.engine.system import SystemConfig

if TYPE_CHECKING:  # algorithms.base imports torch; reading a run's config must not (`simfed compare`)
    from simfed.algorithms.base import ModelSpec


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
    track: tuple = ()  # experiment trackers: "tensorboard" (RUN_DIR/tensorboard), "mlflow"
    mlflow_uri: str = ""  # MLflow tracking URI; "" = a file store in RUN_DIR/mlruns
    # "sync": rounds of clients_per_round clients; "fedbuff": asynchronous (engine/fedbuff.py), up to
    # clients_per_round clients training at once, a server step per buffer_size finished clients
    aggregation: str = "sync"
    buffer_size: int = 10


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
    model: ModelSpec = field(default_factory=lambda: _default_model())
    privacy: PrivacyConfig | None = None  # [privacy]: absent = no differential privacy (engine.privacy)
    system: SystemConfig | None = None  # [system]; None: ideal clients (no virtual clock)


def _default_model() -> ModelSpec:
    from simfed.algorithms.base import ModelSpec

    return ModelSpec()


SECTIONS = {"data": DataConfig, "run": RunConfig, "engine": EngineConfig}
# tables whose absence means "off" (None), not "defaults"
OPTIONAL = {"privacy": PrivacyConfig, "system": SystemConfig}
TOML_ORDER = ("data", "run", "model", "algorithm", "engine", "privacy", "system")


def parse(doc: dict[str, Any], where: str = "experiment") -> Experiment:
    """The experiment of a TOML document; `where` (the file) starts messages about the document itself."""
    from simfed.algorithms import registry  # imports torch: not at import time (`simfed --help` stays light)
    from simfed.algorithms.kit import models

    unknown = sorted(set(doc) - set(SECTIONS) - set(OPTIONAL) - {"algorithm", "model"})
    if unknown:
        hint = v.did_you_mean(unknown[0], [*SECTIONS, *OPTIONAL, "algorithm", "model"]) if len(unknown) == 1 else ""
        raise SimfedError(f"{where}: unknown section(s) [{'], ['.join(unknown)}]{hint}; valid: [algorithm], [data], "
                          "[engine], [model], [privacy], [run], [system]")
    parts = {}
    for name, cls in SECTIONS.items():
        section = doc.get(name, {})
        if not isinstance(section, dict):
            raise SimfedError(f"{where}: [{name}] must be a table")
        parts[name] = config_from_dict(cls, section, f"[{name}]")
    if not isinstance(doc.get("algorithm", {}), dict):
        raise SimfedError(f"{where}: [algorithm] must be a table")
    algo_doc = dict(doc.get("algorithm", {}))
    name = algo_doc.pop("name", None)
    if not name:
        raise SimfedError(f"{where}: [algorithm] name is missing; one of: {', '.join(registry.names())}")
    if not isinstance(name, str):
        raise SimfedError(f"{where}: [algorithm] name must be a string, got {name!r}")
    algo = registry.get(v.text("[algorithm] name", name, max_len=200))
    cfg = config_from_dict(algo.Config, algo_doc, f"[algorithm] ({name})")
    model = models.parse_spec(doc["model"]) if "model" in doc else _default_model()
    privacy = parse_privacy(doc["privacy"]) if "privacy" in doc else None
    clients = system.parse(doc["system"]) if "system" in doc else None
    return check(Experiment(algorithm=name, algorithm_config=cfg, model=model, privacy=privacy, system=clients,
                            **parts))


def to_dict(exp: Experiment) -> dict[str, Any]:
    out = {"algorithm": {"name": exp.algorithm, **dataclasses.asdict(exp.algorithm_config)}}
    for name in SECTIONS:
        out[name] = dataclasses.asdict(getattr(exp, name))
    from simfed.algorithms.kit import models

    out["model"] = models.to_table(exp.model)
    for name in OPTIONAL:
        if getattr(exp, name) is not None:
            out[name] = dataclasses.asdict(getattr(exp, name))
    return out


def to_text(exp: Experiment) -> str:
    """The resolved experiment as TOML (what a run directory's config.toml holds)."""
    return to_toml(to_dict(exp), TOML_ORDER)


MAX_ROUNDS = 10_000_000
MAX_WORKERS = 100_000
MAX_RETRIES = 1_000
MAX_LR = 1e3  # a step size beyond this only ever produces inf/NaN updates (then all dropped)
GENERATORS = ("", "synthetic-femnist")
TRACKERS = ("tensorboard", "mlflow")
AGGREGATIONS = ("sync", "fedbuff")


def _check_algorithm(exp: Experiment) -> None:
    where = f"[algorithm] ({exp.algorithm})"
    for f in dataclasses.fields(exp.algorithm_config):
        value = getattr(exp.algorithm_config, f.name)
        key = f"{where} {f.name}"
        if isinstance(value, bool):
            continue
        if isinstance(value, float):
            if f.name.endswith("lr"):
                v.number(key, value, 0.0, MAX_LR)
            elif f.name.endswith("momentum"):
                v.number(key, value, 0.0, 1.0, hi_open=True)
            elif f.name.endswith(("weight_decay", "clip")) or f.name.startswith("lambda"):
                v.number(key, value, 0.0)
        elif isinstance(value, int):
            # A negative default marks a sentinel (-1 = "same as training"); otherwise counts.
            default = f.default if isinstance(f.default, int) else 0
            v.integer(key, value, min(default, 0), v.INT64_MAX)


def check(exp: Experiment) -> Experiment:
    """Raise SimfedError (one line) for any value no run can use; returns exp unchanged."""
    d, r, e = exp.data, exp.run, exp.engine
    v.text("[data] path", d.path)
    v.choice("[data] generate", d.generate, GENERATORS)
    if d.generate:
        from simfed.partitions.synthetic import check_args

        check_args(clients=d.clients, seed=d.seed, style_strength=d.style_strength,
                   unseen_fraction=d.unseen_fraction)
    v.integer("[run] rounds", r.rounds, 1, MAX_ROUNDS)
    v.integer("[run] clients_per_round", r.clients_per_round, 1)
    v.integer("[run] eval_every", r.eval_every, 0)
    v.integer("[run] checkpoint_every", r.checkpoint_every, 0)
    v.seed("[run] seed", r.seed)
    v.integer("[run] eval_clients", r.eval_clients, 0)
    if r.name:
        v.component("[run] name", r.name)
    for tracker in r.track:
        v.choice("[run] track item", tracker, TRACKERS)
    if len(set(r.track)) != len(r.track):
        raise SimfedError(f"[run] track = {list(r.track)} names a tracker twice; list each once")
    v.choice("[run] aggregation", r.aggregation, AGGREGATIONS)
    v.integer("[run] buffer_size", r.buffer_size, 1)
    if exp.system is not None:
        system.check(exp.system)
    v.choice("[engine] backend", e.backend, ("ray", "serial"))
    v.choice("[engine] vectorize", e.vectorize, ("auto", "on", "off"))
    v.integer("[engine] workers", e.workers, 0, MAX_WORKERS)
    v.number("[engine] cpus_per_worker", e.cpus_per_worker, 0.0, 1e4, lo_open=True)
    v.number("[engine] gpus_per_worker", e.gpus_per_worker, 0.0, 1e3)
    v.address("[engine] address", e.address)
    v.integer("[engine] chunk_clients", e.chunk_clients, 0)
    v.integer("[engine] max_retries", e.max_retries, 0, MAX_RETRIES)
    v.integer("[engine] inflight_per_worker", e.inflight_per_worker, 1, 1_000)
    _check_algorithm(exp)
    if exp.privacy is not None:
        check_privacy(exp.privacy)
        if exp.system is not None or r.aggregation != "sync":
            # The accountant assumes each round's cohort is a Poisson (or fixed-size) sample of all
            # seen clients; availability, dropout, deadlines and FedBuff change who contributes.
            raise SimfedError("[privacy] with [system] or [run] aggregation = \"fedbuff\" is not supported: the "
                              "privacy accounting assumes every sampled client contributes; drop one of the two")
    return exp
