"""A client worker: simulates many logical clients, a chunk of them per call.

Plain Python; the serial backend calls it in-process, the Ray backend wraps it in an actor
(engine.raybackend.WorkerActor) and keeps a pool of them alive from run to run. Per chunk of
clients it slices each client's rows from the memory-mapped store, loads the client's persistent
state, runs the method's client step (client by client with one copy of each model, or the whole
chunk in one batched step: `Algorithm.chunk_replies` with engine.vectorize, `Algorithm.chunk_sums`),
drops non-finite replies, pre-sums the summable messages and returns (metric rows for the driver,
result for the server).

With the [system] clock a straggler's context carries its step budget (`RoundInfo.budgets`), and in
an asynchronous round each client trains from its own model version, which arrives as its payload
and takes the broadcast's place (no batched chunk step then: the clients' start models differ).
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np
import torch

from simfed.algorithms import registry
from simfed.algorithms.base import KEEP, ChunkSums, ClientContext, ClientData, RoundInfo, Task
from simfed.engine.clientstate import ClientStateStore
from simfed.engine.mechanism import Broadcast, client_part
from simfed.engine.server import ChunkResult, add_into, compact
from simfed.partitions.dtypes import numeric
from simfed.partitions.store import PartitionStore


@dataclass(frozen=True)
class WorkerSpec:
    store_path: str
    algorithm: str
    cfg: Any
    task: Task
    seed: int
    state_dir: str
    threads: int = 1
    use_gpu: bool = False
    vectorize: str = "off"  # engine.vectorize: "auto" (on for CUDA workers), "on" or "off"
    privacy: Any = None  # [privacy]'s plan (engine.privacy): clip each client's released part here


def nbytes(obj: Any) -> int:
    """Bytes of the tensors/arrays in a message: what a real client would send or receive."""
    if obj is None:
        return 0
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, np.ndarray):
        return int(obj.nbytes)
    if isinstance(obj, dict):
        return sum(nbytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(nbytes(v) for v in obj)
    if isinstance(obj, (int, float)):
        return 8
    return 0


CPU = torch.device("cpu")


def to_device(obj: Any, device: torch.device) -> Any:
    """Tensors of a (nested) message moved to `device`; everything else as is."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, dict):
        return {k: to_device(v, device) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_device(v, device) for v in obj)
    return obj


