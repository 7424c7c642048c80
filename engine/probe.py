"""A bounded check that HOST:PORT is a Ray head (its GCS) before handing the address to Ray.

`ray.init(address=...)` retries for minutes against anything that accepts TCP, so a wrong port
(a web server, a database) looked like a hang. Ray's GCS is a gRPC server: it speaks cleartext
HTTP/2 and answers the client connection preface with a SETTINGS frame. We send the preface and
an empty SETTINGS frame and wait, with one overall deadline, for the first frame header back; a
silent service, an HTTP/1 server or a closed port fails in at most `timeout` seconds.
(With RAY_USE_TLS the GCS speaks TLS first; the frame check is skipped and only TCP is tested.)

`ray_token` then asks the GCS with this process's token: a wrong one, or none for a cluster with
token authentication, made `ray.init` retry for ~20 s, logging a line per try, and end with a
message that did not say why.
"""

from __future__ import annotations

import os
import socket
import time

from simfed.core.errors import SimfedError

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
EMPTY_SETTINGS = b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"  # length 0, type SETTINGS, no flags, stream 0
SETTINGS = 0x04


def failure(address: str, why: str, source: str = "") -> SimfedError:
    """The one line for an address where no GCS answers; `source` says where it came from."""
    where = f" (from {source})" if source else ""
    return SimfedError(f"cannot reach a Ray cluster at {address}{where} ({why}); start one with `ray start --head` "
                       "there, or leave out --address to run on this machine")


def problem(address: str, timeout: float | None = None) -> str | None:
    """Why no Ray GCS answers at HOST:PORT within `timeout` seconds (None: one does)."""
    if timeout is None:
        timeout = float(os.environ.get("SIMFED_PROBE_TIMEOUT", "3"))
    host, _, port = address.rpartition(":")
    host = host.strip("[]")  # [::1]:6379
    deadline = time.monotonic() + timeout
    try:
        sock = socket.create_connection((host, int(port)), timeout=timeout)
    except OSError as exc:
        return exc.strerror or str(exc) or type(exc).__name__
    with sock:
        if os.environ.get("RAY_USE_TLS", "0") not in ("", "0"):
            return None
        try:
            sock.sendall(PREFACE + EMPTY_SETTINGS)
            head = b""
            while len(head) < 9:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise socket.timeout
                sock.settimeout(left)
                part = sock.recv(9 - len(head))
                if not part:
                    break
                head += part
        except socket.timeout:
            return (f"something listens there but did not answer as Ray's GCS within {timeout:g} s; is this the "
                    "head's GCS port (default 6379)?")
        except OSError as exc:
            return exc.strerror or type(exc).__name__
    if len(head) < 9 or head[3] != SETTINGS:
        return "the service there is not a Ray GCS (no gRPC/HTTP2 answer); check the port (the head's GCS port, " \
               "default 6379)"
    return None


def ray_token(address: str) -> None:
    """Raise SimfedError when the Ray GCS at HOST:PORT refuses this process's token (or its lack of one)."""
    from ray._raylet import GcsClient
    from ray.exceptions import AuthenticationError

    from simfed.engine import noise

    try:
        # Ray's C++ client logs each refused call to descriptor 2: kept for the run's log instead
        with noise.captured("ray-token"):
            GcsClient(address=address)
    except AuthenticationError:
        mode = os.environ.get("RAY_AUTH_MODE", "disabled")
        source = ("RAY_AUTH_TOKEN" if os.environ.get("RAY_AUTH_TOKEN") else "RAY_AUTH_TOKEN_PATH"
                  if os.environ.get("RAY_AUTH_TOKEN_PATH") else "~/.ray/auth_token")
        why = (f"refused this process's token (from {source}): the cluster's token differs" if mode == "token" else
               f"needs a token and this process sends none (RAY_AUTH_MODE={mode})")
        raise SimfedError(f"the Ray cluster at {address} {why}; set RAY_AUTH_MODE=token and the cluster's token in "
                          "RAY_AUTH_TOKEN or RAY_AUTH_TOKEN_PATH (the one its nodes were started with)") from None
    except Exception:  # anything else is for ray.init to report
        return
