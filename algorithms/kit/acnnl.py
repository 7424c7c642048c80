"""The layer-wise least-squares method of FedACnnL, as one piece that FedACnnL and pFedACnnL compose.

`AnalyticFields` are the config keys both methods share (their meaning is in fedacnnl.py);
`LayerwiseMethod` is the server and client side of the layer phases: one phase "layer{i}" per
solved layer, bottom-up, in which every selected client sends A_i = X_i^T X_i and b_i = X_i^T T_i
of the layer (float64 summable sums; `chunk_sums` stacks a worker's whole chunk into one sample
set) and `finish` solves W = (sum A_i + gamma I)^{-1} sum b_i. A method adds its evaluation
(`evaluate`) and whatever else it needs. The geometry, forward pass and statistics are
kit/analytic.py's.

Seeds: the initial hidden weights and the hidden-layer label projections come from
derive_seed(run seed, "analytic-init"); a round's client subset (`selected`) from
derive_seed(run seed, round, client id, "client-fraction") so that every layer phase of a round
uses the same clients; the kept patch positions from `RoundInfo.generator("patches", layer)`.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
from torch.nn import functional as F

from simfed.algorithms.base import (Algorithm, ChunkSums, ClientContext, ClientData, Eval, Reply, RoundInfo,
                                    ServerState, Task, Work)
from simfed.algorithms.kit import analytic
from simfed.algorithms.kit.workload import FLOAT64, tensor_bytes
from simfed.core.errors import SimfedError
from simfed.core.seeds import derive_seed

MAX_D = 8192  # a d x d float64 Gram of 512 MiB; larger layers would not fit a worker comfortably
DTYPES = ("float64", "float32")


@dataclass(frozen=True)
class AnalyticFields:
    layers: tuple[str, ...] = analytic.LENET
    gamma: float = 1.0
    hidden: str = "projection"
    activation: str = "relu"
    pool: int = 2
    patches_per_image: int = 0
    forward_dtype: str = "float64"
    gram_dtype: str = "float64"
    client_fraction: float = 1.0

    def __post_init__(self):
        if isinstance(self.layers, str):
            raise ValueError(f"layers must be a list of layer names such as {list(analytic.LENET)}, got {self.layers!r}")
        if isinstance(self.layers, list):
            object.__setattr__(self, "layers", tuple(self.layers))
        analytic.check_tokens(self.layers)
        if not (self.gamma >= 0 and math.isfinite(self.gamma)):
            raise ValueError(f"gamma must be a finite number >= 0, got {self.gamma}")
        if self.hidden not in ("projection", "frozen"):
            raise ValueError(f"hidden must be 'projection' or 'frozen', got {self.hidden!r}")
        if self.activation not in analytic.ACTIVATIONS:
            raise ValueError(f"activation must be one of {', '.join(analytic.ACTIVATIONS)}, got {self.activation!r}")
        for key in ("forward_dtype", "gram_dtype"):
            if getattr(self, key) not in DTYPES:
                raise ValueError(f"{key} must be 'float64' or 'float32', got {getattr(self, key)!r}")
        if not 0.0 < self.client_fraction <= 1.0:
            raise ValueError(f"client_fraction must be in (0, 1], got {self.client_fraction}")
        if self.pool < 1 or self.patches_per_image < 0:
            raise ValueError("pool must be >= 1 and patches_per_image >= 0")


@functools.lru_cache(maxsize=64)
def _geometry(layers: tuple[str, ...], input_shape: tuple[int, ...], num_classes: int, pool: int):
    return tuple(analytic.build_layers(layers, input_shape, num_classes, pool))


def geometry(cfg, task: Task) -> tuple[analytic.Layer, ...]:
    return _geometry(tuple(cfg.layers), tuple(task.input_shape), int(task.num_classes), int(cfg.pool))


class AnalyticState(ServerState):
    def __init__(self, task: Task, weights: list[torch.Tensor], projections: list[torch.Tensor | None]):
        self.input_shape = tuple(task.input_shape)
        self.num_classes = int(task.num_classes)
        self.weights = weights  # float64 (d, width) per layer, bias in the last row
        self.projections = projections  # hidden-layer label projections (num_classes, width)


def layer_index(phase: str) -> int:
    return int(phase[len("layer"):])


def outputs_eval(out: torch.Tensor, y: torch.Tensor) -> Eval:
    """The head's outputs as logits: summed cross-entropy and argmax accuracy."""
    out = out.to(torch.float32)
    return Eval(n=int(y.shape[0]), loss_sum=float(F.cross_entropy(out, y, reduction="sum")),
                correct=int((out.argmax(1) == y).sum()))


