"""Per-client read latency of a partition store (never part of the test run).

    python bench/read_latency.py [--store DIR] [--clients N] [--reads N] [--json]

Without --store a synthetic-FEMNIST store with --clients writers (default 3,597) is built in a
temp dir first. Each read is ``store.read(client, "train")`` plus touching every byte (a sum), so
the figure includes page faults, not just slicing. "first" is the first read of a client in a
fresh process (cold map, warm OS page cache unless the cache was dropped); "repeat" reads the
same clients again.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import numpy as np


def measure(path: str, reads: int, seed: int = 0) -> dict:
    from simfed.partitions.store import PartitionStore

    t0 = time.perf_counter()
    store = PartitionStore.open(path)
    open_s = time.perf_counter() - t0
    ids = store.client_ids()
    pick = np.random.default_rng(seed).choice(ids, size=min(reads, len(ids)), replace=False)
    out = {}
    for phase in ("first", "repeat"):
        lat = []
        for cid in pick:
            t = time.perf_counter()
            x, y = store.read(int(cid), "train")
            int(x.sum(dtype=np.int64))
            lat.append(time.perf_counter() - t)
        lat = np.asarray(lat) * 1e3
        out[phase] = {"median_ms": float(np.median(lat)), "p99_ms": float(np.percentile(lat, 99)),
                      "max_ms": float(lat.max())}
    return {"store": path, "clients": int(len(ids)), "reads": int(len(pick)),
            "open_ms": open_s * 1e3, **out}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--store", help="existing store directory (default: build a synthetic one)")
    ap.add_argument("--clients", type=int, default=3597, help="writers in the built store")
    ap.add_argument("--reads", type=int, default=500, help="distinct clients to read")
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        path = args.store
        build_s = None
        if path is None:
            from simfed.partitions.synthetic import make_synthetic_femnist

            t = time.perf_counter()
            path = make_synthetic_femnist(os.path.join(tmp, "femnist"), clients=args.clients)
            build_s = time.perf_counter() - t
        r = measure(path, args.reads)
        r["build_s"] = build_s
    if args.json:
        print(json.dumps(r))
    else:
        print(f"{r['store']}: {r['clients']} clients, {r['reads']} reads")
        for phase in ("first", "repeat"):
            p = r[phase]
            print(f"  {phase:6s} median {p['median_ms']:.3f} ms  p99 {p['p99_ms']:.3f} ms")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
