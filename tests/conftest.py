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


@pytest.fixture(scope="session")
def s3_server():
    """A real S3-protocol server (moto's server mode) on a free loopback port, with bucket "simfed".
    Yields a function mapping a key prefix to a pyarrow.fs URI (credentials in the URI, so Ray
    workers started before this fixture reach it too)."""
    import logging
    import socket

    pytest.importorskip("moto.server", reason="moto[server] is in the test extra")
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()

    def uri(key: str) -> str:
        return (f"s3://testing:testing@simfed/{key}?endpoint_override=127.0.0.1:{port}&scheme=http"
                "&region=us-east-1")

    import pyarrow.fs as pafs

    fs, _ = pafs.FileSystem.from_uri(uri("x") + "&allow_bucket_creation=true")
    fs.create_dir("simfed")
    yield uri
    server.stop()


@pytest.fixture(scope="session")
def s3_store(engine_store, s3_server):
    """engine_store uploaded to the S3 server; its URI."""
    from pathlib import Path

    import pyarrow.fs as pafs

    uri = s3_server("store")
    fs, inner = pafs.FileSystem.from_uri(uri)
    for path in sorted(Path(engine_store).iterdir()):
        with fs.open_output_stream(f"{inner}/{path.name}") as f:
            f.write(path.read_bytes())
    return uri


@pytest.fixture(scope="session")
def cifar_store(tmp_path_factory):
    """A CIFAR-10-layout store (32x32x3, from a generated archive): 12 clients of 2 classes each,
    10 seen and 2 unseen, ~30 images per client."""
    from simfed.partitions.cifar import import_cifar
    from simfed.partitions.samples import cifar10_contents, write_cifar

    d = tmp_path_factory.mktemp("cifar")
    src = write_cifar(d / "cifar-10-python.tar.gz", cifar10_contents(per_batch=60, test=60))
    return import_cifar(src, str(d / "store"), scheme="classes", classes_per_client=2, clients=12, seed=0)


@pytest.fixture(scope="session")
def shakespeare_store(tmp_path_factory):
    """A LEAF-Shakespeare-layout store: 8 roles (7 seen, 1 unseen), 80-character token rows."""
    from simfed.partitions.samples import shakespeare_json, write_shakespeare
    from simfed.partitions.shakespeare import import_shakespeare

    d = tmp_path_factory.mktemp("shakespeare")
    return import_shakespeare(write_shakespeare(d / "leaf", shakespeare_json(roles=8)), str(d / "store"))


@pytest.fixture(scope="session")
def features_store(tmp_path_factory):
    """An arrays store of float32 feature vectors (16 features, 4 classes), 6 natural clients."""
    from simfed.partitions.arrays import import_arrays
    from simfed.partitions.samples import arrays_sample, write_npz

    d = tmp_path_factory.mktemp("features")
    return import_arrays(write_npz(d / "features.npz", arrays_sample("features")), str(d / "store"))
