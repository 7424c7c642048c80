"""A researcher's first hour, through the real entry point (in-process, tests/cli/inproc.py): learning
curves and plots, readable runs, method switching, bad option values, resume messages, progress."""

from __future__ import annotations

import base64
import io
import json
import re
import shutil
import sys

import polars as pl
import pytest
import torch

from simfed.core.config import apply_overrides, load_toml
from simfed.engine.config import parse
from simfed.engine import checkpoint, metrics
from tests.cli.inproc import run
from tests.cli.test_launch_cli import assert_user_error

EXP = """
[data]
path = "{store}"
[run]
rounds = 4
clients_per_round = 4
eval_every = 2
checkpoint_every = 2
[algorithm]
name = "fedavg"
lr = 0.05
local_steps = 3
[engine]
backend = "serial"
"""


@pytest.fixture(scope="module")
def run_dir(engine_store, tmp_path_factory):
    root = tmp_path_factory.mktemp("report")
    exp = root / "exp.toml"
    exp.write_text(EXP.format(store=engine_store))
    r = run("launch", exp, "--out", root / "run")
    assert r.returncode == 0, r.stderr
    # Non-terminal stderr: plain lines, one per round, and each evaluation says what it evaluates.
    lines = r.stderr.splitlines()
    assert [ln.split(" | ")[0] for ln in lines if re.match(r"round \d+/4 \|", ln)] == [f"round {i}/4" for i in (1, 2, 3, 4)]
    assert "round 2 | evaluating 22 seen clients" in lines and "round 4 | evaluating 2 unseen clients" in lines
    return root / "run"


def test_train_rows_carry_the_clients_mean_training_loss(run_dir):
    train = metrics.load(run_dir).filter(pl.col("split") == "train")
    assert train.height == 16 and train["loss"].null_count() == 0
    assert ((train["loss"] > 0) & train["loss"].is_finite()).all()


def test_curve_table_text_and_json(run_dir):
    r = run("metrics", run_dir, "--curve")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0].split() == ["round", "split", "cohort", "clients", "acc_mean", "acc_p10", "acc_weighted",
                                "loss_mean"]
    assert [ln.split()[:3] for ln in lines[1:5]] == [["2", "test", "seen"], ["2", "test", "unseen"],
                                                     ["4", "test", "seen"], ["4", "test", "unseen"]]
    assert any(ln.split() == ["round", "clients", "train_loss", "dropped"] for ln in lines)
    data = json.loads(run("metrics", run_dir, "--curve", "--json").stdout)
    df = metrics.load(run_dir)
    rows = df.filter((pl.col("split") == "test") & (pl.col("round") == 4) & (pl.col("cohort") == "seen"))
    got = next(e for e in data["eval"] if (e["round"], e["split"], e["cohort"]) == (4, "test", "seen"))
    assert got["clients"] == rows.height == 22
    assert got["acc_mean"] == pytest.approx(rows["accuracy"].mean(), abs=1e-12)
    assert got["loss_mean"] == pytest.approx(rows["loss"].mean(), abs=1e-12)
    tr = df.filter((pl.col("split") == "train") & (pl.col("round") == 3))
    assert [t["round"] for t in data["train"]] == [1, 2, 3, 4]
    assert data["train"][2]["loss_mean"] == pytest.approx(tr["loss"].mean(), abs=1e-12)


@pytest.mark.parametrize("args, needles", [
    (["--split", "TEST"], ["--split", "'TEST' is not one of 'test', 'val'"]),
    (["--split", "train"], ["--split", "'train' is not one of"]),
    (["--round", "99"], ["--round 99", "evaluated rounds: 2, 4"]),
    (["--round", "x"], ["--round", "integer"]),
    (["--json", "true"], ["unexpected extra argument", "true"]),
])
def test_bad_metrics_option_values_are_one_line(run_dir, args, needles):
    assert_user_error(run("metrics", run_dir, *args), *needles)


def test_round_option_limits_the_train_totals(run_dir):
    r = run("metrics", run_dir, "--round", "2")
    assert r.returncode == 0, r.stderr
    assert f"{run_dir} (finished): round 2, split test (evaluated rounds: 2, 4)" in r.stdout
    assert "train rounds 1-2: 8 client updates" in r.stdout
    assert json.loads(run("metrics", run_dir, "--round", "2", "--json").stdout)["train"]["client_updates"] == 8


@pytest.mark.parametrize("cmd", [["launch"], ["metrics"], ["plot"], ["algorithms"], ["info"],
                                 ["partition", "leaf"], ["partition", "hf-femnist"], ["partition", "tff-h5"]])