def selected(cfg, seed: int, round: int, client_id: int) -> bool:
    """Whether a client contributes statistics this round (`client_fraction`): a Bernoulli draw
    from (run seed, round, client id) alone, the same for every layer phase of the round."""
    return cfg.client_fraction >= 1.0 or derive_seed(seed, round, client_id, "client-fraction") < cfg.client_fraction * 2.0 ** 63


def predict(layers, weights, x: torch.Tensor, cfg, chunk: int = 1024) -> torch.Tensor:
    ws = [w.to(device=x.device, dtype=torch.float32) for w in weights]
    return torch.cat([analytic.forward(layers, ws, x[s:s + chunk], cfg.activation, cfg.pool)
                      for s in range(0, x.shape[0], chunk)]) if x.shape[0] else x.new_zeros(0, layers[-1].width)


def layer_statistics(cfg, layers, i, bcast, x, y, ctx, ids: tuple | None = None):
    """A and b of layer i over the samples x; with `ids` (the clients whose samples x stacks),
    the worker's ForwardCache carries layer inputs from this phase to the next."""
    layer, k = layers[i], ctx.task.num_classes
    proj = bcast["projection"]
    proj = None if proj is None else proj.to(x.device)

    def t_of(start, stop):
        return analytic.targets(layer, y[start:stop], k, proj, cfg.activation)

    a, b = analytic.statistics(layers, i, bcast["weights"], x, t_of, cfg.activation, cfg.pool, bcast["positions"],
                               forward_dtype=getattr(torch, cfg.forward_dtype),
                               gram_dtype=getattr(torch, cfg.gram_dtype),
                               cache=None if ids is None else analytic.ForwardCache(
                                   ctx.cache, (ctx.seed, ctx.round, ids), bcast["weights"]))
    return a.cpu(), b.cpu()  # replies travel through the engine on the CPU


def stacked_samples(cfg, clients) -> tuple[list, list, list, list[int], list[bool]]:
    """The selected clients' training samples of a chunk, in its order: (xs, ys, client ids, n_train
    per client, dropped per client); a client whose samples are not all finite is left out and
    reported dropped, as `client` would be."""
    xs, ys, ids, n_train, dropped = [], [], [], [], []
    for data, ctx in clients:
        n = data.n("train") if selected(cfg, ctx.seed, ctx.round, ctx.client_id) else 0
        x, y = data.split("train") if n else (None, None)
        bad = n > 0 and not bool(torch.isfinite(x).all())
        if n and not bad:
            xs.append(x)
            ys.append(y)
            ids.append(ctx.client_id)
        n_train.append(n)
        dropped.append(bad)
    return xs, ys, ids, n_train, dropped


