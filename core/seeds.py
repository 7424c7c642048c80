"""Seed derivation: every random stream of a run comes from (run seed, round, client id, phase, ...).

No simfed code draws from a global generator. A client's batches, a server's noise and a cohort
are each drawn from a generator seeded by `derive_seed` over the parts that identify the draw,
so the same run gives the same numbers on any backend, worker count, retry or resume.
"""

from __future__ import annotations

import hashlib
from typing import Any


def derive_seed(*parts: Any) -> int:
    """A 63-bit seed from any tuple of ints/strings; stable across processes and Python runs."""
    text = "/".join(str(p) for p in parts).encode()
    return int.from_bytes(hashlib.blake2b(text, digest_size=8).digest(), "little") >> 1
