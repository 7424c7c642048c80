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
from simfed.engine import checkpoint, metrics, rundir, storage
from simfed.engine.backends import ServerLost, make_backend
from simfed.engine.clientstate import ClientStateStore
from simfed.engine.config import DataConfig, Experiment
from simfed.core.errors import RunFailed, SimfedError
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
    store = PartitionStore.open(data.path)  # metadata, and every file's presence and size
    store.check_contents()  # shapes, row counts and label ranges: never first met in a worker
    return store


def check_resume(exp: Experiment, task: Task, run_dir: Path) -> dict:
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
    fresh = Server(exp.algorithm, exp.algorithm_config, task, exp.run.seed)
    checkpoint.check_matches(ckpt["server"], fresh.state_dict(), str(path))
    try:
        fresh.state.load_state_dict(ckpt["server"])
    except Exception as exc:  # the method's own loader disagrees: same verdict, one line
        raise SimfedError(f"{path}: the server state does not load ({type(exc).__name__}); the checkpoint "
                          "does not belong to this experiment or is damaged") from None
    ClientStateStore(run_dir / "client_state").check(ckpt["round"])
    for f in metrics.files(run_dir, upto=ckpt["round"]):  # later ones are rewritten by the resumed run
        metrics.check_file(f)
    return ckpt


def check_experiment(exp: Experiment, on_event: Event | None = None, resume_dir: str | os.PathLike | None = None):
    """Everything that can be checked before any work: the store, the method against it, the cohort size,
    and with `resume_dir` the run directory to continue. Returns (store, task, seen ids, unseen ids)."""
    run = exp.run
    store = open_store(exp.data, on_event)
    seen, unseen = [int(c) for c in store.client_ids("seen")], [int(c) for c in store.client_ids("unseen")]
    task = Task(**store.task_fields(), num_clients=len(seen), total_clients=len(seen) + len(unseen))
    algo = registry.get(exp.algorithm)
    algo.validate(exp.algorithm_config, task)
    table = store.clients
    algo.check_clients(exp.algorithm_config, dict(zip((int(c) for c in table.column("client_id").to_pylist()),
                                                      (int(n) for n in table.column("n_train").to_pylist()))))
    if exp.engine.vectorize == "on" and not algo.capabilities.chunk_replies:
        with_support = [n for n in registry.names() if registry.get(n).capabilities.chunk_replies]
        raise SimfedError(f"[engine] vectorize = \"on\" but {exp.algorithm} has no vectorized client step; "
                          f"use \"auto\" or \"off\" (methods with one: {', '.join(with_support)})")
    if run.clients_per_round < 1 or run.clients_per_round > len(seen):
        raise SimfedError(f"[run] clients_per_round = {run.clients_per_round} but the store {store.path} has "
                          f"{len(seen)} seen clients; use a value between 1 and {len(seen)}")
    if run.rounds < 1:
        raise SimfedError(f"[run] rounds = {run.rounds}; it must be at least 1")
    if resume_dir is not None:
        check_resume(exp, task, Path(resume_dir))
    return store, task, seen, unseen


def run_experiment(exp: Experiment, run_dir: str | os.PathLike, *, resume: bool = False,
                   on_event: Event | None = None, backend: str | None = None) -> dict[str, Any]:
    """Run (or resume) `exp` in `run_dir`, which this call owns meanwhile (engine.rundir).

    If the server actor dies, the run goes on from its last checkpoint exactly as `--resume` would
    (the same numbers), at most engine.max_retries times; the count is in the result and status."""
    run_dir = Path(run_dir)
    with rundir.hold(run_dir):
        restarts = 0
        while True:
            try:
                return _run(exp, run_dir, resume, on_event, backend, restarts)
            except ServerLost:
                restarts += 1
                if restarts > exp.engine.max_retries:
                    rundir.write_status(run_dir, {**(rundir.read_status(run_dir) or {}), "state": "failed",
                                                  "server_restarts": restarts - 1})
                    raise RunFailed(f"the server actor died {restarts} times (engine.max_retries = "
                                    f"{exp.engine.max_retries}); the last checkpoint stands: continue with "
                                    f"simfed launch --resume {run_dir}") from None
                resume = checkpoint.load(run_dir) is not None  # no checkpoint yet: start over
                (on_event or (lambda e: None))({"type": "server_restart", "restarts": restarts})


