"""simfed: a Ray-based simulation engine for personalized federated (meta-)learning.

The Python API, for notebooks and scripts (the `simfed` command is a thin layer over it):

    from simfed import launch, load_run
    run_dir = launch("examples/quickstart.toml", overrides=["run.rounds=2"])
    run = load_run(run_dir)
    run.metrics()   # polars DataFrame, one row per client, round and split

Names are resolved on first use, so `import simfed` costs neither Ray nor torch.
"""

from __future__ import annotations

from typing import Any

__all__ = ["launch", "load_run", "Run", "SimfedError"]


def __getattr__(name: str) -> Any:
    if name == "SimfedError":
        from simfed.core.errors import SimfedError

        return SimfedError
    if name == "launch":
        from simfed import runs

        return runs.launch
    if name in ("load_run", "Run"):
        from simfed import results

        return getattr(results, name)
    raise AttributeError(f"module 'simfed' has no attribute {name!r}")
