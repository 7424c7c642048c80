"""Scale-out on a real (local) 2-node Ray cluster, and fractional GPUs packing workers."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_two_nodes_and_four_workers_per_gpu(engine_store, tmp_path):
    proc = subprocess.run([sys.executable, str(Path(__file__).with_name("cluster_script.py")), engine_store,
                           str(tmp_path)], capture_output=True, text=True, timeout=600, cwd=ROOT,
                          env={**__import__("os").environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["cluster_nodes"] == 2
    assert len(out["nodes"]) == 2  # train rows name both nodes: clients ran on each
    workers = out["gpu_workers"]
    assert out["gpu_pool"] == 4 and len(workers) == 4
    assert {tuple(w["gpu_ids"]) for w in workers} == {("0",)}  # all four share the one GPU
    assert len({w["node_id"] for w in workers}) == 1
    assert len({w["pid"] for w in workers}) == 4
    # Without a real GPU the worker falls back to the CPU; with one it would say cuda.
    import torch

    assert {w["device"] for w in workers} == {"cuda" if torch.cuda.is_available() else "cpu"}
