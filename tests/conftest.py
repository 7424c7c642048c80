"""Shared fixtures. Ray tests use the one session-scoped `ray_session` (2 CPUs, no dashboard)."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("RAY_DEDUP_LOGS", "0")
os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")


@pytest.fixture(scope="session")
def engine_store(tmp_path_factory):
    """24 synthetic-FEMNIST clients (21 seen, 3 unseen) for engine and CLI tests."""
    from simfed.partitions.synthetic import make_synthetic_femnist

    return make_synthetic_femnist(str(tmp_path_factory.mktemp("engine") / "store"), clients=24, seed=3)


@pytest.fixture(scope="session")
def ray_session():
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def tiny_store(tmp_path_factory):
    """A synthetic-FEMNIST partition store with 24 writers (~5k samples); returns its path."""
    from simfed.partitions.synthetic import make_synthetic_femnist

    return make_synthetic_femnist(str(tmp_path_factory.mktemp("stores") / "tiny"), clients=24,
                                  seed=0)
