"""One phase on the Ray backend's worker pool (engine.raybackend): chunks handed to workers, results
folded by the server in chunk order, chunks whose worker or node died run again.

Chunks are handed out in `plan_chunks` order to whichever worker has a free slot, never more than
a window of chunks past the oldest one not yet folded, so the server holds at most that many
early results. Within that window a worker first takes a chunk it ran in the previous phase (same
clients): a method may keep a chunk's intermediate results in the worker between its phases
(FedACnnL keeps each layer's inputs for the next layer), and only the worker that made them can
use them.

A chunk runs again (counted, at most engine.max_retries times) when its worker died, and when its
result was lost before the server fetched it: a result lives in the object store of the worker's
node, and a whole node that dies takes it along. Its metric rows are sent once, by the first
attempt that finished; the retry's numbers are the same bits (engine.backends).

Ours, not from a paper.
"""

from __future__ import annotations

from simfed.algorithms import registry
from simfed.algorithms.base import RoundInfo
from simfed.core.errors import SimfedError
from simfed.engine.backends import OnChunk


def lost_errors() -> tuple:
    """What Ray raises for a task whose actor died."""
    from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError, WorkerCrashedError

    return (RayActorError, ActorDiedError, ActorUnavailableError, WorkerCrashedError)


class Dispatch:
    """One phase on the pool: hands chunks to workers, retries those whose worker died, and has the
    server fold each finished chunk (in chunk order, whatever the arrival order)."""

    def __init__(self, be, phase: str, info: RoundInfo, chunks: list[list[int]], on_chunk: OnChunk,
                 checkpointed_round: int):
        self.be, self.phase, self.info, self.chunks, self.on_chunk = be, phase, info, chunks, on_chunk
        self.checkpointed_round = checkpointed_round
        self.bcast_ref = be.server.begin.remote(phase, info)
        # Methods without per-client payloads (FedAvg) skip one server round trip per chunk.
        self.per_client = registry.get(be.spec.algorithm).capabilities.payloads or bool(info.starts)
        self.window = 2 * be.n_workers * max(1, be.engine.inflight_per_worker)
        self.inflight: dict = {}  # meta ref -> (worker, chunk index, data ref, payload ref, attempt, generation)
        self.per_worker = [0] * be.n_workers
        self.retry: list[tuple[int, int, object]] = []  # (chunk index, attempt, payload ref) to run again
        self.done = [False] * len(chunks)
        self.todo = list(range(len(chunks)))  # chunks not handed out yet, in order
        self.folded = 0  # chunks done in an unbroken run from index 0
        self.keys = [tuple(c) for c in chunks]
        self.ran_before, self.ran_now = be._ran, {}  # chunk clients -> worker, previous phase and this one
        self.acks: dict = {}  # server receive ref -> (chunk index, attempt, payload ref)
        self.reported = [False] * len(chunks)  # metric rows sent: a chunk run again sends none

    def run(self) -> dict[str, float]:
        ray = self.be.ray
        while self.inflight or self.retry or self.todo or self.acks:
            self.hand_out()
            ready, _ = ray.wait([*self.inflight, *self.acks], num_returns=1)
            for ref in ready:
                if ref in self.inflight:
                    self.collect(ref)
                else:
                    self.confirm(ref)
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
        live = [i for i in range(be.n_workers) if i not in be.retired]
        while self.retry or self.todo:
            w = min(live, key=lambda i: (self.per_worker[i], i))
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
        except lost_errors():
            if not be._server_alive():  # the task failed for want of the server's payload
                raise be._server_lost(self.inflight) from None
            if gen == be.generation[w] and attempt < be.engine.max_retries:
                be._replace_worker(w)  # or retires it
            self.again(index, attempt, payload_ref, f"worker {w} died")
            return
        self.acks[be.server.receive.remote(data_ref, self.phase, self.info, index)] = (index, attempt, payload_ref)
        self.done[index] = True
        while self.folded < len(self.chunks) and self.done[self.folded]:
            self.folded += 1
        if not self.reported[index]:
            self.reported[index] = True
            self.on_chunk(meta)

    def confirm(self, ref) -> None:
        """The server has a chunk's result, unless the result was lost with its node (the worker's
        whole node died before the server fetched it): then the chunk runs again."""
        from ray.exceptions import ObjectLostError

        index, attempt, payload_ref = self.acks.pop(ref)
        try:
            self.be.ray.get(ref)
        except ObjectLostError:
            self.done[index] = False
            self.folded = min(self.folded, index)
            self.again(index, attempt, payload_ref, "the node holding its result died")

    def again(self, index: int, attempt: int, payload_ref, why: str) -> None:
        """Queue chunk `index` to run again (counted), at most engine.max_retries times."""
        be = self.be
        if attempt >= be.engine.max_retries:
            raise SimfedError(f"clients {self.chunks[index][:5]}... were lost {attempt + 1} times ({why}); giving up "
                              f"(engine.max_retries = {be.engine.max_retries})")
        be._retries += 1
        self.retry.append((index, attempt + 1, payload_ref))
