"""What the virtual clock decided about one training round, in the form the round loop runs it.

Ours. A `RoundPlan` lists every client whose round ended in this round (engine/system.py for sync
rounds, engine/fedbuff.py for asynchronous ones) with its virtual start, its phases' durations and
its outcome:
- "completed": trained every phase, its update counts;
- "partial": a straggler that trained the local steps it finished by the deadline (`budget`);
- "dropped": failed during the round (dropout, or went offline), its update is lost;
- "straggler": too late (past the deadline, or after the first K of an over-committed cohort).

The loop trains only the completed and partial clients (the `cohort`), in the same chunks and
order as any cohort, and writes one train row per client and phase as always, with the clock's
columns (`annotate`); the clients that did not train get one row each (`lost_rows`, `dropped`
true, n = 0). Clients never sampled (unavailable, or not drawn) have no row. An asynchronous
round may hold several runs of one client (runs that dropped out, then one that finished).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Callable, Sequence

from simfed.algorithms.base import Work

TRAINS = ("completed", "partial")


@dataclass(frozen=True)
class ClientRound:
    client_id: int
    start: float  # virtual time its round (or asynchronous run) started
    phases: tuple[float, ...]  # virtual seconds of each train phase of its whole work
    outcome: str
    spent: float  # virtual seconds it spent (to its end, failure, or when the server stopped waiting)
    finish: float | None = None  # seconds after `start` its update arrived (completed, partial)
    budget: int | None = None  # partial: the local steps it trains
    version: int | None = None  # asynchronous: the model version it started from

    def cut(self, outcome: str, spent: float) -> "ClientRound":
        return dataclasses.replace(self, outcome=outcome, spent=spent, finish=None, budget=None)


@dataclass(frozen=True)
class RoundPlan:
    round: int  # 0-based training round (asynchronous: the server update it closes)
    start: float
    end: float  # the round's virtual end time: `virtual_time` in the round stats
    clients: list[ClientRound] = field(default_factory=list)
    keep_from: int = 0  # asynchronous: the oldest model version a later round still needs

    @property
    def cohort(self) -> list[int]:
        """The clients that train this round, sorted (the engine's cohort order)."""
        return sorted(c.client_id for c in self.clients if c.outcome in TRAINS)

    @property
    def budgets(self) -> tuple[tuple[int, int], ...]:
        return tuple(sorted((c.client_id, c.budget) for c in self.clients if c.budget is not None))

    @property
    def starts(self) -> tuple[tuple[int, int], ...]:
        return tuple(sorted((c.client_id, c.version) for c in self.clients
                            if c.version is not None and c.outcome in TRAINS))

    def annotate(self, rows: list[dict], phases: Sequence[str]) -> list[dict]:
        """The clock's columns on the train rows the workers wrote (one per client and phase). An
        asynchronous client may also have lost an earlier run in the same round: that one is a
        lost row of its own."""
        index = {p: i for i, p in enumerate(phases)}
        of = {c.client_id: c for c in self.clients if c.outcome in TRAINS}
        for row in rows:
            c = of[int(row["client_id"])]
            i = index[row["phase"]]
            seconds = c.spent if c.outcome == "partial" else c.phases[i]
            row.update(virtual_start=c.start + sum(c.phases[:i]), virtual_seconds=seconds, outcome=c.outcome,
                       staleness=None if c.version is None else self.round - c.version)
        return rows

    def lost_rows(self, phases: Sequence[str], works: Callable[[int], Sequence[Work]]) -> list[dict]:
        """One train row per client that did not train: the phase its time ran out in, the bytes it
        received until then, n = 0, `dropped` true."""
        out = []
        for c in self.clients:
            if c.outcome in TRAINS:
                continue
            ws, i, elapsed = list(works(c.client_id)), 0, 0.0
            while i < len(c.phases) - 1 and elapsed + c.phases[i] < c.spent:
                elapsed += c.phases[i]
                i += 1
            out.append({"round": self.round + 1, "client_id": c.client_id, "cohort": "seen", "split": "train",
                        "phase": phases[i], "n": 0, "seconds": 0.0, "loss": None, "bytes_up": 0,
                        "bytes_down": sum(w.bytes_down for w in ws[:i + 1]), "dropped": True,
                        "virtual_start": c.start, "virtual_seconds": c.spent, "outcome": c.outcome,
                        "staleness": None})
        return out
