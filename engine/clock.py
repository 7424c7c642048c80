"""The virtual clock: per-client draws and durations, and the plan of a sync round.

Ours, after FedScale (Lai et al., ICML 2022, arXiv 2105.11367): a client's virtual duration in a
round is its training samples over its compute speed plus its message bytes over its down and up
bandwidths (`Algorithm.work` states them per phase; a round's phases run back to back);
over-commitment samples ceil(overcommit x K) clients and keeps the first K to finish. Every draw
is a pure function of (run seed, round or start, client id, "system") through derive_seed, and of
the traces: no Ray, no wall clock, no arrival order, so a run gives the same numbers on every
backend and after a resume. The [system] keys are engine/system.py's; the asynchronous schedule
is engine/fedbuff.py's. Both produce `RoundPlan`s (engine/rounds.py), which the loop runs.
"""

from __future__ import annotations

import math
import statistics
from typing import Any, Callable, Mapping, Sequence

from simfed.algorithms.base import Work
from simfed.core.errors import SimfedError
from simfed.core.seeds import derive_seed
from simfed.engine import traces
from simfed.engine.rounds import ClientRound, RoundPlan
from simfed.engine.sampling import sample_cohort
from simfed.engine.system import SystemConfig

_NORMAL = statistics.NormalDist()


def uniform(*parts: Any) -> float:
    """A uniform draw in (0, 1) from derive_seed over the parts that identify it."""
    return (derive_seed(*parts) + 0.5) / 2.0 ** 63


class Clock:
    """The per-client draws and durations of one run: speeds, availability, dropout."""

    def __init__(self, cfg: SystemConfig, seed: int, seen: Sequence[int], n_train: Mapping[int, int]):
        """`n_train`: every client of the store (seen and unseen), {client id: train samples}."""
        self.cfg, self.seed = cfg, seed
        self.seen = sorted(int(c) for c in seen)
        self.n_train = {int(c): int(n) for c, n in n_train.items()}
        a = cfg.availability
        self.trace = None if not isinstance(a, str) or a in ("always", "diurnal") else \
            traces.read_availability(a, self.n_train)
        if self.trace is not None and not set(self.trace) & set(self.seen):
            raise SimfedError(f"{a}: no seen client of the store has an online interval in the availability trace")
        self.speeds = traces.read_speeds(cfg.speed, self.seen) if cfg.speed != "lognormal" else \
            {c: self._lognormal(c) for c in self.seen}

    def _lognormal(self, cid: int) -> tuple[float, float, float]:
        c = self.cfg
        return tuple(median * math.exp(spread * _NORMAL.inv_cdf(uniform(self.seed, "system", cid, "speed", key)))
                     for key, median, spread in (("compute", c.compute, c.compute_spread),
                                                 ("down", c.down, c.down_spread), ("up", c.up, c.up_spread)))

    # --- availability and dropout ------------------------------------------------------------
    def available(self, cid: int, key: Any, t: float) -> bool:
        """Whether client cid can be sampled at virtual time t; `key` identifies the draw (the round,
        or an asynchronous start)."""
        a = self.cfg.availability
        if self.trace is not None:
            spans = self.trace.get(cid)
            return spans is not None and spans.online(t)
        if a == "always":
            return True
        if a == "diurnal":
            c = self.cfg
            p = c.diurnal_low + (c.diurnal_high - c.diurnal_low) * 0.5 * (1.0 - math.cos(2 * math.pi * t / c.diurnal_period))
        else:
            p = float(a)
        return uniform(self.seed, key, cid, "system", "available") < p

    def online_until(self, cid: int, t: float) -> float:
        """When a client online at t goes offline (inf without a trace)."""
        if self.trace is None:
            return math.inf
        return self.trace[cid].online_until(t)

    def next_online(self, t: float) -> float | None:
        """The first interval start after t of any seen client (None without a trace or after it)."""
        if self.trace is None:
            return None
        starts = [s for s in (self.trace[c].next_start(t) for c in self.seen if c in self.trace) if s is not None]
        return min(starts, default=None)

    def failure(self, cid: int, key: Any, start: float, total: float) -> float | None:
        """Seconds after its start at which a client fails (dropout, or its online interval ends),
        None if it does not."""
        fail = None
        if self.cfg.dropout > 0 and uniform(self.seed, key, cid, "system", "dropout") < self.cfg.dropout:
            fail = uniform(self.seed, key, cid, "system", "fail-at") * total
        offline = self.online_until(cid, start) - start
        if offline < total and (fail is None or offline < fail):
            fail = offline
        return fail

    # --- durations ------------------------------------------------------------------------------
    def seconds(self, cid: int, work: Work) -> tuple[float, float]:
        """(compute seconds, communication seconds) of one phase's work."""
        compute, down, up = self.speeds[cid]
        return work.samples / compute, work.bytes_down / down + work.bytes_up / up

    def budget(self, cid: int, work: Work, time: float) -> int:
        """Local steps of a one-phase `work` a client finishes in `time` virtual seconds (its
        compute share: steps in proportion to the compute seconds left after its messages)."""
        compute, comm = self.seconds(cid, work)
        if compute <= 0 or time <= comm:
            return 0
        return min(work.steps, int(math.floor(work.steps * (time - comm) / compute)))


