"""The round loop: sample a cohort, run each phase of the method on a backend, evaluate, checkpoint.

UI-free: progress goes to an `on_event(dict)` callback (the CLI draws a progress bar from it).

With a [system] table (or [run] aggregation = "fedbuff") the virtual clock (engine/clock.py) plans
each round: who trains (and with what step budget, from which model version), the rows of the
clients that did not, and the round's virtual end time (`virtual_time`, in the round stats and
the "round" event).
"""

from __future__ import annotations

import dataclasses
import math
import os
import socket
import time
from pathlib import Path
from typing import Any, Callable

from simfed.algorithms import registry
from simfed.algorithms.base import RoundInfo
from simfed.core.errors import RunFailed, SimfedError
from simfed.engine import checkpoint, metrics, rundir, signals, storage
from simfed.engine.backends import Backend, ServerLost, open_backend
from simfed.engine.clientstate import ClientStateStore
from simfed.engine.config import Experiment
from simfed.engine.evaluate import evaluate
from simfed.engine.plan import Plan, check_experiment, check_resume, n_train
from simfed.engine.rounds import RoundPlan
from simfed.engine.sampling import sample_cohort, sample_poisson
from simfed.engine.worker import release_heap

Event = Callable[[dict], None]


def run_experiment(exp: Experiment, run_dir: str | os.PathLike, *, resume: bool = False,
                   on_event: Event | None = None, backend: str | None = None, plan: Plan | None = None) -> dict[str, Any]:
    """Run (or resume) `exp` in `run_dir`, which this call owns meanwhile (engine.rundir).

    `plan` is what `check_experiment(exp, on_event, run_dir if resume else None)` returned, when the
    caller checked before (`simfed.launch` does, before it writes anything); otherwise it is made here.
    `backend` overrides engine.backend. If the server actor dies, the run goes on from its last
    checkpoint exactly as a resume would (the same numbers), at most engine.max_retries times; the
    count is in the result and status."""
    run_dir = Path(run_dir)
    emit = on_event or (lambda e: None)
    with rundir.hold(run_dir):
        if plan is None:
            plan = check_experiment(exp, on_event, run_dir if resume else None)
        restarts = 0
        while True:
            try:
                return _run(exp, run_dir, plan, resume, emit, backend, restarts)
            except ServerLost:
                restarts += 1
                if restarts > exp.engine.max_retries:
                    rundir.write_status(run_dir, {**(rundir.read_status(run_dir) or {}), "state": "failed",
                                                  "server_restarts": restarts - 1})
                    raise RunFailed(f"the server actor died {restarts} times (engine.max_retries = "
                                    f"{exp.engine.max_retries}); the last checkpoint stands: continue with "
                                    f"simfed launch --resume {run_dir}") from None
                resume = os.path.lexists(run_dir / checkpoint.NAME)  # no checkpoint yet: start over
                emit({"type": "server_restart", "restarts": restarts})
                if resume:
                    plan = dataclasses.replace(plan, checkpoint=check_resume(exp, plan.task, run_dir, plan.privacy))


