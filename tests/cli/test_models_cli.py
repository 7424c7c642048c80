"""`simfed models` and bad [model] input through `simfed launch`: one line on stderr, exit 2,
nothing written. The entry point runs in-process (tests/cli/inproc.py, the console script's code
path) except one case in a real process."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.cli.inproc import run

ROOT = Path(__file__).resolve().parents[2]
USER = "tests.engine.user_models"
BAD = {  # case: ([model] table, [algorithm] name, [engine] lines, needles of the one line)
    "does-not-import": ('name = "nowhere_pkg.models:net"', "fedavg", "",
                        ("module 'nowhere_pkg.models' does not import", "PYTHONPATH")),
    "factory-raises": (f'name = "{USER}:raises"', "fedavg", "", ("failed: RuntimeError: this factory always fails",)),
    "not-a-module": (f'name = "{USER}:not_a_module"', "fedavg", "", ("returned a str, not a torch.nn.Module",)),
    "wrong-output": (f'name = "{USER}:wrong_classes"', "fedavg", "", ("output (2, 11)", "10 classes")),
    "method-cannot-use": ('name = "resnet18"\nwidth = 2', "fedacnnl", "",
                          ("[model] resnet18 cannot be used by fedacnnl", "GroupNorm")),
    "unknown-key": ('name = "resnet18"\ndepth = 50', "fedavg", "", ("unknown key(s) depth", "valid keys: groups, width")),
    "vectorize-on": ('name = "charlstm"', "fedavg", 'vectorize = "on"',
                     ('[engine] vectorize = "on"', "LSTM (lstm) has no vmap batching rule", '"auto"')),
}


def write(tmp_path, store, model, algorithm, engine=""):
    exp = tmp_path / "exp.toml"
    exp.write_text(f'[data]\npath = "{store}"\n[run]\nrounds = 1\nclients_per_round = 3\n[model]\n{model}\n'
                   f'[algorithm]\nname = "{algorithm}"\n[engine]\nbackend = "serial"\n{engine}\n')
    return exp


def assert_one_line(code, err, needles):
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err
    assert all(n in lines[0] for n in needles), lines[0]


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_model_is_one_line_exit_2(cifar_store, shakespeare_store, tmp_path, case):
    model, algorithm, engine, needles = BAD[case]
    store = shakespeare_store if "charlstm" in model else cifar_store
    out = tmp_path / "run"
    res = run("launch", write(tmp_path, store, model, algorithm, engine), "--out", out)
    assert_one_line(res.returncode, res.stderr, needles)
    assert not out.exists()


def test_bad_model_in_a_real_process(cifar_store, tmp_path):
    model, algorithm, _, needles = BAD["factory-raises"]
    proc = subprocess.run([sys.executable, "-m", "simfed.cli.main", "launch", str(write(tmp_path, cifar_store, model,
                                                                                          algorithm)),
                           "--out", str(tmp_path / "run")], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert_one_line(proc.returncode, proc.stderr, needles)
    assert not (tmp_path / "run").exists()


def test_models_lists_keys_and_counts_parameters_for_a_store(cifar_store):
    res = run("models")
    assert res.returncode == 0
    for name in ("lenet", "resnet18", "mlp", "charlstm"):
        assert any(line.startswith(name) for line in res.stdout.splitlines())
    assert "keys: width = 64, groups = 2" in res.stdout
    res = run("models", "resnet18", "--store", cifar_store, "--json")
    info = json.loads(res.stdout)
    assert res.returncode == 0 and info["parameters"] == 11_173_962 and info["keys"] == {"width": 64, "groups": 2}
    res = run("models", "charlstm", "--store", cifar_store, "--json")
    assert json.loads(res.stdout)["parameters"] is None  # images: it cannot take them, and says why
    res = run("models", f"{USER}:small_cnn", "--store", cifar_store)
    assert res.returncode == 0 and "58,186 parameters" in res.stdout
    res = run("models", "nowhere_pkg:f")
    assert_one_line(res.returncode, res.stderr, ("module 'nowhere_pkg' does not import",))