def _run(exp: Experiment, run_dir: Path, resume: bool, on_event: Event | None, backend: str | None,
         restarts: int = 0) -> dict:
    emit = on_event or (lambda e: None)
    run, eng = exp.run, exp.engine
    store, task, seen, unseen = check_experiment(exp, on_event, run_dir if resume else None)
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
    state_root = storage.state_root(eng.storage, run_dir)
    states = ClientStateStore(state_root)
    writer.truncate_after(start)
    states.truncate_after(start)

    spec = WorkerSpec(store_path=store.path, algorithm=exp.algorithm, cfg=exp.algorithm_config, task=task,
                      seed=run.seed, state_dir=state_root,
                      threads=max(1, int(eng.cpus_per_worker)), use_gpu=eng.gpus_per_worker > 0,
                      vectorize=eng.vectorize)
    # The server computes with as many threads as a worker on both backends: a reduction split
    # over a different thread count can round differently.
    server_args = dict(algorithm=exp.algorithm, cfg=exp.algorithm_config, task=task, seed=run.seed,
                       state_dict=ckpt["server"] if ckpt else None, threads=spec.threads)
    be = make_backend(backend or eng.backend, spec, server_args, eng)
    if algo.capabilities.client_state:
        try:
            be.check_storage(state_root, eng.storage)
        except BaseException:
            be.shutdown()
            raise
    status = {"state": "running", "completed_rounds": start, "checkpoint_round": start, "rounds": run.rounds,
              "workers": be.n_workers, "backend": be.name, "pid": os.getpid(), "host": socket.gethostname(),
              "server_restarts": restarts}
    emit({"type": "start", "start_round": start, "rounds": run.rounds, "workers": be.workers_info(),
          "clients_per_round": run.clients_per_round, "seen": len(seen), "unseen": len(unseen),
          "server_pid": be.call("pid")})
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
                info = RoundInfo(round=r, seed=run.seed, mode="train", cohort="seen", phase_index=pi)
                stats = be.run_phase(phase, info, cohort, sizes, on_chunk, last_ckpt)
                round_stats.update({f"{phase}.{k}": v for k, v in stats.items()})
            writer.write(rows, r + 1, "train")
            writer.write_rounds(round_stats, r + 1)
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
                final = done == run.rounds  # nothing resumes a finished run: the model, no optimizer state
                checkpoint.save(run_dir, done, be.call("state_dict", final), counters, final=final)
                last_ckpt = done
                status["checkpoint_round"] = done
                emit({"type": "checkpoint", "round": done})
            rundir.write_status(run_dir, status)
            # Every file of this round is on disk (metrics, checkpoint, status): a listener that may
            # end the process here (a sweep trial reporting to Tune, which ASHA can stop) leaves a
            # consistent run directory of `done` rounds.
            emit({"type": "saved", "round": done, "checkpoint_round": last_ckpt})
        status["state"] = "finished"
    except (KeyboardInterrupt, ServerLost):
        status["state"] = "interrupted"
        raise
    except Exception:
        status["state"] = "failed"  # the last checkpoint still stands: --resume after fixing the cause
        raise
    finally:
        rundir.write_status(run_dir, status)
        be.shutdown()
    return {"run_dir": str(run_dir), "rounds": run.rounds, "summary": summary, "retries": counters["retries"],
            "dropped": counters["dropped"], "workers": be.n_workers, "server_restarts": restarts}


def _evaluate(be, writer, run, r: int, seen, unseen, sizes, last_ckpt: int, emit: Event) -> list[dict]:
    rows: list[dict] = []
    for cohort, ids in (("seen", seen), ("unseen", unseen)):
        chosen = sample_eval(run.seed, r, cohort, ids, run.eval_clients)
        if not chosen:
            continue
        phases = be.call("phases", "eval", cohort)
        emit({"type": "eval_start", "round": r + 1, "cohort": cohort, "clients": len(chosen), "phases": len(phases)})
        for pi, phase in enumerate(phases):
            info = RoundInfo(round=r, seed=run.seed, mode="eval", cohort=cohort, phase_index=pi)

            def on_chunk(meta: dict, cohort: str = cohort, phase: str = phase) -> None:
                rows.extend(meta["rows"])
                emit({"type": "eval_chunk", "round": r + 1, "cohort": cohort, "phase": phase,
                      "clients": meta["n_clients"]})

            be.run_phase(phase, info, chosen, sizes, on_chunk, last_ckpt)
    path = writer.write(rows, r + 1, "eval")
    summary = metrics.summarize(metrics.read(path)).to_dicts() if path else []
    emit({"type": "eval", "round": r + 1, "summary": summary})
    return summary
