"""Reading one client maps only its pages: RSS grows by far less than the file size."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np

from simfed.partitions.store import write_store

PROBE = r"""
import json, sys, psutil, numpy as np
from simfed.partitions.store import PartitionStore
proc = psutil.Process()
store = PartitionStore.open(sys.argv[1])
ids = store.client_ids()
before = proc.memory_info().rss
x, y = store.read(int(ids[len(ids) // 2]), "train")
checksum = int(x.sum(dtype=np.int64)) + int(y.sum())  # touch every byte of the client
after = proc.memory_info().rss
print(json.dumps({"before": before, "after": after, "n": len(y), "bytes": x.nbytes,
                  "checksum": checksum}))
"""


def test_one_client_read_does_not_load_the_file(tmp_path):
    rng = np.random.default_rng(0)
    n, clients = 160_000, 400  # train.arrow ~125 MB
    x = rng.integers(0, 256, (n, 1, 28, 28), dtype=np.uint8)
    y = rng.integers(0, 62, n)
    c = np.repeat(np.arange(clients), n // clients)
    path = write_store(tmp_path / "big", x, y, c, np.zeros(n, np.int8),
                       classes=[str(i) for i in range(62)])
    del x
    size = os.path.getsize(os.path.join(path, "train.arrow"))
    assert size > 100 * 2**20
    out = subprocess.run([sys.executable, "-c", PROBE, path], capture_output=True, text=True,
                         check=True, timeout=120)
    r = json.loads(out.stdout)
    grown = r["after"] - r["before"]
    assert r["n"] == n // clients
    # One client is ~314 KB; allow generous slack for allocator noise, but far below the file.
    assert grown < 16 * 2**20, f"RSS grew {grown / 2**20:.1f} MiB reading one client"
    assert grown < size / 8
    print(f"train.arrow {size / 2**20:.0f} MiB, RSS growth {grown / 2**20:.2f} MiB "
          f"for one client ({r['bytes'] / 2**10:.0f} KiB)")
