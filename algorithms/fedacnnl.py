"""FedACnnL (Gu et al., 2025, "Analytic Personalized Federated Meta-Learning"; seed 003), the
layer-wise extension of AFL (Zhuang et al., 2024, arXiv 2405.16240) to convolutional networks.

Gradient-free: every layer is a ridge least-squares problem whose sufficient statistics add up
over clients. One phase per layer, bottom-up, all within one round: client i forms the layer's
inputs X_i (im2col patches of the already-solved layers' activations for a convolution, the
flattened activations for a fully connected layer, plus a bias column) and targets T_i, and
sends A_i = X_i^T X_i (d x d) and b_i = X_i^T T_i (d x k) in float64 as summable `Reply.sums`;
the server solves W = (sum A_i + gamma I)^{-1} sum b_i by Cholesky and broadcasts it with the
next phase. The result equals the centralized ridge solution on the pooled data and does not
depend on how the data are split; the server holds O(d^2) per layer, whatever the cohort.
No row of data ever leaves a client.

[reconstructed] choices (config options, default first):
- `hidden = "projection"`: a hidden layer's target is act(Y P_l), P_l a fixed seeded Gaussian
  projection (num_classes x width) of the one-hot labels Y; for a convolution every patch of a
  sample gets that sample's projected label. `hidden = "frozen"`: hidden layers stay random
  (seeded, PyTorch's default uniform init) and only the head is solved (the AFL regime).
- the head's target is the one-hot label; at evaluation its outputs are the logits (argmax for
  accuracy, cross-entropy reported as the loss).
- `layers` (default the shared LeNet: conv5x16, conv5x32, fc120, fc84, fc), `activation =
  "relu"` after every hidden layer and `pool = 2` max-pooling after every convolution.
- `patches_per_image = 0` (all). Ours. A positive value keeps that many patch positions per image
  for the convolutional statistics, drawn by the server per layer and round and broadcast, so
  every image on every client uses the same positions: the solution is still exactly the
  centralized ridge solution on the subsampled patches, for any split of the data.
- `forward_dtype = "float64"`: the pass of a client's samples through the solved layers below
  runs in float64, so the statistics are split-invariant to float64 round-off (the exactness
  tests hold at 1e-8). "float32" is ~3x faster on CPU; a sample's features may then differ by
  ~1e-7 relative with the batch it ran in, so split invariance holds only to that level.
  The Gram sums are float64 either way.
- `gram_dtype = "float64"`: the dtype of the design rows and of the products in each block's
  Gram GEMM. "float32" forms them in float32 (~3x the GEMM throughput on CPU, 2x less memory
  traffic) and adds each block's result into the float64 sums: the solution moves by round-off
  amplified by the layer's conditioning (~1e-6 to 1e-3 relative, tested), no longer 1e-8.
- `client_fraction = 1` (all). A value f < 1 solves from a seeded Bernoulli(f) subset of the
  round's clients, drawn from (run seed, round, client id) so that every layer phase of a round
  uses the same clients; the others send nothing. The solution is then exactly the ridge
  solution on the selected clients' data. Ours: the statistics are sums, so a fraction of the
  clients is an unbiased (scaled) estimate of them, and accuracy as a function of f is a curve
  that bench/analytic_claims.py prints.
- `gamma = 1` (AFL's default). gamma = 0 is allowed; a singular Gram matrix is then an error.
- speed (ours; the paper gives no implementation): a worker stacks the training samples of all
  the clients of its chunk and accumulates them as one sample set (`chunk_sums`): blocks of
  at most 2^22 design elements, each a few large GEMMs (upper block triangle only, the bias as a
  column of ones, X^T T from per-sample row sums); with every patch position a convolution's
  Gram is assembled from products of image rows instead (gram.RowPairGram, 2.5x fewer
  products for the second convolution). The result equals the client-by-client sums to
  round-off and depends only on the chunk's clients and order, which the engine fixes. A worker
  keeps a chunk's layer inputs for the next layer's phase (analytic.ForwardCache), and the Ray
  backend hands a chunk back to the worker that ran it.
  Options that trade exactness for time are `forward_dtype`, `gram_dtype`, `patches_per_image`
  and `client_fraction` (all exact by default). All of it runs on the worker's device (CUDA
  workers included); replies come back on the CPU.
- rounds: each round re-solves every layer from that round's cohort (the method is one-shot:
  run.rounds = 1 with clients_per_round = all seen clients trains the whole network).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
from torch.nn import functional as F

from simfed.algorithms.kit import analytic
from simfed.algorithms.base import Algorithm, Capabilities, ChunkSums, ClientContext, ClientData, Eval, Reply, RoundInfo, ServerState, Task
from simfed.core.seeds import derive_seed
from simfed.algorithms.registry import register
from simfed.core.errors import SimfedError

MAX_D = 8192  # a d x d float64 Gram of 512 MiB; larger layers would not fit a worker comfortably


@dataclass(frozen=True)
class FedACnnLConfig:
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
        if self.forward_dtype not in ("float64", "float32"):
            raise ValueError(f"forward_dtype must be 'float64' or 'float32', got {self.forward_dtype!r}")
        if self.gram_dtype not in ("float64", "float32"):
            raise ValueError(f"gram_dtype must be 'float64' or 'float32', got {self.gram_dtype!r}")
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


@register
class FedACnnL(Algorithm):
    name = "fedacnnl"
    Config = FedACnnLConfig
    summary = "FedACnnL: layer-wise closed-form least squares, summed Gram matrices (Gu et al. 2025)"
    capabilities = Capabilities(chunk_sums=True)  # its layer phases: one stacked Gram per chunk

    # --- server ------------------------------------------------------------------------------
    def init(self, cfg, task: Task, seed: int) -> AnalyticState:
        layers = geometry(cfg, task)
        gen = torch.Generator().manual_seed(derive_seed(seed, "analytic-init"))
        weights, projections = [], []
        for layer in layers:
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

    # --- client ------------------------------------------------------------------------------
    def client(self, phase, cfg, bcast, payload, data: ClientData, cstate, ctx: ClientContext) -> Reply:
        layers = geometry(cfg, ctx.task)
        if ctx.mode == "eval":
            return Reply(evals=self.evaluate(cfg, layers, bcast, data, ctx))
        if not selected(cfg, ctx.seed, ctx.round, ctx.client_id):
            return Reply()  # not in this round's fraction: sends nothing, like a client without data
        i = layer_index(phase)
        x, y = data.split("train")
        n = int(y.shape[0])
        if n == 0:
            return Reply()  # nothing to add; the server counts only clients that sent statistics
        a, b = self.layer_statistics(cfg, layers, i, bcast, x, y, ctx, ids=(ctx.client_id,))
        return Reply(sums={"A": a, "b": b, "n": torch.tensor(float(n), dtype=torch.float64)}, n_train=n)

    def chunk_sums(self, phase, cfg, bcast, clients) -> ChunkSums | None:
        """A layer phase for a whole chunk: the selected clients' training samples stacked (in
        the chunk's order) and accumulated as one sample set, i.e. a few large GEMMs. A client
        whose samples are not all finite is left out and reported dropped, as `client` would be."""
        if not clients or clients[0][1].mode != "train" or not phase.startswith("layer"):
            return None
        ctx0 = clients[0][1]
        layers = geometry(cfg, ctx0.task)
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
        if not xs:
            return ChunkSums(sums=None, n_train=n_train, dropped=dropped)
        x, y = (xs[0], ys[0]) if len(xs) == 1 else (torch.cat(xs), torch.cat(ys))
        a, b = self.layer_statistics(cfg, layers, layer_index(phase), bcast, x, y, ctx0, ids=tuple(ids))
        return ChunkSums(sums={"A": a, "b": b, "n": torch.tensor(float(y.shape[0]), dtype=torch.float64)},
                          n_train=n_train, dropped=dropped)

    @staticmethod
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

    def evaluate(self, cfg, layers, bcast, data: ClientData, ctx) -> dict[str, Eval]:
        out = {}
        for split in ("val", "test"):
            if data.n(split) > 0:
                x, y = data.split(split)
                out[split] = outputs_eval(predict(layers, bcast["weights"], x, cfg), y)
        return out

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
