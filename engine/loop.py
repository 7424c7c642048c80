"""The round loop: sample a cohort, run each phase of the method on a backend, evaluate, checkpoint.

UI-free: progress goes to an `on_event(dict)` callback (the CLI draws a progress bar from it).
"""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path
from typing import Any, Callable

from simfed.algorithms import registry
from simfed.algorithms.base import RoundInfo, Task
from simfed.engine import checkpoint, metrics, rundir
from simfed.engine.backends import make_backend
from simfed.engine.clientstate import ClientStateStore
from simfed.engine.config import DataConfig, Experiment
from simfed.engine.errors import SimfedError
from simfed.engine.sampling import sample_cohort, sample_eval
from simfed.engine.worker import WorkerSpec

Event = Callable[[dict], None]


def open_store(data: DataConfig, on_event: Event | None = None):
    """Open the experiment's partition store, generating synthetic FEMNIST first if asked and absent."""
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
                               style_strength=data.style_strength, progress=on_event is not None)
    if not Path(data.path).exists() and "://" not in data.path:
        raise SimfedError(f"[data] path {data.path} does not exist; create it with `simfed partition ...` "
                          "or set generate = \"synthetic-femnist\"")
    return PartitionStore.open(data.path)


def check_experiment(exp: Experiment, on_event: Event | None = None):
    """Everything that can be checked before any work: the store, the method against it, the cohort size.
    Returns (store, task, seen ids, unseen ids)."""
    run = exp.run
    store = open_store(exp.data, on_event)
    seen, unseen = [int(c) for c in store.client_ids("seen")], [int(c) for c in store.client_ids("unseen")]
    task = Task(tuple(int(v) for v in store.sample_shape), int(store.num_classes), num_clients=len(seen))
    algo = registry.get(exp.algorithm)
    algo.validate(exp.algorithm_config, task)
    if exp.engine.vectorize == "on" and not algo.vectorized_phases:
        with_support = [n for n in registry.names() if registry.get(n).vectorized_phases]
        raise SimfedError(f"[engine] vectorize = \"on\" but {exp.algorithm} has no vectorized client step; "
                          f"use \"auto\" or \"off\" (methods with one: {', '.join(with_support)})")
    if run.clients_per_round < 1 or run.clients_per_round > len(seen):
        raise SimfedError(f"[run] clients_per_round = {run.clients_per_round} but the store {store.path} has "
                          f"{len(seen)} seen clients; use a value between 1 and {len(seen)}")
    if run.rounds < 1:
        raise SimfedError(f"[run] rounds = {run.rounds}; it must be at least 1")
    return store, task, seen, unseen


def run_experiment(exp: Experiment, run_dir: str | os.PathLike, *, resume: bool = False,
                   on_event: Event | None = None, backend: str | None = None) -> dict[str, Any]:
    """Run (or resume) `exp` in `run_dir`, which this call owns meanwhile (engine.rundir)."""
    with rundir.hold(run_dir):
        return _run(exp, Path(run_dir), resume, on_event, backend)