def all_finite(obj: Any) -> bool:
    if obj is None:
        return True
    if isinstance(obj, torch.Tensor):
        return bool(torch.isfinite(obj).all()) if obj.is_floating_point() else True
    if isinstance(obj, np.ndarray):
        return bool(np.isfinite(obj).all()) if np.issubdtype(obj.dtype, np.floating) else True
    if isinstance(obj, dict):
        return all(all_finite(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return all(all_finite(v) for v in obj)
    if isinstance(obj, float):
        return math.isfinite(obj)
    return True


def _glibc():
    """The C library when it is glibc on Linux (mallopt, malloc_trim), else None (macOS, musl)."""
    import ctypes
    import sys

    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL("libc.so.6")
        return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None
    except OSError:
        return None


def keep_heap() -> bool:
    """Stop glibc from handing freed heap back to the OS between clients (Linux only).

    A worker allocates and frees the same few MB of tensors for every client. With glibc's
    defaults a free that leaves more than the trim threshold at the top of the heap returns it to
    the OS, and the next client faults the same pages back in: measured 30k-260k minor faults and
    0.1-0.6 s of system time per 60 FEMNIST clients (5-15% of the round), depending on how the
    live tensors happen to lie. A fixed trim threshold of 512 MiB and mmap threshold of 32 MiB keep
    the working set mapped; memory is still reused, so RSS stays at the worker's peak working set.
    """
    libc = _glibc()
    if libc is None:  # not glibc: nothing to tune
        return False
    return bool(libc.mallopt(-1, 512 << 20)) and bool(libc.mallopt(-3, 32 << 20))  # M_TRIM_/M_MMAP_THRESHOLD


def release_heap() -> None:
    """Hand the heap's free pages back to the OS (glibc's malloc_trim; Linux only), after an evaluation.

    keep_heap keeps freed memory mapped between clients, so a worker's RSS is the high-water mark
    of its heap. An evaluation (every client of a cohort, other tensors than training's) leaves
    new holes in it, and the mark crept up over a long run: `bench/soak.py`, PeFLL, 500 rounds,
    workers +3.1-3.6% per 100 rounds, in steps at evaluation rounds, while the live memory
    (tracemalloc, the serial backend) stayed flat. Trimming once per evaluation chunk bounds the
    mark; training chunks refault their working set once, not once per client.
    """
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)


class _Client(NamedTuple):
    cid: int
    cohort: str
    data: ClientData
    state: Any  # the client's persistent state (None for methods without any)
    ctx: ClientContext
    payload: Any  # its per-client payload from the server, if any


@dataclass
class _ChunkOut:
    """What a chunk's replies add up to so far: the result for the server and the metric rows."""

    phase: str
    info: RoundInfo
    bytes_down: int  # the broadcast's size, received by every client
    checkpointed_round: int
    clip: float | None = None  # [privacy]: this phase's clip (None: the phase releases nothing to clip)
    result: ChunkResult = field(default_factory=ChunkResult)
    rows: list[dict] = field(default_factory=list)
    n_train: int = 0


class Worker:
    def __init__(self, spec: WorkerSpec, index: int = 0):
        self.heap_kept = keep_heap()
        torch.set_num_threads(max(1, spec.threads))
        self.spec = spec
        self.index = index
        self.algo = registry.get(spec.algorithm)
        self.store = PartitionStore.open(spec.store_path)
        table = self.store.clients
        ids = numeric(table.column("client_id"))
        self.cohort = dict(zip(ids.tolist(), table.column("cohort").to_pylist()))
        self.counts = {s: dict(zip(ids.tolist(), numeric(table.column(f"n_{s}")).tolist()))
                       for s in ("train", "val", "test")}
        self.states = ClientStateStore(spec.state_dir)
        self.device = torch.device("cuda" if spec.use_gpu and torch.cuda.is_available() else "cpu")
        # The batched trainer pays off where kernel launches dominate (a GPU); on CPU only on request.
        self.vectorize = spec.vectorize == "on" or (spec.vectorize == "auto" and self.device.type == "cuda")
        if self.vectorize and self.algo.capabilities.chunk_replies:
            from simfed.algorithms.kit import models

            # "auto" falls back to the loop for a model vmap cannot train ("on" was refused before the run)
            self.vectorize = models.vmap_problem(models.build(spec.task), spec.task) is None
        self.cache: dict = {}
        self.node_id = os.environ.get("SIMFED_NODE", "local")
        try:
            import ray

            if ray.is_initialized():
                self.node_id = ray.get_runtime_context().get_node_id()
        except Exception:  # serial backend without Ray: the node is this machine
            pass
        self.warmup_s = self._warmup(ids)

    def _warmup(self, ids) -> float:
        """First use of torch and of the store, paid here (pool start, before any round is timed)
        rather than by the first round's clients."""
        t0 = time.perf_counter()
        if len(ids):
            self.store.read(int(ids[0]), "train")
        self.algo.warmup(self.spec.cfg, self.spec.task, self.device)
        return time.perf_counter() - t0

    def describe(self) -> dict:
        gpu_ids: list = []
        try:
            import ray

            if ray.is_initialized():
                gpu_ids = list(ray.get_runtime_context().get_accelerator_ids().get("GPU", []))
        except Exception:
            pass
        return {"index": self.index, "pid": os.getpid(), "node_id": self.node_id, "device": str(self.device),
                "gpu_ids": gpu_ids, "threads": torch.get_num_threads(), "vectorize": self.vectorize, "heap_kept": self.heap_kept, "warmup_s": round(self.warmup_s, 4)}

    def run(self, phase: str, info: RoundInfo, bcast: Any, payloads: Any, client_ids: list[int],
            checkpointed_round: int = -1) -> tuple[dict, ChunkResult]:
        """One chunk of clients through `phase`: (meta with the metric rows, the result for the server)."""
        clip = None
        if isinstance(bcast, Broadcast):  # a phase that releases a private update: the round's clip
            bcast, clip = bcast.message, bcast.clip
        if self.device.type != "cpu":
            # Messages arrive and leave on the CPU (the server's device): moved once per chunk here,
            # so a method's client step sees its broadcast, payload and state on its own device.
            bcast = to_device(bcast, self.device)
            payloads = {k: to_device(v, self.device) for k, v in payloads.items()} if payloads else payloads
        if info.mode == "train" and self.algo.capabilities.chunk_sums and not info.private:
            batched = self.run_sums(phase, info, bcast, client_ids)
            if batched is not None:
                return batched
        out = _ChunkOut(phase, info, nbytes(bcast), checkpointed_round, clip)
        clients = [self._client(cid, phase, info, payloads) for cid in client_ids]
        if self.vectorize and info.mode == "train" and phase in self.algo.capabilities.chunk_replies \
                and not info.starts:
            # One batched step for the whole chunk; its time is shared evenly among the clients.
            t0 = time.perf_counter()
            replies = self.algo.chunk_replies(phase, self.spec.cfg, bcast, [c.payload for c in clients],
                                              [c.data for c in clients], [c.state for c in clients],
                                              [c.ctx for c in clients])
            seconds = (time.perf_counter() - t0) / max(len(clients), 1)
            for client, reply in zip(clients, replies):
                self._absorb(out, client, reply, seconds)
        else:
            # Each reply is folded in (client order, as before) and dropped before the next client
            # trains: holding a chunk's replies and data until its end made every client's tensors
            # land on fresh heap pages (page faults: about 12% of a FEMNIST epoch-round on CPU).
            for client in clients:
                t0 = time.perf_counter()
                # asynchronous: the model version the client started from is its broadcast
                b, p = (client.payload, None) if info.starts else (bcast, client.payload)
                reply = self.algo.client(phase, self.spec.cfg, b, p, client.data, client.state, client.ctx)
                seconds = time.perf_counter() - t0
                client.data.release()
                self._absorb(out, client, reply, seconds)
                del reply
        meta = {"rows": out.rows, "n_clients": len(client_ids), "n_train": out.n_train,
                "dropped": sum(1 for r in out.rows if r.get("dropped"))}
        if info.mode != "train" and self.heap_kept:
            del clients
            release_heap()
        return meta, out.result

    def _data(self, cid: int) -> ClientData:
        counts = {s: self.counts[s][cid] for s in ("train", "val", "test")}
        return ClientData(cid, self.cohort[cid], self.store.read, self.device, counts, input=self.spec.task.input)

    def _context(self, cid: int, phase: str, info: RoundInfo) -> ClientContext:
        return ClientContext(client_id=cid, cohort=self.cohort[cid], round=info.round, seed=self.spec.seed,
                             phase=phase, mode=info.mode, task=self.spec.task, device=self.device, cache=self.cache,
                             budget=info.budget(cid), staleness=info.staleness(cid))

    def _client(self, cid: int, phase: str, info: RoundInfo, payloads: Any) -> _Client:
        """A client ready for its step: its data, its persistent state and its context."""
        cstate = None
        if self.algo.capabilities.client_state:
            # Evaluation after round r sees every state written up to and including round r.
            at = (info.round + 1, 0) if info.mode == "eval" else (info.round, info.phase_index)
            cstate = self.states.get(cid, *at)
            if self.device.type != "cpu":
                cstate = to_device(cstate, self.device)
        return _Client(cid, self.cohort[cid], self._data(cid), cstate, self._context(cid, phase, info),
                       payloads.get(cid) if payloads else None)

    def _absorb(self, out: "_ChunkOut", client: _Client, reply, seconds: float) -> None:
        """Fold one reply into the chunk's result (if finite), save the client's new state, add its rows."""
        info, algo = out.info, self.algo
        if self.device.type != "cpu":  # the server folds on the CPU; client states are saved from the CPU
            reply = dataclasses.replace(reply, sums=to_device(reply.sums, CPU), item=to_device(reply.item, CPU),
                                        state=to_device(reply.state, CPU))
        ok = all_finite(reply.sums) and all_finite(reply.item)
        if ok:
            out.result.sums = add_into(out.result.sums, self._private(out, client.cid, reply.sums))
            if reply.item is not None:
                out.result.items.append((client.cid, compact(reply.item)))
            out.result.n_clients += 1
            if info.mode == "train" and algo.capabilities.client_state and not (
                    isinstance(reply.state, str) and reply.state == KEEP):
                self.states.put(client.cid, info.round, info.phase_index, reply.state, out.checkpointed_round)
        out.n_train += reply.n_train
        base = {"round": info.round + 1, "client_id": client.cid, "cohort": client.cohort, "phase": out.phase,
                "node_id": self.node_id, "worker": self.index}
        if info.mode == "train":
            loss = reply.train_loss if ok and reply.train_loss is not None else None
            out.rows.append({**base, "split": "train", "n": reply.n_train, "seconds": seconds, "loss": loss,
                             "bytes_up": nbytes(reply.sums) + nbytes(reply.item),
                             "bytes_down": out.bytes_down + nbytes(client.payload), "dropped": not ok})
        elif ok and reply.evals:
            for split, ev in reply.evals.items():
                out.rows.append({**base, "split": split, "n": ev.n, "seconds": seconds,
                                 "loss": ev.loss_sum / max(ev.n, 1), "accuracy": ev.correct / max(ev.n, 1),
                                 "dropped": False})
        elif not ok:
            out.rows.append({**base, "split": "eval", "n": 0, "seconds": seconds, "dropped": True})

    def _private(self, out: "_ChunkOut", cid: int, sums: Any) -> Any:
        """[privacy]: the reply's released part clipped (and noised by the client in local mode)."""
        plan = self.spec.privacy
        keys = plan.keys(out.phase) if plan is not None and out.clip is not None and sums else ()
        if not keys:
            return sums
        info = out.info
        seed = (self.spec.seed, info.round, info.mode, cid, out.phase, "privacy-local") if plan.mode == "local" else None
        return client_part(plan, sums, keys, out.clip, seed)

    def run_sums(self, phase: str, info: RoundInfo, bcast: Any, client_ids: list[int]) -> tuple[dict, ChunkResult] | None:
        """The whole chunk in one `Algorithm.chunk_sums` call, or None (the method has none, or
        its sums are not finite: then the per-client path finds and drops the culprits)."""
        spec = self.spec
        t0 = time.perf_counter()
        clients = [(self._data(cid), self._context(cid, phase, info)) for cid in client_ids]
        reply: ChunkSums | None = self.algo.chunk_sums(phase, spec.cfg, bcast, clients)
        if reply is None or not all_finite(reply.sums):
            return None
        seconds = time.perf_counter() - t0
        total = max(sum(reply.n_train), 1)
        up, down = nbytes(reply.sums), nbytes(bcast)
        rows = []
        for cid, n, dropped in zip(client_ids, reply.n_train, reply.dropped):
            # One GEMM served every client: a client's seconds are the chunk's, shared by sample count.
            rows.append({"round": info.round + 1, "client_id": cid, "cohort": self.cohort[cid], "phase": phase,
                         "node_id": self.node_id, "worker": self.index, "split": "train", "n": n,
                         "seconds": seconds * n / total, "bytes_up": 0 if dropped or not n else up,
                         "bytes_down": down, "dropped": dropped})
        result = ChunkResult(sums=to_device(reply.sums, CPU), n_clients=sum(1 for d in reply.dropped if not d))
        meta = {"rows": rows, "n_clients": len(client_ids), "n_train": sum(reply.n_train),
                "dropped": sum(reply.dropped)}
        return meta, result
