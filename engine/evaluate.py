"""Evaluation: the method's eval phases over the seen and unseen clients, one metric row per client
and split, and the per-cohort summary. The round loop calls it every run.eval_every rounds and
after the last; it can also evaluate a checkpoint's server state on a backend of its own."""

from __future__ import annotations

from typing import Callable

from simfed.algorithms.base import RoundInfo
from simfed.engine import metrics
from simfed.engine.backends import Backend
from simfed.engine.config import RunConfig
from simfed.engine.plan import Plan
from simfed.engine.sampling import sample_eval

Event = Callable[[dict], None]


def evaluate(backend: Backend, plan: Plan, run: RunConfig, round: int, writer: metrics.MetricsWriter,
             checkpointed_round: int, on_event: Event | None = None) -> list[dict]:
    """Evaluate the backend's server state after training round `round` (0-based) on each cohort's
    clients (`run.eval_clients` of them drawn per cohort, all when 0), chunked as training is
    (`plan.sizes`). The rows go to `writer` as round `round + 1`; returns the test summary per cohort
    (metrics.summarize). `checkpointed_round`: the round of the last checkpoint, for client state."""
    emit = on_event or (lambda e: None)
    rows: list[dict] = []
    for cohort, ids in (("seen", plan.seen), ("unseen", plan.unseen)):
        chosen = sample_eval(run.seed, round, cohort, ids, run.eval_clients)
        if not chosen:
            continue
        phases = backend.phases("eval", cohort)
        emit({"type": "eval_start", "round": round + 1, "cohort": cohort, "clients": len(chosen),
              "phases": len(phases)})
        for pi, phase in enumerate(phases):
            info = RoundInfo(round=round, seed=run.seed, mode="eval", cohort=cohort, phase_index=pi)

            def on_chunk(meta: dict, cohort: str = cohort, phase: str = phase) -> None:
                rows.extend(meta["rows"])
                emit({"type": "eval_chunk", "round": round + 1, "cohort": cohort, "phase": phase,
                      "clients": meta["n_clients"]})

            backend.run_phase(phase, info, chosen, plan.sizes, on_chunk, checkpointed_round)
    path = writer.write(rows, round + 1, "eval")
    summary = metrics.summarize(metrics.read(path)).to_dicts() if path else []
    emit({"type": "eval", "round": round + 1, "summary": summary})
    return summary