def test_help_shows_boolean_flags_as_flags(cmd):
    r = run(*cmd, "--help")
    assert r.returncode == 0 and "Usage: simfed" in r.stdout
    assert "<bool>" not in r.stdout
    if cmd == ["metrics"]:
        assert re.search(r"^\s+--json\s+Print JSON", r.stdout, re.M)


def _png_shape(data: bytes):
    from matplotlib import pyplot as plt

    return plt.imread(io.BytesIO(data), format="png").shape


def test_plot_png_and_html_report(run_dir, tmp_path):
    pytest.importorskip("matplotlib")
    r = run("plot", run_dir)
    assert r.returncode == 0, r.stderr
    png = (run_dir / "curves.png").read_bytes()
    assert r.stdout.strip() == str(run_dir / "curves.png") and len(png) > 20_000
    assert _png_shape(png)[:2] == (800, 1200)
    r = run("plot", run_dir, "--out", tmp_path / "report.html")
    assert r.returncode == 0, r.stderr
    page = (tmp_path / "report.html").read_text()
    img = re.search(r"src='data:image/png;base64,([^']+)'", page).group(1)
    assert _png_shape(base64.b64decode(img))[:2] == (800, 1200)
    data = json.loads(re.search(r"<script type='application/json' id='simfed-data'>(.*?)</script>", page,
                                re.S).group(1))
    (series,) = data["series"]
    curve = metrics.curve(metrics.load(run_dir)).filter(pl.col("split") == "test")
    assert len(series["eval"]) == curve.height == 4
    for e in series["eval"]:
        want = curve.filter((pl.col("round") == e["round"]) & (pl.col("cohort") == e["cohort"])).row(0, named=True)
        assert e["acc_mean"] == want["acc_mean"] and e["acc_p10"] == want["acc_p10"]
    last = metrics.load(run_dir).filter((pl.col("split") == "test") & (pl.col("round") == 4))
    assert series["last_accuracy"]["seen"] == sorted(last.filter(pl.col("cohort") == "seen")["accuracy"].to_list())
    assert [t["round"] for t in series["train"]] == [1, 2, 3, 4]


