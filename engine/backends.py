"""Backends run one phase of a method over a list of clients: in-process (serial) or on a Ray pool.

`Backend` is the whole interface the round loop and `evaluate` use. Both implementations drive
the same `Server` and `Worker` classes, so a serial run and a Ray run of any method execute the
same code; only the transport differs (the Ray one is in engine.raybackend).

Bit-identical results whatever the pool: both backends cut the cohort into the same chunks
(`sampling.plan_chunks`, a function of the cohort alone), a worker sums a chunk's replies in
client order, and the server folds chunk results in chunk index order (`Server.receive`), so the
order of every float addition is fixed before any worker starts. Which worker runs a chunk, when
it finishes, and whether it ran twice (retry) cannot change a bit.
"""

from __future__ import annotations

import abc
from typing import Any, Callable, ClassVar, NamedTuple, Sequence

from simfed.algorithms.base import RoundInfo
from simfed.core.errors import SimfedError
from simfed.engine.config import EngineConfig, Experiment
from simfed.engine.plan import Plan
from simfed.engine.sampling import plan_chunks
from simfed.engine.server import Server
from simfed.engine.worker import Worker, WorkerSpec

OnChunk = Callable[[dict], None]


class ServerLost(Exception):
    """The server actor died (its state with it); the loop restarts the run from the last checkpoint."""


class ServerMemory(NamedTuple):
    rss: int  # resident set of the server's process
    private: int  # less the shared object-store pages Ray maps into it: what the state costs


class Backend(abc.ABC):
    """Where a run's server and workers live. One backend serves one run (or one evaluation);
    `shutdown` (or leaving a `with` block) ends it."""

    name: ClassVar[str]
    n_workers: int

    def __init__(self) -> None:
        self._retries = 0

    @abc.abstractmethod
    def phases(self, mode: str, key: Any) -> list[str]:
        """The method's phases: of training round `key` (mode "train"), or of evaluating cohort `key`
        ("seen" or "unseen", mode "eval")."""

    @abc.abstractmethod
    def run_phase(self, phase: str, info: RoundInfo, client_ids: Sequence[int], sizes: dict, on_chunk: OnChunk,
                  checkpointed_round: int) -> dict[str, float]:
        """Run `phase` on every client of `client_ids`, cut into chunks by `sizes` (each client's cost);
        `on_chunk(meta)` gets each finished chunk's metric rows. Returns the server's statistics."""

    @abc.abstractmethod
    def state_dict(self, final: bool) -> dict:
        """The server state to checkpoint (`final`: the model only, no optimizer state)."""

    @abc.abstractmethod
    def server_memory(self) -> ServerMemory:
        ...

    @abc.abstractmethod
    def server_pid(self) -> int:
        ...

    @abc.abstractmethod
    def workers_info(self) -> list[dict]:
        """One dict per worker (Worker.describe): pid, node, device, threads, ..."""

    @abc.abstractmethod
    def check_storage(self, root: str, storage: str) -> None:
        """Raise SimfedError unless every worker reaches the client-state root."""

    def take_retries(self) -> int:
        """Chunks run again (their worker died) since the last call."""
        n, self._retries = self._retries, 0
        return n

    @abc.abstractmethod
    def shutdown(self) -> None:
        ...

    def __enter__(self) -> "Backend":
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()


class SerialBackend(Backend):
    """Everything in this process: the reference the Ray backend must agree with."""

    name = "serial"

    def __init__(self, spec: WorkerSpec, server_args: dict, engine: EngineConfig):
        super().__init__()
        self.server = Server(**server_args)
        self.worker = Worker(spec, 0)
        self.n_workers = 1
        self.chunk = engine.chunk_clients

    def phases(self, mode: str, key: Any) -> list[str]:
        return self.server.phases(mode, key)

    def run_phase(self, phase: str, info: RoundInfo, client_ids: Sequence[int], sizes: dict, on_chunk: OnChunk,
                  checkpointed_round: int) -> dict[str, float]:
        bcast = self.server.begin(phase, info)
        for index, chunk in enumerate(plan_chunks(client_ids, sizes, self.chunk)):
            payloads = self.server.payloads(phase, info, chunk)
            meta, result = self.worker.run(phase, info, bcast, payloads, chunk, checkpointed_round)
            self.server.receive(result, phase, info, index)
            on_chunk(meta)
        return self.server.end(phase, info)

    def state_dict(self, final: bool) -> dict:
        return self.server.state_dict(final)

    def server_memory(self) -> ServerMemory:
        return ServerMemory(self.server.memory_bytes(), self.server.private_memory_bytes())

    def server_pid(self) -> int:
        return self.server.pid()

    def workers_info(self) -> list[dict]:
        return [self.worker.describe()]

    def check_storage(self, root: str, storage: str) -> None:
        pass  # one process on one machine sees its own disk

    def shutdown(self) -> None:
        pass


def open_backend(exp: Experiment, plan: Plan, state_dir: str, server_state: dict | None = None,
                 kind: str | None = None) -> Backend:
    """The backend for `exp` (engine.backend, or `kind`), its server at `server_state` (a checkpoint's)
    or freshly initialized, its workers reading `plan`'s store and keeping client state in `state_dir`."""
    eng = exp.engine
    spec = WorkerSpec(store_path=plan.store.path, algorithm=exp.algorithm, cfg=exp.algorithm_config, task=plan.task,
                      seed=exp.run.seed, state_dir=state_dir, threads=max(1, int(eng.cpus_per_worker)),
                      use_gpu=eng.gpus_per_worker > 0, vectorize=eng.vectorize, privacy=plan.privacy)
    # The server computes with as many threads as a worker on both backends: a reduction split
    # over a different thread count can round differently.
    server_args = dict(algorithm=exp.algorithm, cfg=exp.algorithm_config, task=plan.task, seed=exp.run.seed,
                       state_dict=server_state, threads=spec.threads, privacy=plan.privacy)
    kind = kind or eng.backend
    if kind == "serial":
        return SerialBackend(spec, server_args, eng)
    if kind == "ray":
        from simfed.engine.raybackend import RayBackend

        return RayBackend(spec, server_args, eng)
    raise SimfedError(f"unknown engine.backend {kind!r}; use \"ray\" or \"serial\"")
