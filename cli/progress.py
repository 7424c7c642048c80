"""Progress of `simfed launch` on stderr, from the run's events.

Two views of the same numbers (`Tally`): a live bar on a terminal, and plain lines for logs and
batch jobs (stderr not a terminal, or `--progress plain`): one line per round (round, clients/s,
training loss, accuracy when evaluated, virtual time and epsilon when the run has them, elapsed,
ETA) and per evaluation step (start, every PLAIN_EVAL_EVERY_S seconds of a long one, end).

The ETA counts the training rounds left at the pace of the rounds so far (known after round 1)
and the evaluations left: at the measured seconds per client of the last evaluation of each
cohort, or before any at the training pace per client. Evaluation progress counts clients, one
phase at a time (PeFLL's unseen clients: "phase 2/2"), never client-phases.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field

PLAIN_EVAL_EVERY_S = 30.0
LARGE_EVAL = 5  # an evaluation covering this many times a training round's clients is said so
LARGE_EVAL_SHARE = 0.5  # evaluations taking this share of the run's time (or more) get a warning


def clock(seconds: float | None) -> str:
    if seconds is None or seconds != seconds or seconds < 0:
        return "-:--:--"
    s = int(round(seconds))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


def eval_rounds(start: int, rounds: int, every: int) -> list[int]:
    """The rounds after `start` that evaluate: every `every`-th and the last."""
    return [r for r in range(start + 1, rounds + 1) if (every > 0 and r % every == 0) or r == rounds]


@dataclass
class _Eval:
    round: int
    cohort: str
    clients: int
    phases: int
    t0: float
    phase: int = 1
    phase_name: str = ""
    done: int = 0  # clients of the current phase


@dataclass
class Tally:
    """What the run has done so far, and what is left."""

    rounds: int = 0
    start_round: int = 0
    done: int = 0
    t0: float = 0.0
    train_s: float = 0.0  # wall time of the training rounds run (evaluations excluded)
    clients_done: int = 0
    eval_s: float = 0.0
    last: dict = field(default_factory=dict)  # the last round event
    acc: str = ""
    plan: dict = field(default_factory=dict)  # the "eval_plan" event
    per_client: dict = field(default_factory=dict)  # cohort -> measured eval seconds per client
    eval: _Eval | None = None
    evaluated: int = 0  # the last round whose evaluation finished (or the start)
    eval_round: int = 0  # the round whose cohorts in cohorts_done were evaluated
    cohorts_done: set = field(default_factory=set)
    warned: bool = False  # the evaluations' cost was checked (once, after the first one)
    window: list = field(default_factory=list)  # (time, clients) of recent chunks, for clients/s

    def rate(self, now: float) -> float | None:
        self.window = [(t, n) for t, n in self.window if now - t < 30]
        if len(self.window) < 2 or now - self.window[0][0] <= 0:
            return None
        return sum(n for _, n in self.window[1:]) / (now - self.window[0][0])

    def chunk(self, clients: int) -> None:
        self.window.append((time.monotonic(), clients))

    def round_s(self) -> float | None:
        n = self.done - self.start_round
        return self.train_s / n if n > 0 else None

    def eval_cost(self, cohort: str, clients: int) -> float | None:
        """Seconds to evaluate `clients` of `cohort`: measured, else at training's pace per client."""
        if cohort in self.per_client:
            return self.per_client[cohort] * clients
        per_round, cpr = self.round_s(), self.plan.get("clients_per_round") or self.last.get("clients")
        return per_round / cpr * clients if per_round is not None and cpr else None

    def eval_left(self, now: float) -> float | None:
        """Seconds left of the evaluation under way (its phases count as equal parts)."""
        e = self.eval
        units, done = e.clients * e.phases, e.clients * (e.phase - 1) + e.done
        if e.cohort in self.per_client:
            return self.per_client[e.cohort] * e.clients * (units - done) / max(units, 1)
        if done:
            return (now - e.t0) / done * (units - done)
        return self.eval_cost(e.cohort, e.clients)

    def eta(self, now: float) -> float | None:
        """Seconds left: the training rounds at their pace so far, and every evaluation not finished."""
        per_round = self.round_s()
        if per_round is None or not self.rounds:
            return None
        left = per_round * (self.rounds - self.done)
        for r in eval_rounds(self.evaluated, self.rounds, self.plan.get("eval_every", 0)) if self.plan else []:
            for cohort in ("seen", "unseen"):
                if not self.plan[cohort] or (r == self.eval_round and cohort in self.cohorts_done):
                    continue
                if self.eval is not None and (self.eval.round, self.eval.cohort) == (r, cohort):
                    left += self.eval_left(now) or 0.0
                else:
                    left += self.eval_cost(cohort, self.plan[cohort]) or 0.0
        return left


