"""Small typed validators shared by the CLI, the importers and the store.

Each returns the (possibly normalized) value or raises SimfedError with one line that names the
value, what was wrong and what is accepted. `where` is how the user wrote it: "--seed",
"[run] seed", "manifest.json counts.train".

Why a module of its own: the same rules (a seed is a non-negative int64, a fraction is a finite
number in [0, 1), a name is a single path component) apply to config keys, command-line options
and files read back from disk, and one implementation keeps their messages consistent.
"""

from __future__ import annotations

import math
import os
from typing import Any, Iterable

from simfed.core.errors import SimfedError

INT64_MAX = 2**63 - 1
SEED_MAX = INT64_MAX
# A number a config or option can sensibly hold; beyond this a float key is a typo or an attack
# (1e308 passes isfinite but overflows to inf at the first multiplication).
FLOAT_ABS_MAX = 1e12
NAME_MAX_BYTES = 255  # one path component on every common filesystem


def _show(v: Any) -> str:
    text = repr(v)
    return text if len(text) <= 60 else text[:57] + "..."


def did_you_mean(word: Any, choices: "Iterable[str]") -> str:
    """" (did you mean 'fedavg'?)" for the closest of `choices` to a misspelled `word`, else ""."""
    import difflib

    if not isinstance(word, str) or not word:
        return ""
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def integer(where: str, v: Any, lo: int | None = None, hi: int | None = INT64_MAX) -> int:
    """An int (not a bool, not a float) in [lo, hi]."""
    if isinstance(v, bool) or not isinstance(v, int):
        raise SimfedError(f"{where} must be an integer, got {_show(v)}")
    if lo is not None and v < lo or hi is not None and v > hi:
        bounds = f"between {lo} and {hi}" if lo is not None and hi is not None else \
            (f">= {lo}" if lo is not None else f"<= {hi}")
        raise SimfedError(f"{where} = {_show(v)} is out of range; it must be {bounds}")
    return v


def seed(where: str, v: Any) -> int:
    return integer(where, v, 0, SEED_MAX)


def number(where: str, v: Any, lo: float | None = None, hi: float | None = None, *,
           lo_open: bool = False, hi_open: bool = False) -> float:
    """A finite int or float in the interval (open ends where asked); NaN and inf never pass."""
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise SimfedError(f"{where} must be a number, got {_show(v)}")
    try:
        f = float(v)
    except OverflowError:  # an int beyond the float range
        f = math.inf
    if not math.isfinite(f):
        raise SimfedError(f"{where} = {_show(v)} is not a finite number")
    if abs(f) > FLOAT_ABS_MAX and (lo is None or hi is None):
        raise SimfedError(f"{where} = {_show(v)} is out of range; |value| must be <= {FLOAT_ABS_MAX:g}")
    bad_lo = lo is not None and (f <= lo if lo_open else f < lo)
    bad_hi = hi is not None and (f >= hi if hi_open else f > hi)
    if bad_lo or bad_hi:
        left = "(" if lo_open else "["
        right = ")" if hi_open else "]"
        span = f"{left}{'-inf' if lo is None else f'{lo:g}'}, {'inf' if hi is None else f'{hi:g}'}{right}"
        raise SimfedError(f"{where} = {_show(v)} is out of range; it must be in {span}")
    return f


def fraction(where: str, v: Any) -> float:
    """A fraction of samples or clients: finite, in [0, 1)."""
    return number(where, v, 0.0, 1.0, hi_open=True)


def text(where: str, v: Any, max_len: int = 4096) -> str:
    """A string that can be a path or name: no NUL, valid UTF-8, bounded length."""
    if not isinstance(v, str):
        raise SimfedError(f"{where} must be a string, got {_show(v)}")
    if "\x00" in v:
        raise SimfedError(f"{where} contains a NUL character; remove it")
    try:
        v.encode("utf-8")
    except UnicodeEncodeError:
        raise SimfedError(f"{where} is not valid Unicode (lone surrogate); use plain text") from None
    if len(v) > max_len:
        raise SimfedError(f"{where} is {len(v)} characters long; at most {max_len} are accepted")
    return v


def component(where: str, v: Any) -> str:
    """A single path component (a run or store name): no separators, not '.' or '..'."""
    text(where, v)
    if len(v.encode("utf-8")) > NAME_MAX_BYTES:
        raise SimfedError(f"{where} is {len(v.encode('utf-8'))} bytes long; a file name holds at most "
                          f"{NAME_MAX_BYTES}")
    if "/" in v or "\\" in v or (os.altsep and os.altsep in v):
        raise SimfedError(f"{where} = {_show(v)} contains a path separator; give a plain name "
                          "(use --out for a directory elsewhere)")
    if v.strip() in (".", ".."):
        raise SimfedError(f"{where} = {_show(v)} is not a usable name")
    return v


def choice(where: str, v: Any, options: tuple[str, ...]) -> str:
    if not isinstance(v, str) or v not in options:
        raise SimfedError(f"{where} = {_show(v)}{did_you_mean(v, options)}; use one of: "
                          f"{', '.join(repr(o) for o in options)}")
    return v


def address(where: str, address: str) -> str:
    """Empty, "auto" or HOST:PORT. ray:// (Ray Client) needs ray[client] and a driver-side copy of
    the run directory, so it is refused with the alternative."""
    text(where, address, max_len=1024)
    if address in ("", "auto"):
        return address
    if address.startswith("ray://"):
        raise SimfedError(f"{where} {address!r}: ray:// (Ray Client) addresses are not supported; run "
                          "simfed on a node of the cluster with --address auto (or the head's "
                          "HOST:PORT, default port 6379)")
    if "://" in address:
        raise SimfedError(f"{where} {address!r}: unknown scheme; use 'auto' or HOST:PORT")
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise SimfedError(f"{where} {address!r}: expected 'auto' or HOST:PORT (e.g. 10.0.0.5:6379)")
    return address
