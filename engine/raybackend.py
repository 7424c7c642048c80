"""The Ray backend: one server actor and a pool of worker actors, reused from run to run.

The broadcast goes into the object store once per phase; per-client payloads are streamed chunk
by chunk (at most `inflight_per_worker` chunks queued per worker); each finished chunk goes
straight from its worker to the server actor (the driver only sees metric rows). A worker that
died is replaced and its chunks retried (bounded, counted); a server that died raises
`ServerLost`, and the loop restarts the run from its last checkpoint.

Chunks are handed out in `plan_chunks` order to whichever worker has a free slot, never more than
a window of chunks past the oldest one not yet folded, so the server holds at most that many
early results. Within that window a worker first takes a chunk it ran in the previous phase (same
clients): a method may keep a chunk's intermediate results in the worker between its phases
(FedACnnL keeps each layer's inputs for the next layer), and only the worker that made them can
use them.
"""

from __future__ import annotations

import os
from typing import Any, Sequence

from simfed.algorithms import registry
from simfed.algorithms.base import RoundInfo
from simfed.core.errors import SimfedError
from simfed.engine import resources
from simfed.engine.backends import Backend, OnChunk, ServerLost, ServerMemory
from simfed.engine.config import EngineConfig
from simfed.engine.sampling import plan_chunks
from simfed.engine.server import ChunkResult, Server
from simfed.engine.worker import Worker, WorkerSpec

PLACEMENT_TIMEOUT_S = 300


def _unwrap(exc: Exception) -> Exception:
    """A user error raised inside an actor comes back wrapped; surface the original one-liner."""
    cause = getattr(exc, "cause", None)
    if isinstance(cause, SimfedError):
        return SimfedError(str(cause))
    return exc


def _lost_errors() -> tuple:
    """What Ray raises for a task whose actor died."""
    from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError, WorkerCrashedError

    return (RayActorError, ActorDiedError, ActorUnavailableError, WorkerCrashedError)


class ServerActor:
    """Actor body: a Server, set up again for each run without a new process."""

    def setup(self, server_args: dict) -> int:
        self.server = Server(**server_args)
        return os.getpid()

    def phases(self, mode: str, key: Any) -> list[str]:
        return self.server.phases(mode, key)

    def begin(self, phase: str, info: RoundInfo) -> Any:
        return self.server.begin(phase, info)

    def payloads(self, phase: str, info: RoundInfo, client_ids: list[int]) -> Any:
        return self.server.payloads(phase, info, client_ids)

    def receive(self, result: ChunkResult, phase: str, info: RoundInfo, index: int) -> int:
        return self.server.receive(result, phase, info, index)

    def end(self, phase: str, info: RoundInfo) -> dict[str, float]:
        return self.server.end(phase, info)

    def state_dict(self, final: bool) -> dict:
        return self.server.state_dict(final)

    def memory(self) -> ServerMemory:
        return ServerMemory(self.server.memory_bytes(), self.server.private_memory_bytes())

    def pid(self) -> int:
        return os.getpid()

    def release(self) -> None:
        self.server = None


class WorkerActor:
    """Actor body: a Worker, set up again for each run without a new process."""

    def setup(self, spec: WorkerSpec, index: int) -> dict:
        import ray

        self.worker = Worker(spec, index)
        # Where Ray put this actor: a sweep checks that its trial's workers sit in the trial's reservation.
        return {**self.worker.describe(), "placement_group": ray.get_runtime_context().get_placement_group_id() or ""}

    def sees_marker(self, root: str, token: str) -> bool:
        from simfed.engine.storage import sees_marker

        return sees_marker(root, token)

    def run(self, phase: str, info: RoundInfo, bcast: Any, payloads: Any, client_ids: list[int],
            checkpointed_round: int) -> tuple[dict, ChunkResult]:
        return self.worker.run(phase, info, bcast, payloads, client_ids, checkpointed_round)

    def release(self) -> None:
        self.worker = None


