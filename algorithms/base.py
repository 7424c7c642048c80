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
answers per client; `chunk_sums` answers a whole chunk with summed statistics only.

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

Differential privacy ([privacy], engine.privacy) needs a method to declare what it releases:
`capabilities.privacy` is a `PrivacySupport` (per train phase, the sums keys that form the update
the server releases; the engine clips each client's part and noises the sum, the method never
sees either) or a `NoPrivacy` that says in one line why no honest guarantee exists. A method
whose server computes per-client terms from items (PeFLL's hypernetwork gradient) returns them
from `absorb` when `info.private` is set, instead of accumulating them, so the engine can clip
each before summing; `privacy_zeros` gives the shape of every released key (a Poisson-sampled
cohort may be empty, and its noise still has to be drawn).

Randomness comes only from seeds derived (simfed.core.seeds.derive_seed) from the run seed and
the parts that identify a draw: `ClientContext.generator(...)` / `numpy_rng(...)` on clients and
`RoundInfo.generator(...)` on the server add (round, client id, phase); a method's initial state
derives its own from (run seed, a tag). Never a global generator.

Clients as they really are (the engine's [system] clock, engine/system.py): `work` says what one
client does in a training phase (samples, bytes each way), which is what its virtual duration is
made of. A straggler under `stragglers = "partial"` gets `ClientContext.budget` (the local steps
it finishes by the deadline) and a method that declared `partial = "steps"` trains only those; in
asynchronous (FedBuff) rounds `ClientContext.staleness` says how many server updates its start
model is behind, and a method that declared `asynchronous` weights its summable update by it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Mapping, Sequence

import numpy as np
import torch

from simfed.core.seeds import derive_seed

KEEP = "__simfed_keep_state__"  # Reply.state default: leave the client's persistent state as it is


@dataclass(frozen=True)
class Task:
    """What the data look like: input shape, number of classes, number of training clients, and how
    inputs reach the model (`PartitionStore.task_fields()` gives the data half).

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


@dataclass(frozen=True)
class PrivacySupport:
    """What [privacy] protects in a method, declared (engine.privacy does the clipping and noise).

    `released`: (train phase, sums keys) pairs: the keys that form the update the server releases
    in that phase. Per round, each client's contribution to every pair is clipped to L2 norm
    clip / sqrt(number of pairs) (so the whole round's contribution is at most `clip`), and the
    server adds Gaussian noise to each key's sum. Keys a method's server computes from items
    (returned by `absorb` under `info.private`) are named here too.
    `weight`: the sums key holding a client's weight (FedAvg's sample count): each released key is
    divided by it before clipping (the client's unweighted update), every client then weighs 1, and
    the server's sum holds the fixed denominator instead of the data-dependent total.
    `covers`: one line, what the guarantee covers (docs and `simfed algorithms NAME`).
    `no_local`: why local DP (each client noises its own report) cannot hold, where clients also
    send the server something un-noised (items); empty: local DP is supported."""

    released: tuple[tuple[str, tuple[str, ...]], ...]
    covers: str
    weight: str = "n"
    no_local: str = ""

    def keys(self, phase: str) -> tuple[str, ...]:
        return tuple(k for p, keys in self.released for k in (keys if p == phase else ()))

    @property
    def phases(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(p for p, _ in self.released))


@dataclass(frozen=True)
class NoPrivacy:
    """A method for which no honest client-level guarantee exists: `why`, one line, is the refusal."""

    why: str


@dataclass(frozen=True)
class Capabilities:
    """What a method does, declared once on its class. The engine reads this and nothing else about
    a method's shape: never its class hierarchy, never which hooks it overrides."""

    client_state: bool = False  # keeps per-client persistent state (engine-held, checkpointed)
    payloads: bool = False  # `payloads` sends per-client messages (else only the broadcast)
    # Train phases whose `chunk_replies` trains a whole chunk of clients at once and still returns
    # one Reply per client (used when `engine.vectorize` is on for the worker).
    chunk_replies: frozenset[str] = frozenset()
    # `chunk_sums` may answer a train phase for a whole chunk with the chunk's summed statistics
    # only (it returns None for a phase it does not cover); always used where it answers.
    chunk_sums: bool = False
    # What [privacy] protects (PrivacySupport), or why the method refuses it (NoPrivacy); None: the
    # method says nothing, and [privacy] is refused.
    privacy: PrivacySupport | NoPrivacy | None = None
    # Can run [run] aggregation = "fedbuff": one train phase whose `sums` are applied by `finish`,
    # no per-client payloads, and the summable update weighted by ClientContext.staleness.
    asynchronous: bool = False
    # What a straggler's update means under [system] stragglers = "partial": "steps" (it trains
    # ClientContext.budget local steps and its update counts), "drop" (treated as with
    # stragglers = "drop") or "refuse" (stragglers = "partial" is a config error).
    partial: str = "drop"


PARTIAL = ("steps", "drop", "refuse")


@dataclass(frozen=True)
class Work:
    """What one client does in one training phase, for the virtual clock: training samples and local
    steps (those `Reply.n_train` counts), and the bytes it receives and sends (what the engine
    counts in the metric rows: broadcast + payload down, sums + item up)."""

    samples: int = 0
    steps: int = 0
    bytes_down: int = 0
    bytes_up: int = 0


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
        inputs). Default: the client LeNet down (float32) and its change plus the float64 weight up
        (`update_sums`), and the `local_steps`/`local_epochs`/`batch_size` convention for samples
        (`training.batches`). A method whose messages or steps differ overrides this; the engine's
        tests check every method's prediction against its metric rows."""
        from simfed.algorithms.kit.workload import default_steps, lenet_bytes

        steps, samples = default_steps(cfg, n_train)
        model = lenet_bytes(task.input_shape, task.num_classes)
        return Work(samples=samples, steps=steps, bytes_down=model, bytes_up=model + 8)

    def warmup(self, cfg: Any, task: Task, device: torch.device) -> None:
        """Run once when a worker starts, outside any round: one tiny forward/backward/SGD step of
        the client model on zeros, so that round 1 does not pay torch's first-use costs (lazy
        kernel and allocator set-up, autograd's engine) and costs what round 2 costs. Default: the
        LeNet most methods train, at the method's batch size; a method with another client model
        overrides this. Touches no client, state or random stream."""
        from simfed.algorithms.kit.models import lenet_for

        try:
            model = lenet_for(task.input_shape, task.num_classes).to(device)
        except ValueError:  # a task LeNet cannot take: validate() reports it, nothing to warm
            return
        batch = max(1, int(getattr(cfg, "batch_size", 32)))
        x = torch.zeros((batch, *task.input_shape), device=device)
        y = torch.zeros(batch, dtype=torch.long, device=device)
        opt = torch.optim.SGD(model.parameters(), lr=0.0, momentum=0.9)
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        with torch.no_grad():
            model(x[:1])

    def validate(self, cfg: Any, task: Task) -> None:
        """Raise SimfedError for a config that cannot run on this task (called before any work)."""
        return None

    def validate_privacy(self, cfg: Any) -> None:
        """Raise SimfedError for a config whose release [privacy] cannot cover (called before any work,
        for methods declaring `capabilities.privacy`)."""
        return None

    def check_clients(self, cfg: Any, n_train: Mapping[int, int]) -> None:
        """Raise SimfedError for a config that cannot run on these clients ({client id: train samples},
        seen and unseen; called before any work, after `validate`)."""
        return None