def fit(head: str, fraction: float | None, extras: list[str], tail: str, width: int) -> str:
    """One line of at most `width` columns: `head`, a bar when `fraction` is given and room is left,
    as many `extras` as fit (in order), and `tail` (elapsed and ETA), which is never cut."""
    if len(tail) >= width:
        return tail[:width]
    room = width - len(tail) - 1
    line = head[:room]
    kept = []
    for extra in extras:
        if len(line) + 1 + len(" ".join(kept + [extra])) <= room:
            kept.append(extra)
    used = len(line) + sum(len(k) + 1 for k in kept)
    bar_len = min(30, room - used - 1)
    if fraction is not None and bar_len >= 6:
        full = int(round(max(0.0, min(1.0, fraction)) * bar_len))
        line += " " + "━" * full + "╌" * (bar_len - full)
    return " ".join([line, *kept, tail])


def round_parts(t: Tally, now: float) -> tuple[str, float | None, list[str], str]:
    head = f"round {t.done}/{t.rounds}"
    ev = t.last
    extras = [f"{ev['clients'] / ev['seconds']:.1f} clients/s" if ev.get("clients") and ev.get("seconds") else ""]
    if ev.get("train_loss") is not None:
        extras.append(f"loss {ev['train_loss']:.4f}")
    if t.acc:
        extras.append(t.acc)
    if ev.get("virtual_time") is not None:
        extras.append(f"virtual {clock(float(ev['virtual_time']))}")
    if ev.get("epsilon") is not None:
        extras.append(f"epsilon {float(ev['epsilon']):.3g}")
    tail = f"{clock(now - t.t0)} ETA {clock(t.eta(now))}"
    return head, (t.done / t.rounds if t.rounds else None), [e for e in extras if e], tail


def eval_parts(t: Tally, now: float) -> tuple[str, float | None, list[str], str]:
    e = t.eval
    phase = f" phase {e.phase}/{e.phases}" if e.phases > 1 else ""
    rate = t.rate(now)
    extras = [f"{rate:.1f} clients/s"] if rate is not None else []
    return (f"eval {e.cohort} {e.done}/{e.clients}{phase}", e.done / e.clients if e.clients else None, extras,
            f"{clock(now - e.t0)} ETA {clock(t.eta(now))}")


def start_line(event: dict, plan: dict) -> str:
    """The run's first line: the pool, the cohorts, and what each evaluation covers (against a
    training round's clients when it is many times more, pointing at run.eval_clients)."""
    w = event["workers"]
    text = (f"{len(w)} worker(s) on {len({x['node_id'] for x in w})} node(s); {event['seen']} seen / "
            f"{event['unseen']} unseen clients, {event.get('clients_per_round', '?')} per round")
    if "privacy" in event:
        p = event["privacy"]
        text += (f"; privacy: {p['mode']} DP, noise multiplier {p['noise_multiplier']:.4g}, clip {p['clip']:g}, "
                 f"{p['sampling']} sampling, {p['accountant']} accountant, delta {p['delta']:g}")
    if not plan:
        return text
    every = plan["eval_every"]
    when = "after the last round" if every <= 0 else "every round" if every == 1 else f"every {every} rounds and the last"
    covered = plan["seen"] + plan["unseen"]
    text += f"; each evaluation ({when}) covers {plan['seen']} seen + {plan['unseen']} unseen clients"
    times = covered / max(plan["clients_per_round"], 1)
    if plan["eval_clients"] <= 0 and times >= LARGE_EVAL:
        text += (f", {times:.0f}x a training round's {plan['clients_per_round']} (set run.eval_clients to "
                 "evaluate fewer per cohort)")
    return text