class LayerwiseMethod(Algorithm):
    """The layer phases of FedACnnL: init, phases, broadcast, the per-layer solve, the clients'
    statistics (per client and per chunk) and validation. Subclasses add `evaluate`."""

    def init(self, cfg, task: Task, seed: int) -> AnalyticState:
        gen = torch.Generator().manual_seed(derive_seed(seed, "analytic-init"))
        weights, projections = [], []
        for layer in geometry(cfg, task):
            if layer.head:
                weights.append(torch.zeros(layer.d, layer.width, dtype=torch.float64))
                projections.append(None)
                continue
            bound = 1.0 / math.sqrt(layer.d - 1)  # PyTorch's default init, used by the frozen regime
            weights.append(torch.empty(layer.d, layer.width, dtype=torch.float64).uniform_(-bound, bound, generator=gen))
            projections.append(torch.randn(task.num_classes, layer.width, dtype=torch.float64, generator=gen))
        return AnalyticState(task, weights, projections)

    def train_phases(self, cfg, state, round):
        n = len(cfg.layers)
        if cfg.hidden == "frozen":
            return (f"layer{n - 1}",)
        return tuple(f"layer{i}" for i in range(n))

    def eval_phases(self, cfg, state, cohort):
        return ("evaluate",)

    def work(self, phase, cfg, task, n_train) -> Work:
        """A layer phase: the solved layers below, the layer's label projection and kept patch
        positions down; A_i, b_i and the count up (float64); one pass over the train samples. A
        client outside `client_fraction` sends nothing, which the clock does not know: it charges
        every sampled client as selected."""
        layers = geometry(cfg, task)
        i = layer_index(phase)
        layer, n = layers[i], int(n_train)
        down = tensor_bytes(*(lay.d * lay.width for lay in layers[:i]), itemsize=FLOAT64)
        if not layer.head:
            down += tensor_bytes(task.num_classes * layer.width, itemsize=FLOAT64)
        if layer.kind == "conv" and 0 < cfg.patches_per_image < layer.positions:
            down += tensor_bytes(cfg.patches_per_image, itemsize=8)  # int64 positions
        up = tensor_bytes(layer.d * layer.d, layer.d * layer.width, 1, itemsize=FLOAT64) if n > 0 else 0
        return Work(samples=n, steps=1 if n > 0 else 0, bytes_down=down, bytes_up=up)

    def positions(self, cfg, layer: analytic.Layer, info: RoundInfo) -> torch.Tensor | None:
        if layer.kind != "conv" or cfg.patches_per_image == 0 or cfg.patches_per_image >= layer.positions:
            return None
        perm = torch.randperm(layer.positions, generator=info.generator("patches", layer.index))
        return perm[:cfg.patches_per_image].sort().values

    def broadcast(self, phase, cfg, state, info: RoundInfo):
        if info.mode == "eval":
            return {"weights": state.weights}
        i = layer_index(phase)
        layers = geometry(cfg, Task(tuple(state.input_shape), int(state.num_classes)))
        return {"weights": state.weights[:i], "projection": state.projections[i],
                "positions": self.positions(cfg, layers[i], info)}

    def finish(self, phase, cfg, state, sums, n_clients, info):
        if info.mode == "eval":
            return None  # evaluation never changes the model
        i = layer_index(phase)
        token = cfg.layers[i]
        if n_clients == 0 or "A" not in sums:
            raise SimfedError(
                f"{self.name} layer {i} ({token}): statistics arrived from 0 clients (empty cohort, clients without "
                "training samples, or every reply dropped as non-finite), so the layer cannot be solved; check the "
                "data for NaN/inf and that run.clients_per_round selects clients with training data")
        state.weights[i] = analytic.solve(sums["A"], sums["b"], cfg.gamma, f"{self.name} layer {i} ({token})")
        return {"layer": float(i), "clients": float(n_clients), "samples": float(sums["n"])}

    def client(self, phase, cfg, bcast, payload, data: ClientData, cstate, ctx: ClientContext) -> Reply:
        layers = geometry(cfg, ctx.task)
        if ctx.mode == "eval":
            return Reply(evals=self.evaluate(cfg, layers, bcast, data, ctx))
        if not selected(cfg, ctx.seed, ctx.round, ctx.client_id):
            return Reply()  # not in this round's fraction: sends nothing, like a client without data
        x, y = data.split("train")
        n = int(y.shape[0])
        if n == 0:
            return Reply()  # nothing to add; the server counts only clients that sent statistics
        a, b = layer_statistics(cfg, layers, layer_index(phase), bcast, x, y, ctx, ids=(ctx.client_id,))
        return Reply(sums={"A": a, "b": b, "n": torch.tensor(float(n), dtype=torch.float64)}, n_train=n)

    def chunk_sums(self, phase, cfg, bcast, clients) -> ChunkSums | None:
        """A layer phase for a whole chunk: the selected clients' training samples stacked (in
        the chunk's order) and accumulated as one sample set, i.e. a few large GEMMs."""
        if not clients or clients[0][1].mode != "train" or not phase.startswith("layer"):
            return None
        xs, ys, ids, n_train, dropped = stacked_samples(cfg, clients)
        if not xs:
            return ChunkSums(sums=None, n_train=n_train, dropped=dropped)
        x, y = (xs[0], ys[0]) if len(xs) == 1 else (torch.cat(xs), torch.cat(ys))
        ctx0 = clients[0][1]
        a, b = layer_statistics(cfg, geometry(cfg, ctx0.task), layer_index(phase), bcast, x, y, ctx0, ids=tuple(ids))
        return ChunkSums(sums={"A": a, "b": b, "n": torch.tensor(float(y.shape[0]), dtype=torch.float64)},
                         n_train=n_train, dropped=dropped)

    def evaluate(self, cfg, layers, bcast, data: ClientData, ctx) -> dict[str, Eval]:
        raise NotImplementedError

    def validate(self, cfg, task: Task) -> None:
        try:
            analytic.check_tokens(cfg.layers)
        except ValueError as exc:
            raise SimfedError(f"[algorithm] layers: {exc}") from None
        layers = geometry(cfg, task)
        big = max(layers, key=lambda layer: layer.d)
        if big.d > MAX_D:
            raise SimfedError(f"[algorithm] layers: layer {big.index} {big.token!r} has {big.d} inputs per output; "
                              f"its {big.d}x{big.d} Gram matrix is too large (limit d <= {MAX_D}); use fewer "
                              "channels, a smaller kernel, or a convolution/pooling before it")