def plan_round(clock: Clock, r: int, t0: float, k: int, works: Callable[[int], Sequence[Work]],
               partial: str) -> RoundPlan:
    """Sync round r starting at virtual time t0: who is sampled among the available clients, how
    each one's round ends (completed, partial, dropped, straggler) and when the round ends.
    `works(cid)` is the client's work per train phase; `partial` the method's declaration."""
    cfg = clock.cfg
    t, avail = t0, [c for c in clock.seen if clock.available(c, r, t0)]
    if not avail:
        nxt = clock.next_online(t0)  # a trace: the server waits for the next client to come online
        if nxt is not None:
            t, avail = nxt, [c for c in clock.seen if clock.available(c, r, nxt)]
    if not avail:
        return RoundPlan(round=r, start=t, end=t + cfg.idle_wait, clients=[])
    sampled = sample_cohort(clock.seed, r, avail, min(len(avail), math.ceil(cfg.overcommit * k - 1e-9)))
    outs = [_client_round(clock, r, t, cid, list(works(cid)), partial) for cid in sampled]
    done = sorted((o for o in outs if o.finish is not None), key=lambda o: (o.finish, o.client_id))
    kept = {o.client_id for o in done[:k]}
    if len(kept) == k:
        end = done[k - 1].finish
    elif cfg.deadline > 0:
        end = cfg.deadline
    else:
        end = max((o.finish if o.finish is not None else o.spent) for o in outs)
    final = []
    for o in outs:  # nobody's round outlasts the server's: what is not in by the end is too late
        if o.outcome == "straggler" or (o.finish is not None and o.client_id not in kept) or o.spent > end:
            o = o.cut("straggler", min(o.spent, end))
        final.append(o)
    return RoundPlan(round=r, start=t, end=t + end, clients=final)


def _client_round(clock: Clock, r: int, t: float, cid: int, works: list[Work], partial: str) -> ClientRound:
    """One sampled client's round: its phases' durations and how it ends (before over-commitment)."""
    cfg = clock.cfg
    phases = [sum(clock.seconds(cid, w)) for w in works]
    total = sum(phases)
    fail = clock.failure(cid, r, t, total)
    base = dict(client_id=cid, start=t, phases=tuple(phases))
    if fail is not None:
        return ClientRound(**base, outcome="dropped", spent=fail)
    if cfg.deadline <= 0 or total <= cfg.deadline:
        return ClientRound(**base, outcome="completed", spent=total, finish=total)
    if cfg.stragglers == "partial" and partial == "steps" and len(works) == 1:
        steps = clock.budget(cid, works[0], cfg.deadline)
        if steps >= 1:
            return ClientRound(**base, outcome="partial", spent=cfg.deadline, finish=cfg.deadline, budget=steps)
    return ClientRound(**base, outcome="straggler", spent=total)


def fastest_round(clock: Clock, works: Callable[[int], Sequence[Work]], partial: bool) -> tuple[float, int]:
    """(virtual seconds, client) of the quickest round any seen client can do: its whole round, or
    with `partial` its messages and one local step."""
    best = (math.inf, -1)
    for cid in clock.seen:
        ws = list(works(cid))
        if partial and len(ws) == 1 and ws[0].steps > 0:
            compute, comm = clock.seconds(cid, ws[0])
            need = comm + compute / ws[0].steps
        else:
            need = sum(sum(clock.seconds(cid, w)) for w in ws)
        best = min(best, (need, cid))
    return best


class Works:
    """A method's `Work` in each phase for each client (its statement, memoized by phase and size)."""

    def __init__(self, algo: Any, cfg: Any, task: Any, n_train: Mapping[int, int]):
        self.algo, self.cfg, self.task, self.n_train = algo, cfg, task, n_train
        self._memo: dict[tuple[str, int], Work] = {}

    def of(self, phases: Sequence[str]) -> Callable[[int], list[Work]]:
        def works(cid: int) -> list[Work]:
            n = int(self.n_train[cid])
            for p in phases:
                if (p, n) not in self._memo:
                    self._memo[(p, n)] = self.algo.work(p, self.cfg, self.task, n)
            return [self._memo[(p, n)] for p in phases]
        return works


