"""Everything checked before a run does any work, once: the store, the method against it, the
cohort, and for a resumed run its directory. The result, a `Plan`, is what the run then uses.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from simfed.algorithms import registry
from simfed.algorithms.base import Task
from simfed.core.errors import SimfedError
from simfed.engine import checkpoint
from simfed.engine.clientstate import ClientStateStore
from simfed.engine.config import DataConfig, Experiment

Event = Callable[[dict], None]


@dataclass(frozen=True)
class Plan:
    """An experiment checked against its data: what a run needs from the store."""

    store: Any  # the PartitionStore, opened and its contents checked
    task: Task
    seen: list[int]  # client ids of the seen (training) cohort
    unseen: list[int]
    sizes: dict[int, float]  # each client's relative work (Algorithm.cost): how chunks are cut and ordered
    checkpoint: dict | None = None  # a resumed run's checkpoint, checked against the experiment
    privacy: Any = None  # [privacy] resolved against the method and the store (engine.privacy.PrivacyPlan)


def open_store(data: DataConfig, on_event: Event | None = None, progress: bool = False):
    """Open the experiment's partition store, generating synthetic FEMNIST first if asked and absent
    (`progress`: with a progress bar on stderr)."""
    from simfed.partitions.store import PartitionStore

    if not data.path:
        raise SimfedError("[data] path is not set; give the partition store directory (or generate = "
                          "\"synthetic-femnist\" with a path to generate it at)")
    if data.generate and not Path(data.path, "manifest.json").exists():
        if data.generate != "synthetic-femnist":
            raise SimfedError(f"[data] generate = {data.generate!r} is not supported; use \"synthetic-femnist\"")
        from simfed.partitions.synthetic import make_synthetic_femnist

        if "://" not in data.path:
            Path(data.path).absolute().parent.mkdir(parents=True, exist_ok=True)
        if on_event:
            on_event({"type": "generate", "path": data.path, "clients": data.clients})
        make_synthetic_femnist(data.path, clients=data.clients, seed=data.seed, unseen_fraction=data.unseen_fraction,
                               style_strength=data.style_strength, progress=progress)
    if not Path(data.path).exists() and "://" not in data.path:
        raise SimfedError(f"[data] path {data.path} does not exist; create it with `simfed partition ...` "
                          "or set generate = \"synthetic-femnist\"")
    store = PartitionStore.open(data.path)  # metadata, and every file's presence and size
    store.check_contents()  # shapes, row counts and label ranges: never first met in a worker
    return store


def check_resume(exp: Experiment, task: Task, run_dir: Path, privacy: Any = None) -> dict:
    """A run directory to resume: its checkpoint matches this experiment's method and task, and
    every file the resumed run will read (client state, earlier metrics) opens. Returns the checkpoint."""
    from simfed.engine.server import Server

    ckpt = checkpoint.load(run_dir)
    if ckpt is None:
        raise SimfedError(f"{run_dir}: no checkpoint to resume from (it is written every run.checkpoint_every rounds)")
    path = run_dir / checkpoint.NAME
    if ckpt["round"] > exp.run.rounds:
        raise SimfedError(f"{path}: round {ckpt['round']} is beyond run.rounds = {exp.run.rounds}; the "
                          "checkpoint does not belong to this config")
    fresh = Server(exp.algorithm, exp.algorithm_config, task, exp.run.seed, privacy=privacy)
    checkpoint.check_matches(ckpt["server"], fresh.state_dict(), str(path))
    try:
        fresh.load_state_dict(ckpt["server"])
    except Exception as exc:  # the method's own loader disagrees: same verdict, one line
        raise SimfedError(f"{path}: the server state does not load ({type(exc).__name__}); the checkpoint "
                          "does not belong to this experiment or is damaged") from None
    ClientStateStore(run_dir / "client_state").check(ckpt["round"])
    from simfed.engine import metrics  # polars: a resume needs it, a worker or server process does not

    for f in metrics.files(run_dir, upto=ckpt["round"]):  # later ones are rewritten by the resumed run
        metrics.check_file(f)
    return ckpt


def _check_method(exp: Experiment, table, task: Task, seen: list[int], store_path: str) -> None:
    """The method's config against the data, and the cohort size against the seen clients."""
    run = exp.run
    algo = registry.get(exp.algorithm)
    algo.validate(exp.algorithm_config, task)
    algo.check_clients(exp.algorithm_config, n_train(table))
    if exp.engine.vectorize == "on" and not algo.capabilities.chunk_replies:
        with_support = [n for n in registry.names() if registry.get(n).capabilities.chunk_replies]
        raise SimfedError(f"[engine] vectorize = \"on\" but {exp.algorithm} has no vectorized client step; "
                          f"use \"auto\" or \"off\" (methods with one: {', '.join(with_support)})")
    if run.clients_per_round < 1 or run.clients_per_round > len(seen):
        raise SimfedError(f"[run] clients_per_round = {run.clients_per_round} but the store {store_path} has "
                          f"{len(seen)} seen clients; use a value between 1 and {len(seen)}")
    if run.rounds < 1:
        raise SimfedError(f"[run] rounds = {run.rounds}; it must be at least 1")


def n_train(table) -> dict[int, int]:
    """{client id: train samples} of every client of a store's clients table."""
    return dict(zip((int(c) for c in table.column("client_id").to_pylist()),
                    (int(n) for n in table.column("n_train").to_pylist())))


def check_experiment(exp: Experiment, on_event: Event | None = None,
                     resume_dir: str | os.PathLike | None = None, *, progress: bool | None = None) -> Plan:
    """Everything that can be checked before any work: the store, the method against it, the cohort size,
    and with `resume_dir` the run directory to continue (the plan then holds its checkpoint).
    `progress`: draw a bar while the store is generated (default: when there is an `on_event`)."""
    store = open_store(exp.data, on_event, on_event is not None if progress is None else progress)
    seen, unseen = [int(c) for c in store.client_ids("seen")], [int(c) for c in store.client_ids("unseen")]
    task = Task(**store.task_fields(), num_clients=len(seen), total_clients=len(seen) + len(unseen))
    table = store.clients
    _check_method(exp, table, task, seen, store.path)
    if exp.system is not None or exp.run.aggregation != "sync":
        from simfed.engine import clock  # the [system] clock: traces, what the method can do, the deadline

        clock.check_experiment(exp, task, seen, n_train(table))
    algo = registry.get(exp.algorithm)
    privacy = None
    if exp.privacy is not None:
        from simfed.engine.privacy import resolve

        privacy = resolve(exp, len(seen))
    ckpt = check_resume(exp, task, Path(resume_dir), privacy) if resume_dir is not None else None
    sizes = {cid: algo.cost(exp.algorithm_config, n)
             for cid, n in zip(table.column("client_id").to_pylist(), table.column("n_train").to_pylist())}
    return Plan(store=store, task=task, seen=seen, unseen=unseen, sizes=sizes, checkpoint=ckpt, privacy=privacy)