def _run(exp: Experiment, run_dir: Path, plan: Plan, resume: bool, emit: Event, kind: str | None,
         restarts: int) -> dict:
    """One attempt: from the plan's checkpoint (resume) or from scratch, until the last round."""
    attempt = _Attempt(exp, run_dir, plan, resume, emit)
    with open_backend(exp, plan, attempt.state_root, attempt.server_state, kind) as be:
        if registry.get(exp.algorithm).keeps_client_state(exp.algorithm_config):
            be.check_storage(attempt.state_root, exp.engine.storage)
        start, rounds = attempt.start, exp.run.rounds
        status = {"state": "running", "completed_rounds": start, "checkpoint_round": start, "rounds": rounds,
                  "workers": be.n_workers, "backend": be.name, "pid": os.getpid(), "host": socket.gethostname(),
                  "server_restarts": restarts}
        privacy = {"privacy": plan.privacy.describe(), "epsilon": _json_number(attempt.epsilon)} if plan.privacy else {}
        status.update(privacy)
        emit({"type": "start", "start_round": start, "rounds": rounds, "workers": be.workers_info(),
              "clients_per_round": exp.run.clients_per_round, "seen": len(plan.seen), "unseen": len(plan.unseen),
              "server_pid": be.server_pid(), **privacy})
        try:
            summary = attempt.rounds(be, status)
            status["state"] = "finished"
        except (KeyboardInterrupt, ServerLost):
            status["state"] = "interrupted"
            raise
        except Exception:
            status["state"] = "failed"  # the last checkpoint still stands: --resume after fixing the cause
            raise
        finally:
            with signals.deferred():
                rundir.write_status(run_dir, status)
    return {"run_dir": str(run_dir), "rounds": rounds, "summary": summary, "retries": attempt.counters["retries"],
            "dropped": attempt.counters["dropped"], "workers": be.n_workers, "server_restarts": restarts}