def startup_line(startup: dict) -> str:
    ray = f", Ray {startup['ray_start']:.1f} s" if startup.get("ray_start") else ""
    return (f"start-up {startup['seconds']:.1f} s: checks {startup['checks']:.1f} s{ray}, pool "
            f"{startup['pool_start']:.1f} s, warm-up {startup['warmup']:.1f} s")


def eval_warning(t: Tally, e: _Eval, seconds: float) -> str | None:
    """After the first evaluated cohort: a line when the run's evaluations take half its time or more
    (and a minute or more)."""
    per_round = t.round_s()
    if per_round is None or not t.plan or t.warned:
        return None
    t.warned = True
    n = len(eval_rounds(t.start_round, t.rounds, t.plan["eval_every"]))
    evals = sum(n * (t.eval_cost(c, t.plan[c]) or 0.0) for c in ("seen", "unseen") if t.plan[c])
    if evals < 60.0 or evals < LARGE_EVAL_SHARE * (evals + per_round * (t.rounds - t.start_round)):
        return None
    hint = "set run.eval_clients to evaluate fewer clients per cohort" if t.plan["eval_clients"] <= 0 else \
        "lower run.eval_clients or raise run.eval_every"
    return (f"evaluation is slow: {e.clients} {e.cohort} clients took {clock(seconds)}; the run's {n} evaluation(s) "
            f"take about {clock(evals)} of its {clock(evals + per_round * (t.rounds - t.start_round))}; {hint}")


class Progress:
    """Feeds a Tally from the run's events; the views below draw it."""

    def __init__(self):
        self.t = Tally()
        self.startup: dict | None = None

    def __call__(self, event: dict) -> None:
        t, kind, now = self.t, event["type"], time.monotonic()
        if kind == "eval_plan":
            t.plan = event
        elif kind == "startup":
            self.startup = event
        elif kind == "start" and t.rounds:  # the server was restarted from a checkpoint
            t.done = t.start_round = event["start_round"]
            t.train_s = 0.0
        elif kind == "start":
            t.rounds, t.done = event["rounds"], event["start_round"]
            t.start_round = t.evaluated = event["start_round"]
            t.t0 = now
            self.started(event)
        elif kind in ("chunk", "eval_chunk"):
            t.chunk(event["clients"])
            if kind == "eval_chunk":
                self.eval_chunk(event)
        elif kind == "round":
            t.done, t.last = event["round"], event
            t.train_s += event["seconds"]
        elif kind == "eval_start":
            self.eval_end(now)
            t.eval = _Eval(event["round"], event["cohort"], event["clients"], max(1, event.get("phases", 1)), now)
            self.eval_started()
        elif kind == "eval":
            self.eval_end(now)
            t.evaluated, t.cohorts_done = event["round"], set()
            parts = [f"{s['cohort']} {100 * s['acc_mean']:.1f}%" for s in event["summary"]]
            t.acc = "acc " + " / ".join(parts)
        elif kind == "saved":
            self.saved(now)

    def eval_chunk(self, event: dict) -> None:
        e = self.t.eval
        if e is None:
            return
        if e.phase_name and event["phase"] != e.phase_name:  # the next phase: clients count again
            e.phase, e.done = e.phase + 1, 0
        e.phase_name = event["phase"]
        e.done += event["clients"]
        self.eval_progress()

    def eval_end(self, now: float) -> None:
        e = self.t.eval
        if e is None:
            return
        seconds = now - e.t0
        self.t.eval_s += seconds
        if e.clients:
            self.t.per_client[e.cohort] = seconds / e.clients
        if self.t.eval_round != e.round:
            self.t.eval_round, self.t.cohorts_done = e.round, set()
        self.t.cohorts_done.add(e.cohort)
        self.t.eval = None
        self.eval_finished(e, seconds)

    # What the views draw; each overrides what it shows.
    def started(self, event: dict) -> None: ...
    def eval_started(self) -> None: ...
    def eval_progress(self) -> None: ...
    def eval_finished(self, e: _Eval, seconds: float) -> None: ...
    def saved(self, now: float) -> None: ...
    def stop(self) -> None: ...