def _run(exp: Experiment, run_dir: Path, resume: bool, on_event: Event | None, backend: str | None) -> dict:
    emit = on_event or (lambda e: None)
    run, eng = exp.run, exp.engine
    store, task, seen, unseen = check_experiment(exp, on_event)
    table = store.clients
    # Work per client, for the size-aware assignment to workers (the method knows what it costs).
    algo = registry.get(exp.algorithm)
    sizes = {cid: algo.cost(exp.algorithm_config, n)
             for cid, n in zip(table.column("client_id").to_pylist(), table.column("n_train").to_pylist())}

    ckpt = checkpoint.load(run_dir) if resume else None
    if resume and ckpt is None:
        raise SimfedError(f"{run_dir}: no checkpoint to resume from (it is written every run.checkpoint_every rounds)")
    if not resume and (run_dir / checkpoint.NAME).exists():
        raise SimfedError(f"{run_dir} already holds a run; resume it with --resume {run_dir} or pick another --out")
    start = int(ckpt["round"]) if ckpt else 0
    counters = dict(ckpt["counters"]) if ckpt else {"retries": 0, "dropped": 0}
    writer = metrics.MetricsWriter(run_dir, run_dir.name)
    states = ClientStateStore(run_dir / "client_state")
    writer.truncate_after(start)
    states.truncate_after(start)

    spec = WorkerSpec(store_path=store.path, algorithm=exp.algorithm, cfg=exp.algorithm_config, task=task,
                      seed=run.seed, state_dir=str(run_dir / "client_state"),
                      threads=max(1, int(eng.cpus_per_worker)), use_gpu=eng.gpus_per_worker > 0,
                      vectorize=eng.vectorize)
    # The server computes with as many threads as a worker on both backends: a reduction split
    # over a different thread count can round differently.
    server_args = dict(algorithm=exp.algorithm, cfg=exp.algorithm_config, task=task, seed=run.seed,
                       state_dict=ckpt["server"] if ckpt else None, threads=spec.threads)
    be = make_backend(backend or eng.backend, spec, server_args, eng)
    status = {"state": "running", "completed_rounds": start, "checkpoint_round": start, "rounds": run.rounds,
              "workers": be.n_workers, "backend": be.name, "pid": os.getpid(), "host": socket.gethostname()}
    emit({"type": "start", "start_round": start, "rounds": run.rounds, "workers": be.workers_info(),
          "clients_per_round": run.clients_per_round, "seen": len(seen), "unseen": len(unseen)})
    last_ckpt, summary = start, []
    try:
        for r in range(start, run.rounds):
            t0 = time.perf_counter()
            cohort = sample_cohort(run.seed, r, seen, run.clients_per_round)
            rows: list[dict] = []
            round_stats: dict[str, float] = {}

            def on_chunk(meta: dict, phase_rows: list = rows) -> None:
                phase_rows.extend(meta["rows"])
                counters["dropped"] += meta["dropped"]
                emit({"type": "chunk", "round": r + 1, "clients": meta["n_clients"], "samples": meta["n_train"]})

            for pi, phase in enumerate(be.call("phases", "train", r)):
                info = RoundInfo(round=r, seed=run.seed, mode="train", cohort="seen", phase_index=pi,
                                 client_ids=tuple(cohort))
                stats = be.run_phase(phase, info, cohort, sizes, on_chunk, last_ckpt)
                round_stats.update({f"{phase}.{k}": v for k, v in stats.items()})
            writer.write(rows, r + 1, "train")
            emit({"type": "round", "round": r + 1, "seconds": time.perf_counter() - t0, "stats": round_stats})
            done = r + 1
            if (run.eval_every > 0 and done % run.eval_every == 0) or done == run.rounds:
                summary = _evaluate(be, writer, run, r, seen, unseen, sizes, last_ckpt, emit)
            counters["retries"] = counters.get("retries", 0) + be.retries
            be.retries = 0
            status.update(completed_rounds=done, server_rss_bytes=be.call("memory_bytes"),
                          server_private_bytes=be.call("private_memory_bytes"),
                          retries=counters["retries"], dropped=counters["dropped"])
            if (run.checkpoint_every > 0 and done % run.checkpoint_every == 0) or done == run.rounds:
                checkpoint.save(run_dir, done, be.call("state_dict"), counters)
                last_ckpt = done
                status["checkpoint_round"] = done
                emit({"type": "checkpoint", "round": done})
            rundir.write_status(run_dir, status)
        status["state"] = "finished"
    except KeyboardInterrupt:
        status["state"] = "interrupted"
        raise
    except Exception:
        status["state"] = "failed"  # the last checkpoint still stands: --resume after fixing the cause
        raise
    finally:
        rundir.write_status(run_dir, status)
        be.shutdown()
    return {"run_dir": str(run_dir), "rounds": run.rounds, "summary": summary, "retries": counters["retries"],
            "dropped": counters["dropped"], "workers": be.n_workers}


def _evaluate(be, writer, run, r: int, seen, unseen, sizes, last_ckpt: int, emit: Event) -> list[dict]:
    rows: list[dict] = []
    for cohort, ids in (("seen", seen), ("unseen", unseen)):
        chosen = sample_eval(run.seed, r, cohort, ids, run.eval_clients)
        if not chosen:
            continue
        for pi, phase in enumerate(be.call("phases", "eval", cohort)):
            info = RoundInfo(round=r, seed=run.seed, mode="eval", cohort=cohort, phase_index=pi,
                             client_ids=tuple(chosen))
            be.run_phase(phase, info, chosen, sizes, lambda meta: rows.extend(meta["rows"]), last_ckpt)
    path = writer.write(rows, r + 1, "eval")
    summary = metrics.summarize(metrics.read(path)).to_dicts() if path else []
    emit({"type": "eval", "round": r + 1, "summary": summary})
    return summary
