"""Backends run one phase over a list of clients: in-process (serial) or on a Ray worker pool.

Both drive the same `Server` and `Worker` classes, so a serial run and a Ray run of any method
execute the same code; only the transport differs. The Ray backend puts the broadcast payload in
the object store once per phase, streams per-client payloads chunk by chunk (at most
`inflight_per_worker` chunks queued per worker), forwards each finished chunk straight from the
worker to the server actor (the driver only sees metric rows), and replaces a worker that died,
retrying its chunks (bounded, counted).

Bit-identical results whatever the pool: both backends cut the cohort into the same chunks
(`sampling.plan_chunks`, a function of the cohort alone), a worker sums a chunk's replies in
client order, and the server folds chunk results in chunk index order (`Server.receive`), so the
order of every float addition is fixed before any worker starts. Which worker runs a chunk, when
it finishes, and whether it ran twice (retry) cannot change a bit. Chunks are handed out in that
same order to whichever worker has a free slot, never more than `_window` chunks past the oldest
one not yet folded, so the server holds at most that many early results. Within that window a
worker first takes a chunk it ran in the previous phase (same clients): a method may keep a chunk's
intermediate results in the worker between its phases (FedACnnL keeps each layer's inputs for the
next layer), and only the worker that made them can use them.
"""

from __future__ import annotations

from typing import Callable, Sequence

from simfed.algorithms import registry
from simfed.algorithms.base import RoundInfo
from simfed.engine import resources
from simfed.engine.config import EngineConfig
from simfed.core.errors import SimfedError
from simfed.engine.sampling import plan_chunks
from simfed.engine.server import Server
from simfed.engine.worker import Worker, WorkerSpec

OnChunk = Callable[[dict], None]


class ServerLost(Exception):
    """The server actor died (its state with it); the loop restarts the run from the last checkpoint."""


class SerialBackend:
    """Everything in this process: the reference the Ray backend must agree with."""

    name = "serial"

    def __init__(self, spec: WorkerSpec, server_args: dict, engine: EngineConfig):
        self.server = Server(**server_args)
        self.worker = Worker(spec, 0)
        self.n_workers = 1
        self.chunk = engine.chunk_clients
        self.retries = 0

    def call(self, method: str, *args):
        return getattr(self.server, method)(*args)

    def workers_info(self) -> list[dict]:
        return [self.worker.describe()]

    def check_storage(self, root: str, storage: str) -> None:
        pass  # one process on one machine sees its own disk

    def run_phase(self, phase: str, info: RoundInfo, client_ids: Sequence[int], sizes: dict, on_chunk: OnChunk,
                  checkpointed_round: int) -> dict:
        bcast = self.server.begin(phase, info)
        for index, chunk in enumerate(plan_chunks(client_ids, sizes, self.chunk)):
            payloads = self.server.payloads(phase, info, chunk)
            meta, result = self.worker.run(phase, info, bcast, payloads, chunk, checkpointed_round)
            self.server.receive(result, phase, info, index)
            on_chunk(meta)
        return self.server.end(phase, info)

    def shutdown(self) -> None:
        pass


def _unwrap(exc: Exception) -> Exception:
    """A user error raised inside an actor comes back wrapped; surface the original one-liner."""
    cause = getattr(exc, "cause", None)
    if isinstance(cause, SimfedError):
        return SimfedError(str(cause))
    return exc


class _PooledServer:
    """Actor body: a Server that can be set up again for the next run without a new process."""

    def setup(self, server_args: dict) -> int:
        import os

        self.server = Server(**server_args)
        return os.getpid()

    def call(self, method: str, *args):
        return getattr(self.server, method)(*args)

    def release(self) -> None:
        self.server = None

    def pid(self) -> int:
        import os

        return os.getpid()


