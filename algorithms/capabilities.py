"""What a method declares about itself (`Algorithm.capabilities`) and what it tells the engine's
clock (`Algorithm.work`): the engine reads these and nothing else about a method's shape, never
its class hierarchy or which hooks it overrides. Ours.

Differential privacy ([privacy], engine.privacy) needs a method to declare what it releases:
`capabilities.privacy` is a `PrivacySupport` (per train phase, the sums keys that form the update
the server releases; the engine clips each client's part and noises the sum, the method never
sees either) or a `NoPrivacy` that says in one line why no honest guarantee exists. A method
whose server computes per-client terms from items (PeFLL's hypernetwork gradient) returns them
from `absorb` when `info.private` is set, instead of accumulating them, so the engine can clip
each before summing; `privacy_zeros` gives the shape of every released key (a Poisson-sampled
cohort may be empty, and its noise still has to be drawn).

Clients as they really are (the engine's [system] clock, engine/system.py): `work` says what one
client does in a training phase (samples, bytes each way), which is what its virtual duration is
made of. A straggler under `stragglers = "partial"` gets `ClientContext.budget` (the local steps
it finishes by the deadline) and a method that declared `partial = "steps"` trains only those; in
asynchronous (FedBuff) rounds `ClientContext.staleness` says how many server updates its start
model is behind, and a method that declared `asynchronous` weights its summable update by it.

What a method needs of the client model (`ModelNeeds`) is checked before any work
(`kit.models.needs_problem`): the analytic methods need a chain of solvable layers, FedRep and
kNN-Per a separable head.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ModelNeeds:
    """What a method needs of the client model beyond building for the task (checked by the engine
    before any work, `kit.models.needs_problem`; a config-dependent need, such as a hypernetwork's
    generated-parameter budget, is the method's `validate`)."""

    # a plain chain of Conv2d / ReLU / MaxPool2d / Flatten / Linear layers, each linear in its weights
    # given its inputs (the analytic methods solve it layer by layer)
    chain: bool = False
    # a separable head: the model's `head` submodule, else its last Linear layer, whose parameters
    # come last in the model's parameter order (FedRep's local head, kNN-Per's features)
    head: bool = False
    # without a [model] table the method builds its own network from its config (FedACnnL's `layers`),
    # so the default model is not built or checked for it
    own_network: bool = False


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
    model: ModelNeeds = ModelNeeds()  # what the method needs of the client model
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
