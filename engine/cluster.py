"""Connecting to Ray: embedded on this machine by default, or joining a running cluster.

The embedded Ray is secured three ways (ours; Ray 2.60 facts read from its source):
- Loopback only. `_node_ip_address="127.0.0.1"` is not enough: Ray resolves it back to the
  machine's external address, and its gRPC servers then listen on every interface. Ray's
  single-machine mode (`RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`, the default on macOS and Windows)
  makes the node address 127.0.0.1, and every listener binds to it.
- Token authentication (`RAY_AUTH_MODE=token`, Ray >= 2.52): every gRPC call must carry the
  cluster's token, read from RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token; simfed
  creates the last (mode 0600) when none exists.
- Processes end with the driver: a watcher (engine.reaper) kills what Ray started when the driver
  exits or is killed; Ray's own agents outlived a kill -9 of the driver by 30-90 s.
"""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
from pathlib import Path

from simfed.core.errors import SimfedError

_REAPER: list[subprocess.Popen] = []  # held so its pipe stays open for the driver's lifetime


RAY_FLOOR = (2, 54)  # token authentication since 2.52; CVE-2026-27482 (unauthenticated dashboard endpoint) fixed in 2.54


def ray_floor(embedded: bool) -> str | None:
    """None for a Ray at or above RAY_FLOOR. Below it, starting a cluster here is refused (it would run
    without authentication); joining one gets a one-line warning, returned."""
    import re

    import ray

    found = tuple(int(v) for v in re.findall(r"\d+", ray.__version__)[:2])
    if found >= RAY_FLOOR:
        return None
    text = (f"Ray {ray.__version__} is installed; simfed needs Ray >= {'.'.join(map(str, RAY_FLOOR))} (token "
            "authentication came in 2.52, CVE-2026-27482, an unauthenticated dashboard endpoint, is fixed in 2.54): "
            "pip install -U 'ray[tune]>=2.54'")
    if embedded:
        raise SimfedError(f"{text}; simfed does not start a Ray cluster without them")
    return text


def _ensure_token() -> None:
    """A token for the embedded cluster, readable by this user only (Ray writes its own world-readable)."""
    if os.environ.get("RAY_AUTH_TOKEN") or os.environ.get("RAY_AUTH_TOKEN_PATH"):
        return
    path = Path.home() / ".ray" / "auth_token"
    if path.is_file() and path.stat().st_size > 0:
        if path.stat().st_mode & 0o077:
            try:
                path.chmod(0o600)  # Ray writes its own token readable by every local user
            except OSError:
                pass
        return
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_hex(32))
    except OSError as exc:
        raise SimfedError(f"cannot write Ray's authentication token to {path} ({exc.strerror}); set "
                          "RAY_AUTH_TOKEN or RAY_AUTH_TOKEN_PATH") from None


def _secure_embedded() -> dict:
    """Set loopback-only and token mode for the Ray about to start; returns what to restore after."""
    from ray._private import ray_constants
    from ray._raylet import Config

    saved = {"env": os.environ.get("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"), "const": ray_constants.ENABLE_RAY_CLUSTER}
    # Read by this process (already imported) and by the processes Ray starts (environment).
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    ray_constants.ENABLE_RAY_CLUSTER = False
    _ensure_token()
    os.environ["RAY_AUTH_MODE"] = "token"
    Config.initialize("")  # this process cached the mode when ray was imported
    return saved


def _restore(saved: dict) -> None:
    from ray._private import ray_constants

    if saved["env"] is None:
        os.environ.pop("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", None)
    else:
        os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = saved["env"]
    ray_constants.ENABLE_RAY_CLUSTER = saved["const"]


def _start_reaper() -> None:
    import ray

    node = ray._private.worker._global_node
    pids = [info.process.pid for infos in node.all_processes.values() for info in infos if info.process]
    _REAPER.append(subprocess.Popen([sys.executable, "-m", "simfed.engine.reaper", *map(str, pids)],
                                    stdin=subprocess.PIPE, start_new_session=True))


def connect(address: str = "", num_cpus: int | None = None, on_note=None) -> bool:
    """Start or join Ray unless already connected; returns True when this call started it. `address`
    "auto" or HOST:PORT is resolved and probed first (engine.address); Ray's own start-up output goes
    to the run's log (engine.noise); `on_note(text)` gets the warning about an old Ray."""
    import ray

    from simfed.engine import address as addr, noise, signals

    if ray.is_initialized():
        return False
    note = ray_floor(embedded=not address)
    if note and on_note:
        on_note(note)
    os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
    kwargs = dict(include_dashboard=False, log_to_driver=False, configure_logging=True, logging_level="ERROR")
    target = addr.resolve(address) if address else ""
    if target:
        from simfed.engine import probe

        probe.ray_token(target)  # a wrong or missing token: one line, where Ray retries ~20 s in silence
    failure = None
    with noise.captured() as out:
        try:
            _init(ray, target, num_cpus, kwargs)
        except Exception as exc:  # Ray raises many types here (a startup timeout is a bare Exception)
            failure = exc
        finally:
            signals.reinstall()  # ray.init set its own SIGTERM handler, Ray's core worker absl's
    if failure is not None:
        raise _connect_error(failure, address, out.mention())
    return True


def _init(ray, target: str, num_cpus: int | None, kwargs: dict) -> None:
    if target:
        ray.init(address=target, **kwargs)
        return
    # address="local" always starts a new instance, even if another Ray runs on this machine.
    saved = _secure_embedded()
    try:
        ray.init(address="local", num_cpus=num_cpus, **kwargs)
    finally:
        _restore(saved)
    _start_reaper()


def _connect_error(exc: BaseException, address: str, mention: str) -> SimfedError:
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    hint = ("; a cluster with token authentication needs its token in RAY_AUTH_TOKEN or ~/.ray/auth_token "
            "and RAY_AUTH_MODE=token" if "auth" in first.lower() else "")
    return SimfedError(f"cannot connect to Ray at {address or 'this machine'}: {first}{hint}; start a cluster with "
                       f"`ray start --head` or leave out --address to run on this machine{mention}")


def alive_nodes() -> int:
    import ray

    return len([n for n in ray.nodes() if n.get("Alive")])


def disconnect() -> None:
    import ray

    if ray.is_initialized():
        ray.shutdown()