class _PooledWorker:
    """Actor body: a Worker that can be set up again for the next run without a new process."""

    def setup(self, spec: WorkerSpec, index: int) -> dict:
        import ray

        self.worker = Worker(spec, index)
        # Where Ray put this actor: a sweep checks that its trial's workers sit in the trial's reservation.
        return {**self.worker.describe(), "placement_group": ray.get_runtime_context().get_placement_group_id() or ""}

    def sees_marker(self, root: str, token: str) -> bool:
        from simfed.engine.storage import sees_marker

        return sees_marker(root, token)

    def run(self, *args):
        return self.worker.run(*args)

    def release(self) -> None:
        self.worker = None


# Actors outlive a run: starting a Ray actor costs seconds (a process that imports torch), so
# runs in one driver process reuse them. Keyed by the job, the placement group (if any) and the
# resources each worker asks for.
_POOL: dict[tuple, list] = {}
PLACEMENT_TIMEOUT_S = 300
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


class RayBackend:
    name = "ray"

    def __init__(self, spec: WorkerSpec, server_args: dict, engine: EngineConfig):
        import ray

        self.ray = ray
        self.engine = engine
        self.spec = spec
        pg = ray.util.get_current_placement_group()
        if pg is not None:  # a sweep trial: one worker per reserved bundle
            n = engine.workers or pg.bundle_count
        else:  # fail now, not after the placement timeout, when the pool cannot fit
            n = resources.check(engine, ray.cluster_resources(), "the Ray cluster")
        self.n_workers = n
        self.retries = 0
        pg = ray.util.get_current_placement_group()
        self._key = (ray.get_runtime_context().get_job_id(), pg.id.hex() if pg else "", engine.cpus_per_worker,
                     engine.gpus_per_worker)
        for key in [k for k in _POOL if k != self._key]:
            # Workers of another shape would hold resources this pool may need.
            for actor in _POOL.pop(key):
                ray.kill(actor)
        pool = _POOL.setdefault(self._key, [])
        while len(pool) < n:
            pool.append(self._start_worker(len(pool)))
        self.workers = pool[:n]
        if not _SERVERS or _SERVERS[0][0] != self._key[:2]:
            # The server's work is light next to the clients'; it must not take a worker's CPU slot.
            _SERVERS[:] = [(self._key[:2], ray.remote(_PooledServer).options(num_cpus=0, **_placement(ray, -1)).remote())]
        self.server = _SERVERS[0][1]
        self.generation = [0] * n
        self._ran: dict = {}  # chunk clients -> the worker that ran them in the last phase
        try:
            ray.get(self.server.setup.remote(server_args))
            self._info = ray.get([w.setup.remote(spec, i) for i, w in enumerate(self.workers)],
                                 timeout=PLACEMENT_TIMEOUT_S)
        except ray.exceptions.GetTimeoutError:
            raise SimfedError(f"{n} workers with {engine.cpus_per_worker} CPUs and {engine.gpus_per_worker} GPUs each "
                              f"could not be placed within {PLACEMENT_TIMEOUT_S} s; the cluster has "
                              f"{ray.available_resources()} free: lower engine.workers or the per-worker resources")
        except Exception as exc:
            raise _unwrap(exc) from None

    def _start_worker(self, index: int):
        return self.ray.remote(_PooledWorker).options(num_cpus=self.engine.cpus_per_worker,
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

    def call(self, method: str, *args):
        from ray.exceptions import RayActorError

        try:
            return self.ray.get(self.server.call.remote(method, *args))
        except RayActorError:
            if not self._server_alive():
                raise self._server_lost() from None
            raise
        except Exception as exc:
            raise _unwrap(exc) from None

    def workers_info(self) -> list[dict]:
        return list(self._info)

    def run_phase(self, phase: str, info: RoundInfo, client_ids: Sequence[int], sizes: dict, on_chunk: OnChunk,
                  checkpointed_round: int) -> dict:
        ray = self.ray
        from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError, WorkerCrashedError

        lost = (RayActorError, ActorDiedError, ActorUnavailableError, WorkerCrashedError)
        server = self.server.call
        bcast_ref = server.remote("begin", phase, info)
        # Methods without per-client payloads (FedAvg) skip one server round trip per chunk.
        per_client = registry.get(self.spec.algorithm).capabilities.payloads
        chunks = plan_chunks(client_ids, sizes, self.engine.chunk_clients)
        window = 2 * self.n_workers * max(1, self.engine.inflight_per_worker)
        inflight: dict = {}  # meta ref -> (worker, chunk index, data ref, payload ref, attempt, generation)
        per_worker = [0] * self.n_workers
        retry: list[tuple[int, int, object]] = []  # (chunk index, attempt, payload ref) to run again
        done = [False] * len(chunks)
        todo = list(range(len(chunks)))  # chunks not handed out yet, in order
        folded = 0  # chunks done in an unbroken run from index 0
        keys = [tuple(c) for c in chunks]
        ran_before, ran_now = self._ran, {}  # chunk clients -> worker, previous phase and this one
        acks = []

        def pick(w: int) -> int | None:
            """The first chunk in the window that w ran last phase, else the first in the window."""
            first = None
            for i in todo:
                if i >= folded + window:
                    break
                if ran_before.get(keys[i]) == w:
                    return i
                first = i if first is None else first
            return first

        def submit(w: int, index: int, attempt: int, payload_ref=None) -> None:
            chunk = chunks[index]
            if payload_ref is None and per_client:
                payload_ref = server.remote("payloads", phase, info, chunk)
            meta_ref, data_ref = self.workers[w].run.options(num_returns=2).remote(
                phase, info, bcast_ref, payload_ref, chunk, checkpointed_round)
            inflight[meta_ref] = (w, index, data_ref, payload_ref, attempt, self.generation[w])
            per_worker[w] += 1
            ran_now[keys[index]] = w

        try:
            while inflight or retry or todo:
                while retry or todo:
                    w = min(range(self.n_workers), key=lambda i: (per_worker[i], i))
                    if per_worker[w] >= self.engine.inflight_per_worker:
                        break
                    if retry:
                        submit(w, *retry.pop(0))
                        continue
                    index = pick(w)
                    if index is None:  # the window is full
                        break
                    todo.remove(index)
                    submit(w, index, 0)
                ready, _ = ray.wait(list(inflight), num_returns=1)
                for ref in ready:
                    w, index, data_ref, payload_ref, attempt, gen = inflight.pop(ref)
                    per_worker[w] -= 1
                    try:
                        meta = ray.get(ref)
                    except lost:
                        if not self._server_alive():  # the task failed for want of the server's payload
                            raise self._server_lost(inflight) from None
                        if attempt >= self.engine.max_retries:
                            raise SimfedError(f"worker {w} died {attempt + 1} times running clients "
                                              f"{chunks[index][:5]}...; giving up "
                                              f"(engine.max_retries = {self.engine.max_retries})")
                        if gen == self.generation[w]:
                            self._replace_worker(w)
                        self.retries += 1
                        retry.append((index, attempt + 1, payload_ref))
                        continue
                    acks.append(server.remote("receive", data_ref, phase, info, index))
                    done[index] = True
                    while folded < len(chunks) and done[folded]:
                        folded += 1
                    on_chunk(meta)
            ray.get(acks)
            self._ran = ran_now
            return ray.get(server.remote("end", phase, info))
        except ServerLost:
            raise
        except lost as exc:
            if not self._server_alive():
                raise self._server_lost(inflight) from None
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


def make_backend(kind: str, spec: WorkerSpec, server_args: dict, engine: EngineConfig):
    if kind == "serial":
        return SerialBackend(spec, server_args, engine)
    if kind == "ray":
        return RayBackend(spec, server_args, engine)
    raise SimfedError(f"unknown engine.backend {kind!r}; use \"ray\" or \"serial\"")