class _Attempt:
    """The rounds of one attempt: the metrics writer, the counters and the last checkpoint's round."""

    def __init__(self, exp: Experiment, run_dir: Path, plan: Plan, resume: bool, emit: Event):
        ckpt = plan.checkpoint if resume else None
        if resume and ckpt is None:
            raise SimfedError(f"{run_dir}: no checkpoint to resume from (it is written every run.checkpoint_every "
                              "rounds)")
        if not resume and (run_dir / checkpoint.NAME).exists():
            raise SimfedError(f"{run_dir} already holds a run; resume it with --resume {run_dir} or pick another "
                              "--out")
        self.exp, self.run_dir, self.plan, self.emit = exp, run_dir, plan, emit
        self.start = int(ckpt["round"]) if ckpt else 0
        self.counters = dict(ckpt["counters"]) if ckpt else {"retries": 0, "dropped": 0}
        self.server_state = ckpt["server"] if ckpt else None
        self.writer = metrics.MetricsWriter(run_dir, run_dir.name)
        self.state_root = storage.state_root(exp.engine.storage, run_dir)
        states = ClientStateStore(self.state_root)
        self.writer.truncate_after(self.start)
        states.truncate_after(self.start)
        self.last_ckpt = self.start
        # [privacy]: epsilon at delta after the rounds done so far (dp-accounting, engine.privacy)
        self.epsilon = plan.privacy.epsilon(self.start) if plan.privacy else None
        self.clock = None  # the virtual clock (engine.clock.RoundClock), made at the first round it plans
        self.clock_start = float(ckpt.get("clock", 0.0)) if ckpt else 0.0

    def rounds(self, be: Backend, status: dict) -> list[dict]:
        """Train, evaluate when due, save; returns the last evaluation's summary."""
        run = self.exp.run
        summary: list[dict] = []
        for r in range(self.start, run.rounds):
            self.train(be, r)
            done = r + 1
            if (run.eval_every > 0 and done % run.eval_every == 0) or done == run.rounds:
                summary = evaluate(be, self.plan, run, r, self.writer, self.last_ckpt, self.emit)
            self.save(be, status, done)
        return summary

    def train(self, be: Backend, r: int) -> None:
        """Training round r (0-based): every phase over the round's cohort, then its metric rows."""
        run, emit, counters = self.exp.run, self.emit, self.counters
        t0 = time.perf_counter()
        phases = be.phases("train", r)
        planned = self.round_plan(r, phases)
        privacy = self.plan.privacy
        if planned:
            cohort = planned.cohort
        elif privacy is not None and privacy.sampling == "poisson":  # the sampling its accounting assumes
            cohort = sample_poisson(run.seed, r, self.plan.seen, privacy.rate)
        else:
            cohort = sample_cohort(run.seed, r, self.plan.seen, run.clients_per_round)
        timing = dict(budgets=planned.budgets, starts=planned.starts, keep_from=planned.keep_from) if planned else {}
        rows: list[dict] = []
        round_stats: dict[str, float] = {}

        def on_chunk(meta: dict) -> None:
            rows.extend(meta["rows"])
            counters["dropped"] += meta["dropped"]
            emit({"type": "chunk", "round": r + 1, "clients": meta["n_clients"], "samples": meta["n_train"]})

        # Nobody to train: the server does not step, unless [privacy] releases (noise) every round
        for pi, phase in enumerate(phases if cohort or privacy is not None else ()):
            info = RoundInfo(round=r, seed=run.seed, mode="train", cohort="seen", phase_index=pi,
                             private=privacy is not None, **timing)
            stats = be.run_phase(phase, info, cohort, self.plan.sizes, on_chunk, self.last_ckpt)
            round_stats.update({f"{phase}.{k}": v for k, v in stats.items()})
        extra = {}
        if planned:
            rows = planned.annotate(rows, phases) + planned.lost_rows(phases, self.clock.works.of(phases))
            round_stats["virtual_time"] = extra["virtual_time"] = planned.end
        if privacy is not None:
            self.epsilon = privacy.epsilon(r + 1)
            round_stats["epsilon"] = extra["epsilon"] = self.epsilon
        self.writer.write(rows, r + 1, "train")
        self.writer.write_rounds(round_stats, r + 1)
        losses = [row["loss"] for row in rows if row.get("loss") is not None and not row.get("dropped")]
        emit({"type": "round", "round": r + 1, "seconds": time.perf_counter() - t0, "stats": round_stats,
              "clients": len(cohort), "train_loss": math.fsum(losses) / len(losses) if losses else None,
              **extra})

    def round_plan(self, r: int, phases: list[str]) -> RoundPlan | None:
        """The virtual clock's plan of round r (None without [system] and FedBuff: ideal clients)."""
        exp = self.exp
        if exp.system is None and exp.run.aggregation == "sync":
            return None
        if self.clock is None:
            from simfed.engine.clock import RoundClock

            self.clock = RoundClock(exp, self.plan.task, self.plan.seen, n_train(self.plan.store.clients), phases,
                                    self.start, self.clock_start)
        return self.clock.plan(r, phases)

    def save(self, be: Backend, status: dict, done: int) -> None:
        """After round `done`: the counters, the checkpoint when due, status.json, then the "saved" event."""
        run, counters = self.exp.run, self.counters
        counters["retries"] = counters.get("retries", 0) + be.take_retries()
        memory = be.server_memory()
        status.update(completed_rounds=done, server_rss_bytes=memory.rss, server_private_bytes=memory.private,
                      retries=counters["retries"], dropped=counters["dropped"])
        if self.plan.privacy is not None:
            status["epsilon"] = _json_number(self.epsilon)
        due = (run.checkpoint_every > 0 and done % run.checkpoint_every == 0) or done == run.rounds
        final = done == run.rounds  # nothing resumes a finished run: the model, no optimizer state
        state = be.state_dict(final) if due else None
        with signals.deferred():  # the checkpoint and the status that names it, or neither
            if due:
                checkpoint.save(self.run_dir, done, state, counters, final=final,
                                clock=None if self.clock is None else self.clock.time)
                self.last_ckpt = done
                status["checkpoint_round"] = done
            rundir.write_status(self.run_dir, status)
        if due:
            # the server state just saved was the driver's largest allocation: hand its pages back
            # rather than let the next one land beside them (the soak's driver crept up at these rounds)
            del state
            release_heap()
            self.emit({"type": "checkpoint", "round": done})
        # Every file of this round is on disk (metrics, checkpoint, status): a listener that may
        # end the process here (a sweep trial reporting to Tune, which ASHA can stop) leaves a
        # consistent run directory of `done` rounds.
        self.emit({"type": "saved", "round": done, "checkpoint_round": self.last_ckpt})


def _json_number(x: float | None) -> float | None:
    """JSON has no infinity: an unbounded epsilon (noise_multiplier = 0) is written as null."""
    return x if x is not None and x != float("inf") else None
