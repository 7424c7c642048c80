"""Connecting to Ray: embedded on this machine by default, or joining a running cluster."""

from __future__ import annotations

import os
import socket

from simfed.engine.errors import SimfedError


def _probe(address: str, timeout: float = 3.0) -> None:
    """Fail in seconds on an address nothing listens at (Ray itself retries for minutes)."""
    target = address.split("://", 1)[-1]
    host, sep, port = target.rpartition(":")
    if not sep or not port.isdigit():
        raise SimfedError(f"--address {address!r}: expected 'auto', HOST:PORT or ray://HOST:PORT")
    try:
        socket.create_connection((host, int(port)), timeout=timeout).close()
    except OSError as exc:
        raise SimfedError(f"cannot reach a Ray cluster at {address} ({exc.strerror or exc}); start one with "
                          "`ray start --head` there, or leave out --address to run on this machine") from None


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
