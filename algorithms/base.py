"""The algorithm protocol: the one seam between a method's math and the engine's plumbing.

A method is one module that defines a frozen config dataclass and an `Algorithm` subclass, and
registers it (`simfed.algorithms.registry.register`). The engine never imports a method by name.

A round is an ordered list of **phases** (one communication exchange each). For every phase:

  server (engine.server.Server, in the server actor or in-process)
    bcast  = algo.broadcast(phase, cfg, state, info)           -> sent to all clients (ray.put once)
    per    = algo.payloads(phase, cfg, state, client_ids, info) -> {client_id: payload} or None,
                                                                  produced in one batched call per chunk
  client (engine.worker.Worker, in a worker actor or in-process)
    reply  = algo.client(phase, cfg, bcast, payload, data, cstate, ctx)
  server
    algo.absorb(phase, cfg, state, client_id, reply.item, info)  for every per-client item, as it arrives
    algo.finish(phase, cfg, state, sums, n_clients, info)        once, with reply.sums added over clients

`Reply.sums` are summable messages (the engine pre-sums them inside each worker and again on
the server, so memory is O(model), never O(cohort x model)); float64 stays float64, which is what
the least-squares Gram accumulators need. Sums are added, and `absorb` is called, in one fixed
order (chunk order, then client order within a chunk) that depends on the cohort alone, never
on workers or timing, so a method's results are bit-identical on any backend and pool.
`Reply.item` is a per-client message for methods whose server step is per client (a
hypernetwork's vector-Jacobian product at that client's input). A reply whose tensors are not all
finite is dropped by the engine and counted, never absorbed.

A method declares what it does in `capabilities` (client state, per-client payloads, and which
train phases have a chunk step): `chunk_replies` trains a chunk of clients at once and still
answers per client; `chunk_sums` answers a whole chunk with summed statistics only. The
declarations (and what [privacy], [system] and [model] need of a method) live in
algorithms/capabilities.py and are re-exported here.

Evaluation is phases too (`eval_phases`): PeFLL needs a descriptor exchange before it can hand a
client its zero-shot model, pFedHN fits an embedding for an unseen client, FedAvg needs one. The
replies of the last eval phase carry `evals` (split -> Eval); the engine turns them into metric
rows. `finish` runs after eval phases too (`info.mode == "eval"`), so a method that fitted
something for evaluation (pFedHN's unseen embeddings) can clear it. Evaluation never changes
client state (the engine ignores `state` in eval replies), so how often a run evaluates cannot
change its training.

Server state is any object with `state_dict()`/`load_state_dict()`; `ServerState` below gives
that for attributes holding modules, optimizers, tensors and plain values. Attributes whose name
starts with `_` are round scratch and are not checkpointed (checkpoints fall between rounds).

Randomness comes only from seeds derived (simfed.core.seeds.derive_seed) from the run seed and
the parts that identify a draw: `ClientContext.generator(...)` / `numpy_rng(...)` on clients and
`RoundInfo.generator(...)` on the server add (round, client id, phase); a method's initial state
derives its own from (run seed, a tag). Never a global generator.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Mapping, Sequence

import numpy as np
import torch

from simfed.algorithms.capabilities import (PARTIAL, Capabilities, ModelNeeds, NoPrivacy,  # noqa: F401
                                           PrivacySupport, Work)
from simfed.core.seeds import derive_seed

KEEP = "__simfed_keep_state__"  # Reply.state default: leave the client's persistent state as it is


@dataclass(frozen=True)
class ModelSpec:
    """Which client network a run trains (the [model] table): a built-in name, an entry point of the
    `simfed.models` group, or "package.module:factory", and the table's other keys as sorted
    (key, value) pairs, lists as tuples, so that the spec is hashable. `kit.models.build(task)`
    turns it into a module; the default is the LeNet every method trained before models existed."""

    name: str = "lenet"
    options: tuple[tuple[str, Any], ...] = ()

    @property
    def kwargs(self) -> dict[str, Any]:
        return dict(self.options)


@dataclass(frozen=True)
class Task:
    """What the data look like: input shape, number of classes, number of training clients, how
    inputs reach the model (`PartitionStore.task_fields()` gives the data half), and which model
    the run trains (the engine adds the experiment's [model]).

    `input_shape` is one sample's shape: (C, H, W) for images, (L,) for a token sequence, (D,) for
    features. `dtype` is how the store keeps it ("uint8", "int32", "float32"); `input` is what
    `ClientData` hands the model: "unit" float32 x / 255 (images), "raw" float32 values, "tokens"
    int64 ids in 0..len(vocab)-1 (for an embedding); `vocab` lists the token strings."""

    input_shape: tuple[int, ...]
    num_classes: int
    num_clients: int = 0  # seen (training) clients; sizes per-client tables such as embeddings
    total_clients: int = 0  # seen + unseen clients of the store (PeFLL/pFedHN size embeddings by it)
    dtype: str = "uint8"
    input: str = "unit"
    vocab: tuple[str, ...] = ()
    model: ModelSpec = ModelSpec()


@dataclass(frozen=True)
class RoundInfo:
    """Where the run is: passed to every server-side call.

    The last three are set by the engine's [system] clock only (empty otherwise): `budgets`, the
    (client id, local steps) of stragglers that train part of their work; `starts`, in an
    asynchronous round, the (client id, model version) each client started from (the engine hands
    each client the broadcast of its version); `keep_from`, the oldest model version a later
    asynchronous round still needs."""

    round: int
    seed: int
    mode: str = "train"  # "train" or "eval"
    cohort: str = "seen"  # which clients this pass is over: "seen" or "unseen"
    phase_index: int = 0
    private: bool = False  # a training pass of a run with [privacy]: the engine clips and noises the release
    budgets: tuple[tuple[int, int], ...] = ()
    starts: tuple[tuple[int, int], ...] = ()
    keep_from: int = 0

    def generator(self, *tags: Any) -> torch.Generator:
        return torch.Generator().manual_seed(derive_seed(self.seed, self.round, self.mode, "server", *tags))

    def budget(self, client_id: int) -> int | None:
        return dict(self.budgets).get(int(client_id))

    def staleness(self, client_id: int) -> int:
        """Server updates between the model a client started from and the one its update goes into."""
        start = dict(self.starts).get(int(client_id))
        return 0 if start is None else self.round - start


@dataclass(frozen=True)
class Eval:
    """Evaluation of one client on one split: sample count, summed loss, correct predictions."""

    n: int
    loss_sum: float
    correct: int


@dataclass
class Reply:
    sums: dict[str, Any] | None = None
    item: Any = None
    state: Any = KEEP
    evals: dict[str, Eval] | None = None
    n_train: int = 0  # samples processed in training (for throughput and weighting)
    # Mean training loss over this client's local steps (train mode; None where a method has no loss,
    # e.g. closed-form least squares). Meta-methods report the query loss after the inner steps.
    # Only logged in the train rows: it never reaches the server, so it cannot change any number.
    train_loss: float | None = None


@dataclass
class ChunkSums:
    """The replies of a whole chunk of clients computed together (`Algorithm.chunk_sums`):
    `sums`, the chunk's statistics summed over its clients; per client j, `n_train[j]` samples
    processed and `dropped[j]` True if its contribution was non-finite and left out of `sums`
    (the engine counts it as a dropped reply, as for `client`)."""

    sums: dict[str, Any] | None
    n_train: list[int]
    dropped: list[bool]


class ClientData:
    """One client's data, loaded lazily per split onto the device, as `input` (Task.input) says:
    "unit" float32 x / 255 in [0, 1] (images), "raw" float32 values, "tokens" int64 ids."""

    def __init__(self, client_id: int, cohort: str, reader: Callable[[int, str], tuple[np.ndarray, np.ndarray]],
                 device: torch.device | str = "cpu", counts: Mapping[str, int] | None = None, input: str = "unit"):
        if input not in ("unit", "raw", "tokens"):
            raise ValueError(f"ClientData: input must be 'unit', 'raw' or 'tokens', got {input!r}")
        self.client_id = client_id
        self.cohort = cohort
        self.device = torch.device(device)
        self.input = input
        self._reader = reader
        self._counts = dict(counts or {})
        self._cache: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def split(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        if name not in self._cache:
            x, y = self._reader(self.client_id, name)
            # Converted once per client and split; the store hands out read-only memory-mapped views,
            # so each path copies (np.asarray of uint8 to float32 does; np.array always does).
            if self.input == "unit":
                xt = torch.from_numpy(np.asarray(x, dtype=np.float32)).to(self.device).div_(255.0)
            elif self.input == "raw":
                xt = torch.from_numpy(np.array(x, dtype=np.float32)).to(self.device)
            else:
                xt = torch.from_numpy(np.array(x, dtype=np.int64)).to(self.device)
            yt = torch.from_numpy(np.array(y, dtype=np.int64)).to(self.device)
            self._cache[name] = (xt, yt)
        return self._cache[name]

    def release(self) -> None:
        """Drop the converted splits. A worker calls this after each client's step: holding a whole
        chunk's float copies would make every client's conversion fault in fresh pages instead of
        reusing the previous client's memory (about 12% of a FEMNIST epoch-round on CPU)."""
        self._cache.clear()

    def n(self, name: str) -> int:
        if name in self._counts:
            return int(self._counts[name])
        return int(self.split(name)[1].shape[0])


@dataclass
class ClientContext:
    """Everything a client step may use besides its data and state."""

    client_id: int
    cohort: str
    round: int
    seed: int
    phase: str
    mode: str
    task: Task
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    cache: dict = field(default_factory=dict)  # per worker, lives across clients and rounds
    # A straggler's local steps (None: all of them): what it finishes by the deadline
    # (stragglers = "partial"; only for methods declaring partial = "steps").
    budget: int | None = None
    staleness: int = 0  # asynchronous rounds: server updates its start model is behind

    def _seed(self, tags: tuple) -> int:
        return derive_seed(self.seed, self.round, self.mode, self.client_id, self.phase, *tags)

    def generator(self, *tags: Any) -> torch.Generator:
        return torch.Generator().manual_seed(self._seed(tags))

    def numpy_rng(self, *tags: Any) -> np.random.Generator:
        return np.random.default_rng(self._seed(tags))

    def module(self, key: Any, build: Callable[[], torch.nn.Module]) -> torch.nn.Module:
        """A worker-local module instance, built once and reused (one copy of each model per worker)."""
        if key not in self.cache:
            self.cache[key] = build().to(self.device)
        return self.cache[key]


class ServerState:
    """Server state whose public attributes are modules, optimizers, tensors or plain values."""

    def state_dict(self) -> dict:
        out = {}
        for k, v in vars(self).items():
            if k.startswith("_"):
                continue
            out[k] = v.state_dict() if hasattr(v, "state_dict") else v
        return out

    def load_state_dict(self, sd: Mapping[str, Any]) -> None:
        for k, v in sd.items():
            cur = getattr(self, k, None)
            if hasattr(cur, "load_state_dict"):
                cur.load_state_dict(v)
            else:
                setattr(self, k, v)


class Algorithm:
    """Base class of every method. Subclasses set `name`, `Config`, `capabilities` and the hooks."""

    name: ClassVar[str] = ""
    Config: ClassVar[type] = object
    summary: ClassVar[str] = ""
    capabilities: ClassVar[Capabilities] = Capabilities()

    # --- server side -------------------------------------------------------------------
    def init(self, cfg: Any, task: Task, seed: int) -> ServerState:
        raise NotImplementedError

    def train_phases(self, cfg: Any, state: Any, round: int) -> Sequence[str]:
        raise NotImplementedError

    def eval_phases(self, cfg: Any, state: Any, cohort: str) -> Sequence[str]:
        raise NotImplementedError

    def broadcast(self, phase: str, cfg: Any, state: Any, info: RoundInfo) -> Any:
        return None

    def payloads(self, phase: str, cfg: Any, state: Any, client_ids: Sequence[int],
                 info: RoundInfo) -> Mapping[int, Any] | None:
        return None

    def absorb(self, phase: str, cfg: Any, state: Any, client_id: int, item: Any,
               info: RoundInfo) -> Mapping[str, Any] | None:
        """Take one client's item. Under `info.private`, a method whose released update has terms the
        server computes per client returns them ({key: tensor}, keys of `capabilities.privacy`)
        instead of accumulating them; the engine clips them and adds them to the phase's sums."""
        return None

    def finish(self, phase: str, cfg: Any, state: Any, sums: Mapping[str, Any], n_clients: int,
               info: RoundInfo) -> Mapping[str, float] | None:
        """Close a phase; may return server-side scalars (logged with the round)."""
        return None

    def privacy_zeros(self, phase: str, cfg: Any, state: Any) -> Mapping[str, torch.Tensor]:
        """Zeros shaped (and typed) like each released key of `phase` (capabilities.privacy): the
        server noises them when no client contributed (a Poisson-sampled cohort can be empty)."""
        raise NotImplementedError(f"{self.name} declares privacy support but no privacy_zeros")

    # --- client side ---------------------------------------------------------------------
    def client(self, phase: str, cfg: Any, bcast: Any, payload: Any, data: ClientData, cstate: Any,
               ctx: ClientContext) -> Reply:
        raise NotImplementedError

    def chunk_replies(self, phase: str, cfg: Any, bcast: Any, payloads: Sequence[Any], datas: Sequence[ClientData],
                      cstates: Sequence[Any], ctxs: Sequence[ClientContext]) -> list[Reply]:
        """The client step for a whole chunk of clients, one Reply per client (same order in, same
        order out): each client keeps its own reply, state and metric row. Called for the phases in
        `capabilities.chunk_replies` when `engine.vectorize` is on for the worker; a method overrides
        it with a batched computation equal to the loop up to round-off (kit/vectorized.py).
        Default: one `client` call each."""
        return [self.client(phase, cfg, bcast, p, d, s, c) for p, d, s, c in zip(payloads, datas, cstates, ctxs)]

    def chunk_sums(self, phase: str, cfg: Any, bcast: Any, clients: Sequence[tuple[ClientData, ClientContext]],
                   ) -> ChunkSums | None:
        """A training phase for a whole chunk of clients, answered with the chunk's summed
        statistics only (no payloads, items or client state), for methods declaring
        `capabilities.chunk_sums`. The sums must equal, up to round-off, the sum of the `client`
        replies of the same clients; they may depend on the chunk's clients and their order (a
        chunk is fixed by the engine). None: the engine calls `client` per client instead."""
        return None

    # --- helpers -------------------------------------------------------------------------
    def cost(self, cfg: Any, n_train: int) -> float:
        """Relative work of one client, used to balance workers. A method with a fixed number of
        local steps costs the same for every client however much data it has; by default the
        `local_steps`/`local_epochs`/`batch_size` keys are read when present, else n_train counts."""
        steps = getattr(cfg, "local_steps", None)
        if steps is None:
            return float(n_train)
        epochs, batch = getattr(cfg, "local_epochs", 0.0), getattr(cfg, "batch_size", 32)
        if epochs > 0:
            return float(max(1, math.ceil(epochs * n_train / batch)))
        return float(steps)

    def work(self, phase: str, cfg: Any, task: Task, n_train: int) -> Work:
        """What a client with `n_train` train samples does in training phase `phase` (the clock's
        inputs). Default: the client model down (float32) and its change plus the float64 weight up
        (`update_sums`), and the `local_steps`/`local_epochs`/`batch_size` convention for samples
        (`training.batches`). A method whose messages or steps differ overrides this; the engine's
        tests check every method's prediction against its metric rows."""
        from simfed.algorithms.kit.workload import default_steps, model_bytes

        steps, samples = default_steps(cfg, n_train)
        model = model_bytes(task)
        return Work(samples=samples, steps=steps, bytes_down=model, bytes_up=model + 8)

    def warmup(self, cfg: Any, task: Task, device: torch.device) -> None:
        """Run once when a worker starts, outside any round: one tiny forward/backward/SGD step of
        the client model on zeros, so that round 1 does not pay torch's first-use costs (lazy
        kernel and allocator set-up, autograd's engine) and costs what round 2 costs. Default: the
        task's model (`kit.models.build`) most methods train, at the method's batch size; a method
        with another client model overrides this. Touches no client, state or random stream."""
        from simfed.algorithms.kit import models
        from simfed.algorithms.kit.sgd import SGD
        from simfed.core.errors import SimfedError

        try:
            model = models.build(task).to(device)
        except (SimfedError, ValueError):  # a task the model cannot take: validation reports it
            return
        x = models.dummy_input(task, max(1, int(getattr(cfg, "batch_size", 32))), device)
        y = torch.zeros(x.shape[0], dtype=torch.long, device=device)
        opt = SGD(model.parameters(), lr=0.0, momentum=0.9)
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        with torch.no_grad():
            model(x[:1])

    def validate(self, cfg: Any, task: Task) -> None:
        """Raise SimfedError for a config that cannot run on this task (called before any work)."""
        return None

    def keeps_client_state(self, cfg: Any) -> bool:
        """Whether a run with `cfg` writes client state (so a multi-node cluster needs engine.storage).
        Default: the class's `capabilities.client_state`; a method whose state depends on an option
        narrows it here."""
        return self.capabilities.client_state

    def validate_privacy(self, cfg: Any) -> None:
        """Raise SimfedError for a config whose release [privacy] cannot cover (called before any work,
        for methods declaring `capabilities.privacy`)."""
        return None

    def check_clients(self, cfg: Any, n_train: Mapping[int, int]) -> None:
        """Raise SimfedError for a config that cannot run on these clients ({client id: train samples},
        seen and unseen; called before any work, after `validate`)."""
        return None
