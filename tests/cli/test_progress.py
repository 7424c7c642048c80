"""`simfed launch` progress views fed synthetic events: plain lines, the fitted bar, client counting
in multi-phase evaluations, the ETA from round 1, and the keys other features add to a round event
(virtual_time, epsilon) shown when present. Milliseconds each; the real CLI's plain output is checked
in test_report_cli (in-process) and test_workflow_cli (a subprocess)."""

from __future__ import annotations

import io

import pytest

from simfed.cli import progress as views

START = {"type": "start", "start_round": 0, "rounds": 10, "workers": [{"node_id": "n"}], "seen": 8, "unseen": 2,
         "clients_per_round": 4}
PLAN = {"type": "eval_plan", "seen": 8, "unseen": 2, "seen_total": 8, "unseen_total": 2, "eval_every": 5,
        "eval_clients": 0, "rounds": 10, "clients_per_round": 4}


def feed(view, *events):
    for e in events:
        view(e)
    return view


def round_event(r, **extra):
    return {"type": "round", "round": r, "seconds": 2.0, "stats": {}, "clients": 4, "train_loss": 1.5, **extra}


def test_plain_has_one_line_per_round_with_loss_rate_eta_and_optional_keys():
    out = io.StringIO()
    v = feed(views.PlainProgress(out), PLAN, START, round_event(1), {"type": "saved", "round": 1},
             round_event(2, virtual_time=3725.0, epsilon=1.25), {"type": "saved", "round": 2})
    lines = out.getvalue().splitlines()
    assert lines[0].startswith("1 worker(s) on 1 node(s); 8 seen / 2 unseen clients, 4 per round")
    assert "covers 8 seen + 2 unseen clients" in lines[0]
    r1, r2 = lines[1].split(" | "), lines[2].split(" | ")
    assert r1[:3] == ["round 1/10", "2.0 clients/s", "loss 1.5000"]
    assert r1[-1].startswith("ETA ") and r1[-1] != "ETA -:--:--"  # known from round 1
    assert "virtual 1:02:05" in r2 and "epsilon 1.25" in r2
    assert not any("virtual" in p or "epsilon" in p for p in r1)  # absent keys: nothing shown
    assert v.t.round_s() == 2.0


def test_eta_counts_the_evaluations_left_at_their_measured_pace():
    t = feed(views.Progress(), PLAN, START, round_event(1)).t
    # 9 rounds of 2 s, plus 2 evaluations (rounds 5, 10) of 10 clients at training's 0.5 s per client.
    assert t.eta(0.0) == pytest.approx(9 * 2.0 + 2 * 10 * 0.5)
    t.per_client = {"seen": 2.0, "unseen": 1.0}  # measured: slower than training
    assert t.eta(0.0) == pytest.approx(9 * 2.0 + 2 * (8 * 2.0 + 2 * 1.0))


def test_multi_phase_evaluation_counts_clients_per_phase():
    v = feed(views.Progress(), PLAN, START, round_event(1),
             {"type": "eval_start", "round": 1, "cohort": "unseen", "clients": 180, "phases": 2})
    v({"type": "eval_chunk", "round": 1, "cohort": "unseen", "phase": "describe", "clients": 180})
    e = v.t.eval
    assert (e.phase, e.done, e.clients) == (1, 180, 180)
    v({"type": "eval_chunk", "round": 1, "cohort": "unseen", "phase": "eval", "clients": 60})
    assert (e.phase, e.done) == (2, 60)
    head = views.eval_parts(v.t, 0.0)[0]
    assert head == "eval unseen 60/180 phase 2/2"  # clients, never client-phases (not 240/360)


@pytest.mark.parametrize("width", [40, 60, 80, 120])
def test_fitted_line_never_cuts_elapsed_and_eta(width):
    t = feed(views.Progress(), PLAN, START, round_event(3, virtual_time=10.0, epsilon=2.0),
             {"type": "eval", "round": 3, "summary": [{"cohort": "seen", "acc_mean": 0.831},
                                                       {"cohort": "unseen", "acc_mean": 0.802}]}).t
    line = views.fit(*views.round_parts(t, t.t0 + 83.0), width)
    assert len(line) <= width
    assert line.endswith("0:01:23 ETA " + views.clock(t.eta(t.t0 + 83.0)))
    assert line.startswith("round 3/10")
    if width >= 120:
        assert "acc seen 83.1% / unseen 80.2%" in line and "━" in line


def test_bar_renders_on_a_narrow_terminal():
    from rich.console import Console

    buf = io.StringIO()
    bar = views.BarProgress(Console(file=buf, force_terminal=True, width=60))
    feed(bar, PLAN, START, round_event(1), {"type": "eval_start", "round": 1, "cohort": "seen", "clients": 8,
                                            "phases": 1},
         {"type": "eval_chunk", "round": 1, "cohort": "seen", "phase": "eval", "clients": 4})
    bar.live.refresh()
    bar.stop()
    text = buf.getvalue()
    assert "round 1/10" in text and "eval seen 4/8" in text and "ETA" in text and "…" not in text


def test_slow_evaluation_is_said_once_with_eval_clients():
    out = io.StringIO()
    v = feed(views.PlainProgress(out), {**PLAN, "eval_every": 1}, START, round_event(1),
             {"type": "eval_start", "round": 1, "cohort": "seen", "clients": 8, "phases": 1})
    v.t.eval.t0 -= 400.0  # the evaluation took 400 s: far more than the 2 s rounds
    v({"type": "eval_start", "round": 1, "cohort": "unseen", "clients": 2, "phases": 1})
    v({"type": "eval", "round": 1, "summary": []})
    warnings = [ln for ln in out.getvalue().splitlines() if ln.startswith("evaluation is slow")]
    assert len(warnings) == 1 and "run.eval_clients" in warnings[0]


def test_auto_mode_is_plain_when_stderr_is_not_a_terminal():
    assert isinstance(views.make("auto", io.StringIO()), views.PlainProgress)
    assert views.make("none", io.StringIO()) is None