# Actors outlive a run: starting a Ray actor costs seconds (a process that imports torch), so
# runs in one driver process reuse them. Keyed by the job, the placement group (if any) and the
# resources each worker asks for.
_POOL: dict[tuple, list] = {}
_SERVERS: list = []


def release_pool() -> None:
    """End every pooled actor of this process, freeing their CPUs/GPUs (a sweep driver calls this
    before handing the cluster to Ray Tune; a sweep trial calls it when its run ends)."""
    import ray

    actors = [a for pool in _POOL.values() for a in pool] + [s for _, s in _SERVERS]
    _POOL.clear()
    _SERVERS.clear()
    if ray.is_initialized():
        for actor in actors:
            try:
                ray.kill(actor)
            except Exception:  # already gone
                pass


def _placement(ray, bundle: int):
    """Inside a placement group (a Ray Tune trial), actors go into its bundles, so concurrent trials
    never use more than their reservations; elsewhere, Ray's default scheduling."""
    pg = ray.util.get_current_placement_group()
    if pg is None:
        return {}
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    return {"scheduling_strategy": PlacementGroupSchedulingStrategy(
        pg, placement_group_bundle_index=bundle if bundle < 0 else bundle % pg.bundle_count)}


class RayBackend(Backend):
    name = "ray"

    def __init__(self, spec: WorkerSpec, server_args: dict, engine: EngineConfig):
        import ray

        super().__init__()
        self.ray = ray
        self.engine = engine
        self.spec = spec
        pg = ray.util.get_current_placement_group()
        if pg is not None:  # a sweep trial: one worker per reserved bundle
            self.n_workers = engine.workers or pg.bundle_count
        else:  # fail now, not after the placement timeout, when the pool cannot fit
            self.n_workers = resources.check(engine, ray.cluster_resources(), "the Ray cluster")
        self._key = (ray.get_runtime_context().get_job_id(), pg.id.hex() if pg else "", engine.cpus_per_worker,
                     engine.gpus_per_worker)
        self.workers = self._pool(self.n_workers)
        if not _SERVERS or _SERVERS[0][0] != self._key[:2]:
            # The server's work is light next to the clients'; it must not take a worker's CPU slot.
            _SERVERS[:] = [(self._key[:2], ray.remote(ServerActor).options(num_cpus=0, **_placement(ray, -1)).remote())]
        self.server = _SERVERS[0][1]
        self.generation = [0] * self.n_workers
        self._ran: dict = {}  # chunk clients -> the worker that ran them in the last phase
        self._setup(server_args)

    def _pool(self, n: int) -> list:
        """n pooled worker actors of this backend's shape, started as needed; pools of another shape end."""
        for key in [k for k in _POOL if k != self._key]:
            # Workers of another shape would hold resources this pool may need.
            for actor in _POOL.pop(key):
                self.ray.kill(actor)
        pool = _POOL.setdefault(self._key, [])
        while len(pool) < n:
            pool.append(self._start_worker(len(pool)))
        return pool[:n]

    def _setup(self, server_args: dict) -> None:
        ray, engine = self.ray, self.engine
        try:
            # Server and workers set up at once: each starts a process that imports torch and warms up.
            server = self.server.setup.remote(server_args)
            self._info = ray.get([w.setup.remote(self.spec, i) for i, w in enumerate(self.workers)],
                                 timeout=PLACEMENT_TIMEOUT_S)
            ray.get(server)
        except ray.exceptions.GetTimeoutError:
            raise SimfedError(f"{self.n_workers} workers with {engine.cpus_per_worker} CPUs and "
                              f"{engine.gpus_per_worker} GPUs each could not be placed within {PLACEMENT_TIMEOUT_S} s; "
                              f"the cluster has {ray.available_resources()} free: lower engine.workers or the "
                              "per-worker resources")
        except Exception as exc:
            raise _unwrap(exc) from None

    def _start_worker(self, index: int):
        return self.ray.remote(WorkerActor).options(num_cpus=self.engine.cpus_per_worker,
                                                    num_gpus=self.engine.gpus_per_worker, max_restarts=0,
                                                    **_placement(self.ray, index)).remote()

    def _replace_worker(self, w: int) -> None:
        actor = self._start_worker(w)
        self.ray.get(actor.setup.remote(self.spec, w))
        _POOL[self._key][w] = actor
        self.workers[w] = actor
        self.generation[w] += 1

    def _server_alive(self) -> bool:
        from ray.exceptions import RayActorError

        try:
            self.ray.get(self.server.pid.remote(), timeout=120)
            return True
        except RayActorError:
            return False
        except Exception:  # slow or unreachable is not dead
            return True

    def _server_lost(self, inflight: dict | None = None) -> ServerLost:
        """Forget the dead server and let this phase's worker tasks finish, so that none of them writes
        client state after the loop has trimmed it back to the checkpoint."""
        _SERVERS.clear()
        if inflight:
            self.ray.wait(list(inflight), num_returns=len(inflight), timeout=300)
        return ServerLost("the server actor died")

    def _get(self, ref) -> Any:
        """The value of a server call; ServerLost when the server died meanwhile."""
        from ray.exceptions import RayActorError

        try:
            return self.ray.get(ref)
        except RayActorError:
            if not self._server_alive():
                raise self._server_lost() from None
            raise
        except Exception as exc:
            raise _unwrap(exc) from None

    def phases(self, mode: str, key: Any) -> list[str]:
        return self._get(self.server.phases.remote(mode, key))

    def state_dict(self, final: bool) -> dict:
        return self._get(self.server.state_dict.remote(final))

    def server_memory(self) -> ServerMemory:
        return ServerMemory(*self._get(self.server.memory.remote()))

    def server_pid(self) -> int:
        return self._get(self.server.pid.remote())

    def workers_info(self) -> list[dict]:
        return list(self._info)

    def check_storage(self, root: str, storage: str) -> None:
        """On a multi-node cluster, client state must be where every worker can reach it."""
        from simfed.engine import storage as st

        if len([n for n in self.ray.nodes() if n.get("Alive")]) < 2:
            return
        if not storage:
            raise SimfedError(st.unshared_message(root, storage))
        token = st.write_marker(root)
        if not all(self.ray.get([w.sees_marker.remote(root, token) for w in self.workers])):
            raise SimfedError(st.unshared_message(root, storage))

    def run_phase(self, phase: str, info: RoundInfo, client_ids: Sequence[int], sizes: dict, on_chunk: OnChunk,
                  checkpointed_round: int) -> dict[str, float]:
        dispatch = _Dispatch(self, phase, info, plan_chunks(client_ids, sizes, self.engine.chunk_clients), on_chunk,
                             checkpointed_round)
        try:
            return dispatch.run()
        except ServerLost:
            raise
        except _lost_errors() as exc:
            if not self._server_alive():
                raise self._server_lost(dispatch.inflight) from None
            raise _unwrap(exc) from None
        except Exception as exc:
            raise _unwrap(exc) from None

    def shutdown(self) -> None:
        """Actors stay in the pool for the next run (they end with the driver's Ray session); they
        drop this run's state and memory maps now."""
        try:
            self.ray.get([a.release.remote() for a in [self.server, *self.workers]], timeout=60)
        except Exception:  # a dead actor has nothing left to release; the pool replaces it next run
            pass


