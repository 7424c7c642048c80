"""The worker's per-chunk loop: one client's data and reply alive at a time, heap kept mapped."""

from __future__ import annotations

import sys
import weakref

import pytest
import torch

from simfed.algorithms import base
from simfed.algorithms.base import RoundInfo, Task
from simfed.algorithms.fedavg import FedAvgConfig
from simfed.engine.server import Server
from simfed.engine.worker import Worker, WorkerSpec, keep_heap, release_heap
from simfed.partitions.store import PartitionStore


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_keep_heap_tunes_glibc():
    assert keep_heap() is True


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc_trim")
def test_release_heap_hands_kept_memory_back():
    """With the heap kept, freed memory stays in the RSS until release_heap (after an evaluation):
    the soak's workers crept up in steps at evaluation rounds without it."""
    import psutil

    assert keep_heap() is True
    proc = psutil.Process()
    blocks = [bytearray(b"x" * (1 << 20)) for _ in range(256)]  # 1 MiB each: heap, not mmap
    held = proc.memory_info().rss
    del blocks
    kept = proc.memory_info().rss
    release_heap()
    released = proc.memory_info().rss
    assert kept > held - (64 << 20)  # keep_heap: the free did not shrink the RSS much
    assert kept - released > 128 << 20, (held >> 20, kept >> 20, released >> 20)


def test_a_chunk_holds_one_clients_data_at_a_time(engine_store, tmp_path, monkeypatch):
    """Holding a whole chunk's converted splits and replies made every client fault in fresh pages;
    when client k reads its split, the earlier clients' splits must be released."""
    live: weakref.WeakSet = weakref.WeakSet()
    held_at_split: list[int] = []
    split = base.ClientData.split

    def spy(self, name):
        live.add(self)
        held_at_split.append(sum(1 for d in live if d is not self and d._cache))
        return split(self, name)

    monkeypatch.setattr(base.ClientData, "split", spy)
    st = PartitionStore.open(engine_store)
    task = Task(tuple(int(v) for v in st.sample_shape), int(st.num_classes))
    ids = [int(c) for c in st.client_ids("seen")][:5]
    cfg = FedAvgConfig(local_steps=2)
    spec = WorkerSpec(store_path=engine_store, algorithm="fedavg", cfg=cfg, task=task, seed=0,
                      state_dir=str(tmp_path / "state"), threads=1)
    worker = Worker(spec, 0)
    info = RoundInfo(round=0, seed=0)
    bcast = Server("fedavg", cfg, task, 0).begin("update", info)
    meta, res = worker.run("update", info, bcast, None, ids)
    assert res.n_clients == len(ids) and len(held_at_split) >= len(ids)
    assert max(held_at_split) == 0
    # Folding each reply at once keeps the client-order sum: the chunk's sum equals the per-client sum.
    total = None
    for cid in ids:
        _, one = worker.run("update", info, bcast, None, [cid])
        total = one.sums["delta"].clone() if total is None else total + one.sums["delta"]
    assert torch.equal(res.sums["delta"], total)
    assert worker.describe()["heap_kept"] is (sys.platform.startswith("linux"))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (GPU machines only; CI has none)")
@pytest.mark.parametrize("vectorize", ["off", "auto"])
def test_every_method_runs_on_a_cuda_worker(engine_store, tmp_path, vectorize):
    """Broadcasts, payloads and client states reach a CUDA worker's client step on its device, and
    its replies reach the (CPU) server on the CPU, per-client loop and chunk step alike."""
    import dataclasses

    import polars as pl

    from simfed.algorithms import registry
    from simfed.engine import metrics
    from simfed.engine.loop import run_experiment
    from tests.engine.conftest import make_exp
    from tests.engine.test_method_parity import SMALL

    cases = [(name, SMALL[name]) for name in registry.names()]
    cases.append(("pfedhn", dict(SMALL["pfedhn"], generate="body", unseen_head_steps=2)))  # heads as client state
    for name, algo in cases:
        exp = make_exp(engine_store, name, rounds=2, clients_per_round=4, eval_every=2, eval_clients=3, **algo)
        exp = dataclasses.replace(exp, engine=dataclasses.replace(exp.engine, gpus_per_worker=1.0,
                                                                   vectorize=vectorize))
        run_dir = tmp_path / f"{name}-{algo.get('generate', 'all')}-{vectorize}"
        run_experiment(exp, run_dir)
        df = metrics.load(run_dir)
        assert df.filter(pl.col("split") == "test").height > 0, name