class RoundClock:
    """The round loop's view of the clock: the plan of each training round, sync or FedBuff, from
    the round and virtual time a run (or a resumed one) starts at."""

    def __init__(self, exp: Any, task: Any, seen: Sequence[int], n_train: Mapping[int, int],
                 phases: Sequence[str], start_round: int = 0, start_time: float = 0.0):
        from simfed.algorithms import registry
        from simfed.engine import fedbuff

        self.algo = registry.get(exp.algorithm)
        self.clock = Clock(exp.system or SystemConfig(), exp.run.seed, seen, n_train)
        self.works = Works(self.algo, exp.algorithm_config, task, self.clock.n_train)
        self.k = exp.run.clients_per_round
        self.time = float(start_time) if start_round > 0 else self.clock.cfg.start
        self.schedule = None
        if exp.run.aggregation == "fedbuff":  # the whole schedule again from time 0, up to the start
            self.schedule = fedbuff.schedule(self.clock, self.k, exp.run.buffer_size, self.works.of(phases))
            for _ in range(start_round):
                self.time = next(self.schedule).end

    def plan(self, r: int, phases: Sequence[str]) -> RoundPlan:
        if self.schedule is not None:
            plan = next(self.schedule)
        else:
            plan = plan_round(self.clock, r, self.time, self.k, self.works.of(phases), self.algo.capabilities.partial)
        self.time = plan.end
        return plan


def check_experiment(exp: Any, task: Any, seen: Sequence[int], n_train: Mapping[int, int]) -> None:
    """Everything about [system] and FedBuff that can be checked before any work (one line each):
    what the method can do, the traces, and a deadline some client can meet."""
    from simfed.algorithms import registry

    run, algo = exp.run, registry.get(exp.algorithm)
    if exp.system is None and run.aggregation == "sync":
        return
    cfg, caps = exp.system or SystemConfig(), algo.capabilities
    if run.aggregation == "fedbuff":
        _check_fedbuff(exp, cfg, len(seen))
    if cfg.stragglers == "partial" and caps.partial == "refuse":
        raise SimfedError(f"[system] stragglers = \"partial\" but {exp.algorithm} refuses partial work (see `simfed "
                          f"algorithms {exp.algorithm}`); use stragglers = \"drop\"")
    clock = Clock(cfg, run.seed, seen, n_train)  # reads and checks the traces
    if cfg.deadline > 0:
        phases = list(algo.train_phases(exp.algorithm_config, algo.init(exp.algorithm_config, task, run.seed), 0))
        works = Works(algo, exp.algorithm_config, task, clock.n_train).of(phases)
        need, cid = fastest_round(clock, works, cfg.stragglers == "partial" and caps.partial == "steps")
        if need > cfg.deadline:
            raise SimfedError(f"[system] deadline = {cfg.deadline:g} s: no client can finish a round in time; the "
                              f"fastest, client {cid}, needs {need:.4g} virtual seconds (its samples over its compute "
                              "speed plus its messages over its bandwidths); raise the deadline or the speeds")


def _check_fedbuff(exp: Any, cfg: SystemConfig, n_seen: int) -> None:
    from simfed.algorithms import registry

    if not registry.get(exp.algorithm).capabilities.asynchronous:
        can = [n for n in registry.names() if registry.get(n).capabilities.asynchronous and not n.startswith("test-")]
        raise SimfedError(f"[run] aggregation = \"fedbuff\" but {exp.algorithm} cannot run asynchronously; use "
                          f"\"sync\" or one of: {', '.join(can)}")
    if cfg.deadline > 0 or cfg.overcommit > 1 or cfg.stragglers != "drop":
        raise SimfedError("[system] deadline, overcommit and stragglers apply to sync rounds; FedBuff has no round "
                          "deadline: remove them or use [run] aggregation = \"sync\"")
    if exp.run.buffer_size > n_seen:
        raise SimfedError(f"[run] buffer_size = {exp.run.buffer_size} but the store has {n_seen} seen clients; a "
                          f"buffer holds distinct clients: use at most {n_seen}")
    if not isinstance(cfg.availability, str) and cfg.availability == 0:
        raise SimfedError("[system] availability = 0 with fedbuff: no client could ever start; use a probability > 0")
