"""The Ray backend: one server actor and a pool of worker actors, reused from run to run.

The broadcast goes into the object store once per phase; per-client payloads are streamed chunk
by chunk (at most `inflight_per_worker` chunks queued per worker); each finished chunk goes
straight from its worker to the server actor (the driver only sees metric rows). How a phase's
chunks are handed out and retried is in engine.dispatch. A worker that died is replaced (also one
found dead when a pool is reused); a server that died raises `ServerLost`, and the loop restarts
the run from its last checkpoint.

On a cluster the server runs on the driver's node and the workers are spread over the nodes, so
a worker node that dies costs its chunks only, never the server's state (docs/clusters.md).
"""

from __future__ import annotations

import os
import time
from typing import Any, Sequence

from simfed.algorithms.base import RoundInfo
from simfed.core.errors import SimfedError
from simfed.engine import resources
from simfed.engine.backends import Backend, OnChunk, ServerLost, ServerMemory
from simfed.engine.config import EngineConfig
from simfed.engine.dispatch import Dispatch, lost_errors
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


class _NoRoom(Exception):
    """A restarted worker cannot be placed: the nodes left are full."""


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
    never use more than their reservations. Elsewhere the server (bundle -1) runs on the driver's
    node, so that losing any other node never loses the server's state, and workers are spread over
    the nodes (Ray's default packs them onto the driver's node first)."""
    pg = ray.util.get_current_placement_group()
    if pg is None:
        if bundle >= 0:
            return {"scheduling_strategy": "SPREAD"}
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        return {"scheduling_strategy": NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(),
                                                                      soft=False)}
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    slots = _worker_bundles(pg)
    return {"scheduling_strategy": PlacementGroupSchedulingStrategy(
        pg, placement_group_bundle_index=bundle if bundle < 0 else slots[bundle % len(slots)])}


def _worker_bundles(pg) -> list[int]:
    """The bundles of a sweep trial's placement group that hold a worker: those with CPUs or GPUs (the
    head bundle, which pins the trial's driver to a node, has none)."""
    return [i for i, b in enumerate(pg.bundle_specs) if b.get("CPU", 0) > 0 or b.get("GPU", 0) > 0]


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
            self.n_workers = engine.workers or len(_worker_bundles(pg))
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
        self.retired: set[int] = set()  # workers lost for the rest of this run (no room left for them)
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
            deadline = time.monotonic() + PLACEMENT_TIMEOUT_S
            refs = [w.setup.remote(self.spec, i) for i, w in enumerate(self.workers)]
            self._info = [self._set_up(i, ref, deadline) for i, ref in enumerate(refs)]
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

    def _set_up(self, w: int, ref, deadline: float) -> dict:
        """Worker w's setup result; a worker that died meanwhile (its node with it: a pooled actor
        from an earlier run, or one started on a node that was dying) is started again elsewhere."""
        attempt = 0
        while True:
            try:
                return self.ray.get(ref, timeout=max(1.0, deadline - time.monotonic()))
            except lost_errors():
                attempt += 1
                if attempt > self.engine.max_retries:
                    raise
            actor = self._start_worker(w)
            _POOL[self._key][w] = self.workers[w] = actor
            ref = actor.setup.remote(self.spec, w)

    def _replace_worker(self, w: int) -> None:
        """Start worker w again; when the nodes left have no room for it (its node died with a pool
        that filled the cluster), the rest of this run goes on without it. Ray learns that a node
        died a few seconds after its actors' tasks failed, so a new worker may first land on the
        dying node, or wait for room that never comes: room is checked again after each start that
        died and while a start waits."""
        self.generation[w] += 1
        deadline = time.monotonic() + PLACEMENT_TIMEOUT_S
        for _ in range(self.engine.max_retries + 1):
            if not self._has_room():
                return self._retire(w)
            actor = self._start_worker(w)
            _POOL[self._key][w] = self.workers[w] = actor
            try:
                self._info[w] = self._await_setup(actor.setup.remote(self.spec, w), deadline)
                return
            except lost_errors():
                continue
            except _NoRoom:
                self.ray.kill(actor)
                return self._retire(w)
        raise SimfedError(f"worker {w} died {self.engine.max_retries + 1} times while starting again; check the "
                          "cluster's nodes (`ray status`), then resume the run")

    def _await_setup(self, ref, deadline: float) -> dict:
        """A restarted worker's setup result, looking every 2 s whether it still has room to start."""
        while True:
            try:
                return self.ray.get(ref, timeout=max(0.1, min(2.0, deadline - time.monotonic())))
            except self.ray.exceptions.GetTimeoutError:
                if not self._has_room():
                    raise _NoRoom from None
                if time.monotonic() >= deadline:
                    raise SimfedError(f"a worker died and could not be started again within {PLACEMENT_TIMEOUT_S} s "
                                      f"({self.ray.available_resources()} free); resume the run when the cluster "
                                      "has room") from None

    def _retire(self, w: int) -> None:
        self.retired.add(w)
        if len(self.retired) == self.n_workers:
            raise SimfedError("every worker was lost and the nodes left have no room for one "
                              f"({self.ray.cluster_resources()}); add nodes, then resume the run")

    def _has_room(self) -> bool:
        """Do the live nodes fit the pool's live workers plus one started again?"""
        if self.ray.util.get_current_placement_group() is not None:
            return True  # Ray moves a sweep trial's reservation to nodes that have room
        eng = self.engine
        fits = resources.pool_size(EngineConfig(cpus_per_worker=eng.cpus_per_worker,
                                                gpus_per_worker=eng.gpus_per_worker), self.ray.cluster_resources())
        return self.n_workers - len(self.retired) <= fits

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
        dispatch = Dispatch(self, phase, info, plan_chunks(client_ids, sizes, self.engine.chunk_clients), on_chunk,
                             checkpointed_round)
        try:
            return dispatch.run()
        except ServerLost:
            raise
        except lost_errors() as exc:
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