class PlainProgress(Progress):
    """One line per round and per evaluation step, for logs."""

    def __init__(self, stream=None):
        super().__init__()
        self.stream = stream or sys.stderr
        self.last_eval_line = 0.0

    def line(self, text: str) -> None:
        self.stream.write(text + "\n")
        self.stream.flush()

    def started(self, event: dict) -> None:
        self.line(start_line(event, self.t.plan))
        if self.startup:
            self.line(startup_line(self.startup))

    def eval_started(self) -> None:
        e = self.t.eval
        phases = f" ({e.phases} phases)" if e.phases > 1 else ""
        self.line(f"round {e.round} | evaluating {e.clients} {e.cohort} clients{phases}")
        self.last_eval_line = time.monotonic()

    def eval_progress(self) -> None:
        now = time.monotonic()
        if now - self.last_eval_line >= PLAIN_EVAL_EVERY_S:
            head, _, extras, tail = eval_parts(self.t, now)
            self.line(" | ".join([f"round {self.t.eval.round}", head, *extras, tail]))
            self.last_eval_line = now

    def eval_finished(self, e: _Eval, seconds: float) -> None:
        self.line(f"round {e.round} | evaluated {e.clients} {e.cohort} clients in {clock(seconds)} "
                  f"({seconds / max(e.clients, 1):.2f} s per client)")
        warning = eval_warning(self.t, e, seconds)
        if warning:
            self.line(warning)

    def saved(self, now: float) -> None:
        head, _, extras, tail = round_parts(self.t, now)
        elapsed, _, eta = tail.partition(" ETA ")
        self.line(" | ".join([head, *extras, f"elapsed {elapsed}", f"ETA {eta}"]))


class BarProgress(Progress):
    """A live bar (rich) on a terminal: the round's line and, during an evaluation, the evaluation's;
    each fitted to the terminal's width, elapsed and ETA never cut."""

    def __init__(self, console=None):
        super().__init__()
        from rich.console import Console
        from rich.live import Live
        from rich.text import Text

        self.console = console or Console(stderr=True)
        self.Text = Text
        self.live = Live(self, console=self.console, refresh_per_second=4, transient=False)
        self.running = False

    def __rich__(self):
        now = time.monotonic()
        width = max(20, self.console.width - 1)
        lines = [fit(*round_parts(self.t, now), width)] if self.t.rounds else []
        if self.t.eval is not None:
            lines.append(fit(*eval_parts(self.t, now), width))
        return self.Text("\n".join(lines))

    def started(self, event: dict) -> None:
        self.console.print(start_line(event, self.t.plan), highlight=False, soft_wrap=True)
        if self.startup:
            self.console.print(startup_line(self.startup), highlight=False, soft_wrap=True)
        self.live.start()
        self.running = True

    def eval_finished(self, e: _Eval, seconds: float) -> None:
        self.console.print(f"round {e.round}: evaluated {e.clients} {e.cohort} clients in {clock(seconds)}",
                           highlight=False)
        warning = eval_warning(self.t, e, seconds)
        if warning:
            self.console.print(warning, highlight=False, soft_wrap=True)

    def stop(self) -> None:
        if self.running:
            self.live.stop()
            self.running = False


def make(mode: str, stream=None) -> Progress | None:
    """The view for --progress MODE: "auto" is the bar on a terminal, plain lines elsewhere."""
    stream = stream or sys.stderr
    if mode == "none":
        return None
    if mode == "auto":
        mode = "bar" if stream.isatty() else "plain"
    return BarProgress() if mode == "bar" else PlainProgress(stream)