def test_plot_a_sweep_directory(run_dir, tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    from simfed import plots

    sweep = tmp_path / "sweep"
    shutil.copytree(run_dir, sweep / "trial-a")
    shutil.copytree(run_dir, sweep / "trials" / "b")
    r = run("plot", sweep, "--out", sweep / "all.html")
    assert r.returncode == 0, r.stderr
    page = (sweep / "all.html").read_text()
    data = json.loads(re.search(r"id='simfed-data'>(.*?)</script>", page, re.S).group(1))
    assert [s["label"] for s in data["series"]] == ["trial-a (fedavg)", "trials/b (fedavg)"]
    monkeypatch.setattr(plots, "MAX_SERIES", 1)  # beyond the limit, runs of one method become one series
    assert run("plot", sweep, "--out", sweep / "one.html").returncode == 0
    data = json.loads(re.search(r"id='simfed-data'>(.*?)</script>", (sweep / "one.html").read_text(),
                                re.S).group(1))
    (s,) = data["series"]
    assert s["label"] == "fedavg (2 runs)" and len(s["runs"]) == 2
    assert len(s["last_accuracy"]["seen"]) == 44
    assert run("plot", sweep).returncode == 0 and _png_shape((sweep / "curves.png").read_bytes())[:2] == (800, 1200)


def test_plot_bad_input(run_dir, tmp_path, monkeypatch):
    assert_user_error(run("plot", run_dir, "--out", tmp_path / "x.pdf"), ".png or .html")
    assert_user_error(run("plot", tmp_path / "absent"), "no such directory")
    (tmp_path / "empty").mkdir()
    assert_user_error(run("plot", tmp_path / "empty"), "neither a run directory")
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if the optional extra were not installed
    assert_user_error(run("plot", run_dir, "--out", tmp_path / "y.png"), "pip install 'simfed[plot]'")
    assert not (tmp_path / "y.png").exists()


def test_resume_of_a_finished_run_says_so_without_starting_ray(run_dir, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    cfg = json.loads((copy / "config.json").read_text())
    cfg["engine"].update(backend="ray", address="127.0.0.1:1")  # Ray here would fail: nothing listens
    cfg["data"]["path"] = str(tmp_path / "moved")  # nor is the data needed to say the run is finished
    (copy / "config.json").write_text(json.dumps(cfg))
    r = run("launch", "--resume", copy)
    assert r.returncode == 0, r.stderr
    assert r.stderr.splitlines() == [f"simfed: {copy} already finished (4 of 4 rounds); nothing to resume. "
                                     f"See `simfed metrics {copy}` or `simfed plot {copy}`"]
    assert r.stdout.splitlines()[0] == str(copy) and "acc_mean" in r.stdout


def test_resume_says_where_it_restarts(run_dir, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    cfg = json.loads((copy / "config.json").read_text())
    cfg["run"]["rounds"] = 5
    (copy / "config.json").write_text(json.dumps(cfg))
    r = run("launch", "--resume", copy)
    assert r.returncode == 0, r.stderr
    assert f"simfed: resuming {copy} from its checkpoint after round 4: rounds 5-5 of 5 remain\n" in r.stderr
    assert metrics.eval_rounds(metrics.load(copy)) == [2, 4, 5]


def test_switching_method_drops_the_files_keys_and_says_so(engine_store, tmp_path):
    exp = tmp_path / "exp.toml"
    exp.write_text(EXP.format(store=engine_store).replace("rounds = 4", "rounds = 1"))
    # metafl accepts neither lr nor local_steps: no error about keys the user never typed.
    r = run("launch", exp, "--set", "algorithm.name=metafl", "--set", "run.clients_per_round=500",
            "--out", tmp_path / "x")
    assert r.returncode == 2
    note, error = r.stderr.splitlines()
    assert note == ("simfed: note: --set algorithm.name=metafl: dropped the file's fedavg settings (local_steps, lr); "
                    "metafl uses its own defaults (`simfed algorithms metafl`), change one with "
                    "--set algorithm.KEY=VALUE")
    assert "clients_per_round = 500" in error and "unknown key" not in error
    # local accepts both keys, but they were chosen for fedavg: local runs with its own defaults,
    # plus what was given with --set (the resolved config is what launch saves as config.json).
    sets = ["algorithm.name=local", "algorithm.lr=0.1"]
    r = run("launch", exp, *(a for s in sets for a in ("--set", s)), "--set", "run.clients_per_round=500")
    assert "simfed: note: --set algorithm.name=local: dropped the file's fedavg settings (local_steps);" in r.stderr
    resolved = parse(apply_overrides(load_toml(str(exp)), sets))
    assert resolved.algorithm == "local" and resolved.algorithm_config.lr == 0.1
    assert resolved.algorithm_config.local_steps == 20  # local's default, not the file's 3 for fedavg


def test_algorithms_show_keys_and_one_method_in_detail():
    r = run("algorithms")
    assert r.returncode == 0
    assert re.search(r"^pefll .*\n\s+embed_dim=0, hidden=100, .*local_steps=50, batch_size=32, lr=0.002", r.stdout,
                     re.M)
    r = run("algorithms", "pefll")
    assert r.returncode == 0
    assert "PeFLL: personalized federated learning by learning to learn" in r.stdout
    assert re.search(r"^\s+local_steps\s+= 50$", r.stdout, re.M) and re.search(r"^\s+lr\s+= 0.002$", r.stdout, re.M)
    assert re.search(r"^\s+local_epochs\s+= 0.0$", run("algorithms", "fedavg").stdout, re.M)
    info = json.loads(run("algorithms", "fedavg", "--json").stdout)
    assert info["config"]["momentum"] == 0.9 and info["keys"]["lr"]["type"] == "float"
    assert_user_error(run("algorithms", "nope"), "unknown algorithm 'nope'", "fedavg")


def test_key_comments_document_keys():
    from dataclasses import dataclass

    from simfed.cli.report_cmd import _key_comments

    @dataclass(frozen=True)
    class Cfg:
        lr: float = 0.1  # step size
        steps: int = 3

    assert _key_comments(Cfg) == {"lr": "step size"}


def test_final_checkpoint_keeps_the_model_not_the_optimizer(engine_store, tmp_path):
    from simfed.engine.loop import run_experiment
    from tests.engine.conftest import make_exp

    saved = {}

    def on_event(e):
        if e["type"] == "checkpoint":
            saved[e["round"]] = checkpoint.load(tmp_path / "r")

    exp = make_exp(engine_store, "pfedhn", rounds=2, clients_per_round=3, eval_every=0, checkpoint_every=1,
                   local_steps=2, hidden=8, unseen_exchanges=1)
    run_experiment(exp, tmp_path / "r", on_event=on_event)
    mid, final = saved[1], saved[2]
    assert "opt" in mid["server"] and not mid["final"]  # a run that goes on needs its optimizer state
    assert "opt" not in final["server"] and final["final"]
    assert set(mid["server"]) - set(final["server"]) == {"opt"}

    def size(obj) -> int:
        buf = io.BytesIO()
        torch.save(obj, buf)
        return buf.tell()

    # pFedHN's server SGD keeps one momentum buffer per hypernetwork weight: about half the bytes go.
    assert size(final) < 0.6 * size(mid)
