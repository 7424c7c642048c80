"""The experiment a CLI command reads: a TOML file, or the embedded quickstart when none is given."""

from __future__ import annotations

import tomllib
from importlib import resources
from typing import Any

from simfed.core.config import load_toml


def quickstart_text() -> str:
    return resources.files("simfed.cli").joinpath("quickstart.toml").read_text()


def load(path: str | None) -> dict[str, Any]:
    """The experiment file at `path` as a dict; the quickstart for None."""
    return tomllib.loads(quickstart_text()) if path is None else load_toml(path)