class _Dispatch:
    """One phase on the pool: hands chunks to workers, retries those whose worker died, and has the
    server fold each finished chunk (in chunk order, whatever the arrival order)."""

    def __init__(self, be: RayBackend, phase: str, info: RoundInfo, chunks: list[list[int]], on_chunk: OnChunk,
                 checkpointed_round: int):
        self.be, self.phase, self.info, self.chunks, self.on_chunk = be, phase, info, chunks, on_chunk
        self.checkpointed_round = checkpointed_round
        self.bcast_ref = be.server.begin.remote(phase, info)
        # Methods without per-client payloads (FedAvg) skip one server round trip per chunk.
        self.per_client = registry.get(be.spec.algorithm).capabilities.payloads
        self.window = 2 * be.n_workers * max(1, be.engine.inflight_per_worker)
        self.inflight: dict = {}  # meta ref -> (worker, chunk index, data ref, payload ref, attempt, generation)
        self.per_worker = [0] * be.n_workers
        self.retry: list[tuple[int, int, object]] = []  # (chunk index, attempt, payload ref) to run again
        self.done = [False] * len(chunks)
        self.todo = list(range(len(chunks)))  # chunks not handed out yet, in order
        self.folded = 0  # chunks done in an unbroken run from index 0
        self.keys = [tuple(c) for c in chunks]
        self.ran_before, self.ran_now = be._ran, {}  # chunk clients -> worker, previous phase and this one
        self.acks: list = []

    def run(self) -> dict[str, float]:
        ray = self.be.ray
        while self.inflight or self.retry or self.todo:
            self.hand_out()
            ready, _ = ray.wait(list(self.inflight), num_returns=1)
            for ref in ready:
                self.collect(ref)
        ray.get(self.acks)
        self.be._ran = self.ran_now
        return ray.get(self.be.server.end.remote(self.phase, self.info))

    def pick(self, w: int) -> int | None:
        """The first chunk in the window that w ran last phase, else the first in the window."""
        first = None
        for i in self.todo:
            if i >= self.folded + self.window:
                break
            if self.ran_before.get(self.keys[i]) == w:
                return i
            first = i if first is None else first
        return first

    def hand_out(self) -> None:
        """Fill the least busy workers' free slots: retries first, then new chunks of the window."""
        be = self.be
        while self.retry or self.todo:
            w = min(range(be.n_workers), key=lambda i: (self.per_worker[i], i))
            if self.per_worker[w] >= be.engine.inflight_per_worker:
                break
            if self.retry:
                self.submit(w, *self.retry.pop(0))
                continue
            index = self.pick(w)
            if index is None:  # the window is full
                break
            self.todo.remove(index)
            self.submit(w, index, 0)

    def submit(self, w: int, index: int, attempt: int, payload_ref=None) -> None:
        be, chunk = self.be, self.chunks[index]
        if payload_ref is None and self.per_client:
            payload_ref = be.server.payloads.remote(self.phase, self.info, chunk)
        meta_ref, data_ref = be.workers[w].run.options(num_returns=2).remote(
            self.phase, self.info, self.bcast_ref, payload_ref, chunk, self.checkpointed_round)
        self.inflight[meta_ref] = (w, index, data_ref, payload_ref, attempt, be.generation[w])
        self.per_worker[w] += 1
        self.ran_now[self.keys[index]] = w

    def collect(self, ref) -> None:
        """A finished task: its result goes to the server, or its chunk is retried on a new worker."""
        be = self.be
        w, index, data_ref, payload_ref, attempt, gen = self.inflight.pop(ref)
        self.per_worker[w] -= 1
        try:
            meta = be.ray.get(ref)
        except _lost_errors():
            if not be._server_alive():  # the task failed for want of the server's payload
                raise be._server_lost(self.inflight) from None
            if attempt >= be.engine.max_retries:
                raise SimfedError(f"worker {w} died {attempt + 1} times running clients {self.chunks[index][:5]}...; "
                                  f"giving up (engine.max_retries = {be.engine.max_retries})")
            if gen == be.generation[w]:
                be._replace_worker(w)
            be._retries += 1
            self.retry.append((index, attempt + 1, payload_ref))
            return
        self.acks.append(be.server.receive.remote(data_ref, self.phase, self.info, index))
        self.done[index] = True
        while self.folded < len(self.chunks) and self.done[self.folded]:
            self.folded += 1
        self.on_chunk(meta)
