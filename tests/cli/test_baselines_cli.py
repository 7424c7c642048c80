"""Bad input to the Table-1 baselines through `simfed launch`: one line on stderr, exit 2, nothing written.

The CLI's `main` runs in-process (the console script calls the same function), which spares a
Python start-up per case; tests/cli/test_launch_cli.py covers the real-process path.
"""

from __future__ import annotations

import sys

import pytest

from simfed.cli.main import main

CASES = {
    "fedrep-head": ('name = "fedrep"\nhead_layers = 4', ("fedrep", "no separable head of 4 linear", "head_layers")),
    "knnper-k": ('name = "knnper"\nks = [5, 100000]', ("k = 100000", "exceeds the", "the smallest", "strict_k")),
    "ditto-lam": ('name = "ditto"\nlam = -1.0', ("lam must be >= 0",)),
    "pfedme-lam": ('name = "pfedme"\nlam = -15', ("lam must be >= 0",)),
    "knnper-lam": ('name = "knnper"\nlambdas = [-0.5, 0.5]', ("lambdas", "[0, 1]")),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_baseline_bad_input_is_one_line_exit_2(engine_store, tmp_path, monkeypatch, capsys, case):
    algorithm, needles = CASES[case]
    exp = tmp_path / "exp.toml"
    exp.write_text(f'[data]\npath = "{engine_store}"\n[run]\nrounds = 1\nclients_per_round = 3\n'
                   f'[algorithm]\n{algorithm}\n[engine]\nbackend = "serial"\n')
    out = tmp_path / "run"
    monkeypatch.setattr(sys, "argv", ["simfed", "launch", str(exp), "--out", str(out)])
    with pytest.raises(SystemExit) as exc:
        main()
    err = capsys.readouterr().err.strip().splitlines()
    assert exc.value.code == 2 and len(err) == 1, err
    assert "Traceback" not in err[0] and all(n in err[0] for n in needles), err[0]
    assert not out.exists()  # stopped before the run directory exists
