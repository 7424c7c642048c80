"""Which Ray cluster `--address` means, checked within seconds before Ray dials it.

`ray.init(address=...)` waits minutes (20 attempts of a C++ client with its own timeouts) when no
GCS answers, printing C++ warnings meanwhile. So simfed finds the address Ray would dial and
probes it first (engine.probe): for HOST:PORT the address as given and, when it differs, the one
Ray dials (Ray turns 127.0.0.1 and localhost into this machine's address); for "auto", in this
order:

1. RAY_ADDRESS, when set;
2. the session file `ray start` writes (`<ray temp dir>/ray/ray_current_cluster`, under RAY_TMPDIR
   when set). A file whose address no longer answers was left by a session that ended without
   `ray stop` (a crash, a reboot): one line says so and how to clear it, where Ray would dial it
   for minutes;
3. the one GCS process running on this machine (Ray's own process scan); several: pick one.

The resolved HOST:PORT is what `cluster.connect` hands to Ray, so Ray connects to what was probed.
Ours, not from a paper (Ray 2.60's resolution order read from ray._private.services).
"""

from __future__ import annotations

import os
from pathlib import Path

from simfed.core import validate
from simfed.core.errors import SimfedError
from simfed.engine import probe

CLEAR = "clear it with `ray stop` (or delete the file)"


def session_file() -> Path:
    """Where `ray start` records the cluster it started (Ray's own function, so RAY_TMPDIR counts)."""
    from ray._common.utils import get_ray_address_file

    return Path(get_ray_address_file(None))


def _read_session(path: Path) -> str:
    from simfed.core.safeio import read_bytes

    if not path.is_file():
        return ""
    try:
        return read_bytes(path, 4096, "Ray session file").decode("utf-8", "replace").strip()
    except SimfedError:
        return ""  # unreadable or absurd: as if there were none


def dialed(address: str) -> str:
    """HOST:PORT as Ray will dial it (loopback names become this machine's address)."""
    from ray._private import services

    try:
        return services.canonicalize_bootstrap_address(address) or address
    except Exception:  # Ray refuses forms our own check let through: dial as given, the probe decides
        return address


def answering(address: str, where: str = "--address") -> str:
    """The address Ray will dial for HOST:PORT `address`, after both forms answered as a Ray GCS."""
    validate.address(where, address)
    why = probe.problem(address)
    if why:
        raise probe.failure(address, why, "" if where == "--address" else where)
    target = dialed(address)
    why = probe.problem(target) if target != address else None
    if why:
        raise SimfedError(f"{where} {address}: Ray dials it as {target} (its address for this machine), where "
                          f"nothing answers as Ray ({why}); start the head with `ray start --head` (it listens on "
                          "every interface) or give that address")
    return target


def resolve(address: str) -> str:
    """HOST:PORT for `address` ("auto" or HOST:PORT), probed; SimfedError (one line) otherwise."""
    if address != "auto":
        return answering(address)
    env = os.environ.get("RAY_ADDRESS", "")
    if env and env != "auto":
        return answering(env, "RAY_ADDRESS, for --address auto")
    path = session_file()
    recorded = _read_session(path)
    if recorded:
        why, target = _check_recorded(recorded)
        if why:
            raise SimfedError(f"--address auto: the address {recorded} comes from the stale session file {path}, "
                              f"left by a Ray session that ended without `ray stop`: nothing answers there ({why}); "
                              f"{CLEAR}, start a cluster with `ray start --head`, or leave out --address to run "
                              "on this machine")
        return target
    return _running(path)


def _check_recorded(recorded: str) -> tuple[str | None, str]:
    """(why nothing answers, or None; the address Ray dials) for a session file's address."""
    try:
        validate.address("session file", recorded)
    except SimfedError:
        return "it is not HOST:PORT", recorded
    if recorded in ("", "auto"):
        return "it is not HOST:PORT", recorded
    target = dialed(recorded)
    return probe.problem(recorded) or (probe.problem(target) if target != recorded else None), target


def _running(path: Path) -> str:
    """The one GCS process on this machine (no RAY_ADDRESS, no session file)."""
    from ray._private import services

    live = sorted(services.find_gcs_addresses())
    if len(live) > 1:
        raise SimfedError(f"--address auto: several Ray clusters run on this machine ({', '.join(live)}); pass "
                          "--address HOST:PORT of the one to join")
    if not live:
        raise SimfedError(f"--address auto: no Ray cluster found (no RAY_ADDRESS, no session file {path}, no GCS "
                          "process on this machine); start one with `ray start --head`, or leave out --address "
                          "to run on this machine")
    return answering(live[0], "the GCS process running on this machine, for --address auto")
