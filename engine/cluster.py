"""Connecting to Ray: embedded on this machine by default, or joining a running cluster."""

from __future__ import annotations

import os

from simfed.engine.errors import SimfedError


def _probe(address: str, timeout: float | None = None) -> None:
    """Fail in seconds on an address where no Ray GCS answers (Ray itself retries for minutes)."""
    from simfed.engine import probe, validate

    probe.ray_gcs(validate.address("--address", address), timeout)


def connect(address: str = "", num_cpus: int | None = None) -> bool:
    """Start or join Ray unless already connected; returns True when this call started it."""
    import ray

    if ray.is_initialized():
        return False
    os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
    kwargs = dict(include_dashboard=False, log_to_driver=False, configure_logging=True, logging_level="ERROR")
    if address and address != "auto":
        _probe(address)
    try:
        if address:
            ray.init(address=address, **kwargs)
        else:
            # Embedded: everything on the loopback interface, no dashboard.
            # address="local" always starts a new instance, even if another Ray runs on this machine.
            ray.init(address="local", num_cpus=num_cpus, _node_ip_address="127.0.0.1", **kwargs)
    except (ConnectionError, RuntimeError, ValueError, TimeoutError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        where = address or "this machine"
        raise SimfedError(f"cannot connect to Ray at {where}: {first}; start a cluster with `ray start --head` "
                          "or leave out --address to run on this machine") from None
    return True


def disconnect() -> None:
    import ray

    if ray.is_initialized():
        ray.shutdown()
