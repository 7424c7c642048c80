"""Stores (and client state) at a pyarrow.fs URI: opened with a bounded first contact, errors as one line.

pyarrow's S3 client retries a refused connection for ~6 s and waits ~100 s on an endpoint that
accepts connections but never answers (the read timeout is ignored on Linux), and it raises a
bare OSError either way. `open_uri` therefore checks an explicit `endpoint_override` first: TCP
within SIMFED_PROBE_TIMEOUT seconds (default 3), and for plain HTTP that something answers a HEAD
request in that time (any HTTP reply will do: credentials and the bucket are the SDK's business).
`call` turns the OSError of any later filesystem operation into a SimfedError. Messages show the
URI through `redact`, so credentials in user:secret@ or the query never reach the terminal.

Ours, not from a paper.
"""

from __future__ import annotations

import os
import socket
from typing import Any, Callable
from urllib.parse import parse_qs, urlsplit

import pyarrow.fs as pafs

from simfed.core.errors import SimfedError


def is_uri(path: str) -> bool:
    return "://" in path and not path.startswith("file://")


def redact(uri: str) -> str:
    """A URI fit for messages: credentials in user:secret@ and in the query are masked."""
    scheme, sep, rest = uri.partition("://")
    if not sep:
        return uri
    if "@" in rest.split("/", 1)[0]:
        rest = "***@" + rest.split("@", 1)[1]
    if "?" in rest:
        base, query = rest.split("?", 1)
        parts = [p if not p.lower().startswith(("secret", "access_key", "session_token")) else
                 p.split("=", 1)[0] + "=***" for p in query.split("&")]
        rest = base + "?" + "&".join(parts)
    return f"{scheme}://{rest}"


def _endpoint(uri: str) -> tuple[str, int, bool] | None:
    """(host, port, plain http) of an S3 URI's endpoint_override; None without one."""
    parts = urlsplit(uri)
    if parts.scheme != "s3":
        return None
    query = parse_qs(parts.query)
    override = (query.get("endpoint_override") or [""])[0]
    if not override:
        return None
    plain = (query.get("scheme") or ["https"])[0] == "http"
    host, sep, port = override.removeprefix("http://").removeprefix("https://").rpartition(":")
    if not sep or not port.isdigit():
        host, port = override, "80" if plain else "443"
    return host.strip("[]"), int(port), plain


def probe_endpoint(uri: str, what: str, timeout: float | None = None) -> None:
    """Raise SimfedError unless the URI's endpoint_override (if any) answers within `timeout` s."""
    found = _endpoint(uri)
    if found is None:
        return
    host, port, plain = found
    timeout = float(os.environ.get("SIMFED_PROBE_TIMEOUT", "3")) if timeout is None else timeout
    where = f"{what} {redact(uri)}"
    try:
        with socket.create_connection((host, port), timeout=timeout) as sock:
            if plain:
                sock.sendall(f"HEAD / HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
                if not sock.recv(1):
                    raise SimfedError(f"{where}: the endpoint {host}:{port} closed the connection without an "
                                      "answer; check endpoint_override and scheme")
    except socket.timeout:
        raise SimfedError(f"{where}: the endpoint {host}:{port} did not answer within {timeout:g} s; check "
                          "endpoint_override and that the server runs") from None
    except OSError as exc:
        raise SimfedError(f"{where}: cannot reach the endpoint {host}:{port} ({exc.strerror or exc}); check "
                          "endpoint_override and that the server runs") from None


def open_uri(uri: str, what: str) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path inside it) of a pyarrow.fs URI, its endpoint probed first."""
    try:
        fs, inner = pafs.FileSystem.from_uri(uri)
    except Exception as exc:  # pyarrow raises several types for unknown schemes and hosts
        raise SimfedError(f"{what} {redact(uri)}: cannot open ({_first_line(exc)})") from None
    probe_endpoint(uri, what)
    return fs, inner.rstrip("/")


def call(uri: str, what: str, fn: Callable[..., Any], *args) -> Any:
    """fn(*args), a filesystem operation on `uri`; its OSError as one line."""
    try:
        return fn(*args)
    except FileNotFoundError:
        raise
    except OSError as exc:
        raise SimfedError(f"{what} {redact(uri)}: {_first_line(exc)}; check the URI, its endpoint and "
                          "credentials") from None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:300] if text else type(exc).__name__
