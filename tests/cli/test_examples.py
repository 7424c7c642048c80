"""Every experiment file in examples/ parses into a typed experiment with a registered method."""

from pathlib import Path

import pytest

from simfed.algorithms import registry
from simfed import runs
from simfed.core.config import load_toml
from simfed.engine.config import parse

EXAMPLES = sorted((Path(__file__).resolve().parents[2] / "examples").glob("*.toml"))


def _sweep(path) -> bool:
    return "sweep" in load_toml(str(path))


def test_there_are_examples_for_every_method():
    names = {load_toml(str(p))["algorithm"]["name"] for p in EXAMPLES if not _sweep(p)}
    assert set(registry.names()) - {n for n in registry.names() if n.startswith("test-")} <= names


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_example_parses(path):
    if _sweep(path):
        from simfed.sweeps.config import parse_sweep

        exps = [t.experiment for t in parse_sweep(load_toml(str(path)), str(path)).trials]
    else:
        exps = [parse(load_toml(str(path)), str(path))]
    for exp in exps:
        assert exp.run.rounds >= 1 and exp.data.path
        assert exp.algorithm in registry.names()


def test_table1_sweeps_every_method_over_three_seeds():
    from simfed.sweeps.config import parse_sweep

    path = EXAMPLES[0].parent / "table1_fmnist.toml"
    trials = parse_sweep(load_toml(str(path)), str(path)).trials
    methods = {n for n in registry.names() if not n.startswith("test-")}
    assert {t.experiment.algorithm for t in trials} == methods
    for m in methods:
        mine = [t for t in trials if t.experiment.algorithm == m]
        configs = {tuple(sorted((k, v) for k, v in t.overrides.items() if k != "run.seed")) for t in mine}
        assert len(configs) >= 2, m  # a grid to choose from on validation
        assert len(mine) == 3 * len(configs)  # every configuration on seeds 0, 1, 2
        assert {t.experiment.run.seed for t in mine} == {0, 1, 2}


def test_quickstart_is_the_embedded_default():
    quick = Path(__file__).resolve().parents[2] / "examples" / "quickstart.toml"
    assert quick.read_text() == runs.quickstart_text()
