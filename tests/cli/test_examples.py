"""Every experiment file in examples/ parses into a typed experiment with a registered method."""

from pathlib import Path

import pytest

from simfed.algorithms import registry
from simfed.cli import config as cfgio

EXAMPLES = sorted((Path(__file__).resolve().parents[2] / "examples").glob("*.toml"))


def test_there_are_examples_for_every_method():
    names = {cfgio.load_toml(str(p))["algorithm"]["name"] for p in EXAMPLES}
    assert set(registry.names()) - {n for n in registry.names() if n.startswith("test-")} <= names


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_example_parses(path):
    exp = cfgio.parse(cfgio.load_toml(str(path)), str(path))
    assert exp.run.rounds >= 1 and exp.data.path
    assert exp.algorithm in registry.names()


def test_quickstart_is_the_embedded_default():
    quick = Path(__file__).resolve().parents[2] / "examples" / "quickstart.toml"
    assert quick.read_text() == cfgio.quickstart_text()
