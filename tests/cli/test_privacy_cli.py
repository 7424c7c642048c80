"""[privacy] through the real `simfed` entry point (in-process): a private run's epsilon in the progress
output, status.json and `simfed metrics`, its sampling in the resolved config; and bad input as one
line with exit code 2, nothing written."""

from __future__ import annotations

import json
import tomllib

import pytest

from tests.cli import inproc

EXPERIMENT = """
[data]
path = "{store}"
[run]
rounds = 2
clients_per_round = 5
eval_every = 2
[algorithm]
name = "{method}"
local_steps = 2
[engine]
backend = "serial"
[privacy]
{privacy}
"""


def write(tmp_path, store, method="fedavg", privacy="noise_multiplier = 1.0", extra=""):
    path = tmp_path / "exp.toml"
    text = EXPERIMENT.format(store=store, method=method, privacy=privacy)
    path.write_text(text.replace("local_steps = 2", "local_steps = 2\n" + extra))
    return path


def test_private_run_reports_epsilon_everywhere(engine_store, tmp_path):
    out = tmp_path / "run"
    r = inproc.run("launch", write(tmp_path, engine_store, privacy="target_epsilon = 5.0"), "--out", out)
    assert r.returncode == 0, r.stderr
    assert "privacy: central DP" in r.stderr and "| epsilon " in r.stderr  # the start line and the round lines
    saved = tomllib.loads((out / "config.toml").read_text())
    assert saved["privacy"]["sampling"] == "poisson" and saved["privacy"]["target_epsilon"] == 5.0
    status = json.loads((out / "status.json").read_text())
    assert 0 < status["epsilon"] <= 5.0 and status["privacy"]["noise_multiplier"] > 0
    m = inproc.run("metrics", out)
    assert m.returncode == 0 and f"privacy: epsilon {status['epsilon']:.4g} at delta 1e-05 after 2 rounds" in m.stdout
    js = json.loads(inproc.run("metrics", out, "--json").stdout)
    assert js["privacy"]["epsilon"] == status["epsilon"] and js["privacy"]["after_round"] == 2
    curve = inproc.run("metrics", out, "--curve").stdout
    assert "epsilon" in curve.splitlines()[-3]  # the training table's header gains the column


CASES = {
    "clip": (dict(privacy="noise_multiplier = 1.0\nclip = 0.0"), ["[privacy] clip = 0", "(0,"]),
    "noise": (dict(privacy="noise_multiplier = -0.5"), ["[privacy] noise_multiplier = -0.5", "[0,"]),
    "delta0": (dict(privacy="noise_multiplier = 1.0\ndelta = 0.0"), ["[privacy] delta = 0", "(0, 1)"]),
    "delta1": (dict(privacy="noise_multiplier = 1.0\ndelta = 1.0"), ["[privacy] delta = 1", "(0, 1)"]),
    "both": (dict(privacy="noise_multiplier = 1.0\ntarget_epsilon = 2.0"), ["exactly one of noise_multiplier"]),
    "unreachable": (dict(privacy="target_epsilon = 0.001"), ["target_epsilon = 0.001", "no noise_multiplier",
                                                              "2 rounds"]),
    "refused": (dict(method="pfedhn"), ["[privacy] with pfedhn", "per-client embedding"]),
    "pefll_norm": (dict(method="pefll"), ["descriptor_norm = \"first\"", "\"public\""]),
    "pefll_local": (dict(method="pefll", privacy="noise_multiplier = 1.0\nmode = \"local\"",
                         extra='descriptor_norm = "public"'), ["mode = \"local\" with pefll"]),
    "cohort": (dict(privacy="noise_multiplier = 1.0\nnoise_cohort_size = 2"), ["noise_cohort_size = 2",
                                                                                "clients_per_round = 5"]),
    "count_budget": (dict(privacy="noise_multiplier = 2.0\ntarget_quantile = 0.5\nclip_count_stddev = 0.5"),
                     ["clip_count_stddev = 0.5", "no noise budget", "must exceed 1"]),
    "fixed_pld": (dict(privacy="noise_multiplier = 1.0\nsampling = \"fixed\"\naccountant = \"pld\""),
                  ["sampling = \"fixed\" needs accountant = \"rdp\""]),
    "local_adaptive": (dict(privacy="noise_multiplier = 1.0\nmode = \"local\"\ntarget_quantile = 0.5"),
                       ["target_quantile", "mode = \"central\""]),
    "local_cohort": (dict(privacy="noise_multiplier = 1.0\nmode = \"local\"\nnoise_cohort_size = 100"),
                     ["noise_cohort_size", "local DP"]),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_privacy_input_is_one_line_exit_2(engine_store, tmp_path, case):
    kwargs, needles = CASES[case]
    out = tmp_path / "run"
    r = inproc.run("launch", write(tmp_path, engine_store, **kwargs), "--out", out, "-q")
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    assert not out.exists()  # refused before anything was written


def test_a_sweep_grids_privacy_keys():
    """`privacy.KEY` can be swept like any key: each trial gets its own [privacy] table."""
    from simfed.sweeps.config import parse_sweep

    doc = tomllib.loads(EXPERIMENT.format(store="data/x", method="fedavg", privacy="delta = 1e-5")
                        + '[sweep.grid]\n"privacy.target_epsilon" = [1.0, 3.0, 8.0]\n')
    sweep = parse_sweep(doc, "sweep.toml")
    assert sorted(t.experiment.privacy.target_epsilon for t in sweep.trials) == [1.0, 3.0, 8.0]
    with pytest.raises(Exception, match="valid \\[privacy\\] keys"):
        parse_sweep({**doc, "sweep": {"grid": {"privacy.epsilon": [1.0]}}}, "sweep.toml")
