"""Asynchronous aggregation: FedBuff (Nguyen, Malik, Zhao, Rabbat, Sanjabi, Esmaeili, Huba, AISTATS
2022, arXiv 2106.06639) on the virtual clock.

From the paper (Algorithm 1): up to `concurrency` clients train at once, each from the model
version current when it started; the server adds every finished update to a buffer and, once
`buffer_size` updates are in, applies their mean as one server step, each update weighted by
1/sqrt(1 + staleness) (staleness: server steps between the client's start and this one). Ours:
- `concurrency` is [run] clients_per_round; a training round is one server step, so run.rounds,
  eval_every and checkpoint_every count server steps.
- Events are ordered by virtual time, ties by client id, and a client's duration does not depend
  on the model (engine/system.py's clock), so the whole schedule (who starts when, from which
  version, which buffer its update lands in) is computed here before anyone trains: a pure
  function of the seed, the clock and the store, recomputed identically on resume.
- A freed slot starts a client drawn uniformly from the available clients that are neither
  training nor waiting in the buffer (derive_seed over the start's index), so a client never
  has two updates in one buffer; nobody available: the slot retries after `idle_wait`.
- A client that drops out (dropout, or goes offline) frees its slot at its failure time; its
  update is lost and it is reported with the round its failure falls in.
- The staleness weight is applied by the method to its summable update (`update_sums`), which is
  linear, so it equals the server weighting the sum.

The round loop runs each buffer as one training phase over the buffer's clients: each client gets
the broadcast of the version it started from as its payload (`RoundInfo.starts`), which the
server keeps from the round it was current until no later buffer needs it (`RoundInfo.keep_from`);
that history is server state, checkpointed with the model (`VERSIONS`).
"""

from __future__ import annotations

import copy
import heapq
from typing import Any, Callable, Iterator, Sequence

import numpy as np

from simfed.algorithms.base import Work
from simfed.core.errors import SimfedError
from simfed.core.seeds import derive_seed
from simfed.engine.rounds import ClientRound, RoundPlan
from simfed.engine.clock import Clock

VERSIONS = "__simfed_fedbuff_versions__"  # key of the version history in a checkpoint's server state
MAX_IDLE_RETRIES = 1_000
END, RETRY = 0, 1  # event kinds; at equal times a client's end comes before a slot's retry


class _Schedule:
    """The event simulation behind `schedule`: slots, in-flight runs and the buffer."""

    def __init__(self, clock: Clock, concurrency: int, buffer_size: int, works: Callable[[int], Sequence[Work]]):
        self.clock, self.k, self.works = clock, buffer_size, works
        self.ids = np.asarray(clock.seen, dtype=np.int64)
        self.busy = np.zeros(len(self.ids), dtype=bool)
        self.pos = {int(c): i for i, c in enumerate(self.ids)}
        self.free, self.version, self.attempts, self.idle = concurrency, 0, 0, 0
        self.events: list[tuple[float, int, int, Any]] = []
        self.inflight: dict[int, int] = {}  # client id -> version it started from
        self.buffer: list[ClientRound] = []
        self.lost: list[ClientRound] = []
        self.retry_at: float | None = None

    def pick(self, t: float) -> int | None:
        """A client to start at t: -1 when every client is training or buffered (the slot waits for
        the next event), None when no idle client is available (it retries after idle_wait)."""
        idle = self.ids[~self.busy]
        if not len(idle):
            return -1
        key = ("fedbuff-start", self.attempts)
        self.attempts += 1
        order = np.random.default_rng(derive_seed(self.clock.seed, "system", *key)).permutation(len(idle))
        for j in order:
            cid = int(idle[j])
            if self.clock.available(cid, key, t):
                return cid
        return None

    def fill(self, t: float) -> None:
        """Start clients in the free slots at t; if nobody is available, retry after idle_wait."""
        while self.free > 0:
            cid = self.pick(t)
            if cid == -1:
                return
            if cid is None:
                if self.retry_at is None:
                    self.retry_at = t + self.clock.cfg.idle_wait
                    heapq.heappush(self.events, (self.retry_at, RETRY, -1, None))
                return
            self.idle, self.free = 0, self.free - 1
            self.busy[self.pos[cid]] = True
            self.inflight[cid] = self.version
            phases = tuple(sum(self.clock.seconds(cid, w)) for w in self.works(cid))
            total = sum(phases)
            fail = self.clock.failure(cid, ("fedbuff-start", self.attempts - 1), t, total)
            base = dict(client_id=cid, start=t, phases=phases, version=self.version)
            run = ClientRound(**base, outcome="dropped", spent=fail) if fail is not None else \
                ClientRound(**base, outcome="completed", spent=total, finish=total)
            heapq.heappush(self.events, (t + run.spent, END, cid, run))

    def step(self) -> tuple[float, bool]:
        """Process the next event; (its time, whether it filled the buffer)."""
        if not self.events:
            raise SimfedError("fedbuff: no client is training and none can start; check [run] clients_per_round")
        t, kind, cid, run = heapq.heappop(self.events)
        if kind == RETRY:
            self.retry_at = None
            self.idle += 1
            if self.idle > MAX_IDLE_RETRIES:
                raise SimfedError(f"fedbuff: no client became available for {MAX_IDLE_RETRIES} waits of [system] "
                                  f"idle_wait after virtual time {t - MAX_IDLE_RETRIES * self.clock.cfg.idle_wait:g} s; "
                                  "check [system] availability (a trace that ends, a probability of 0)")
            self.fill(t)
            return t, False
        self.free += 1
        del self.inflight[cid]
        if run.outcome == "dropped":
            self.busy[self.pos[cid]] = False
            self.lost.append(run)
        else:
            self.buffer.append(run)  # stays busy until its buffer is applied
        if len(self.buffer) < self.k:
            self.fill(t)
            return t, False
        return t, True

    def close(self, t: float, start: float) -> RoundPlan:
        """Apply the full buffer at t: the round plan of server step `version`."""
        closing, clients = self.version, self.buffer + self.lost
        self.version += 1
        for run in self.buffer:
            self.busy[self.pos[run.client_id]] = False
        self.buffer, self.lost = [], []
        self.fill(t)
        keep = min([*self.inflight.values(), self.version])
        return RoundPlan(round=closing, start=start, end=t, clients=clients, keep_from=keep)


def schedule(clock: Clock, concurrency: int, buffer_size: int, works: Callable[[int], Sequence[Work]]
             ) -> Iterator[RoundPlan]:
    """FedBuff's rounds, in order, from [system] start (endless: the loop takes what it needs)."""
    sim = _Schedule(clock, concurrency, buffer_size, works)
    start = clock.cfg.start
    sim.fill(start)
    while True:
        t, full = sim.step()
        if full:
            plan = sim.close(t, start)
            start = t
            yield plan


def split_state(sd: dict) -> tuple[dict, dict]:
    """(the method's server state, the version history) of a checkpointed server state."""
    if VERSIONS not in sd:
        return sd, {}
    rest = {k: v for k, v in sd.items() if k != VERSIONS}
    return rest, {int(k): v for k, v in sd[VERSIONS].items()}


def snapshot(bcast: Any) -> Any:
    """A copy of a broadcast that later server steps cannot change in place."""
    return copy.deepcopy(bcast)
