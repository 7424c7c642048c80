"""FedACnnL (Gu, You, Guo, Qu, Ren, Xie, Luo, 2025, "Analytic Personalized Federated Meta-Learning",
arXiv 2502.06915), the layer-wise extension of AFL (Zhuang et al., 2024, arXiv 2405.16240) to
convolutional networks.

Gradient-free: every layer is a ridge least-squares problem whose sufficient statistics add up
over clients. One phase per layer, bottom-up, all within one round: client i forms the layer's
inputs X_i (im2col patches of the already-solved layers' activations for a convolution, the
flattened activations for a fully connected layer, plus a bias column) and targets T_i, and
sends A_i = X_i^T X_i (d x d) and b_i = X_i^T T_i (d x k) in float64 as summable `Reply.sums`;
the server solves W = (sum A_i + gamma I)^{-1} sum b_i by Cholesky and broadcasts it with the
next phase. The result equals the centralized ridge solution on the pooled data and does not
depend on how the data are split; the server holds O(d^2) per layer, whatever the cohort.
No row of data ever leaves a client.

From the paper: each layer as a distributed least-squares problem whose Gram sums add up over
clients, solved bottom-up in closed form (gradient-free). The choices the paper leaves open are
ours, marked below. The layer phases are the shared kit/acnnl.py (pFedACnnL builds on them; its
docstring says where each seed comes from); this module adds the evaluation of the global network.

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
- [privacy] is refused: a guarantee would need each client's Gram statistics clipped and noised
  per layer (a noised Gram kept positive definite), which is not implemented.

- [system] clock (ours): a client's round is its layer phases back to back, each one pass over
  its train samples. Partial work is refused (stragglers = "partial" is a config error): a
  client that finished some layer phases and not others would make the layers' Gram sums come
  from different client sets, and a layer's sums cover whole samples or nothing. Not
  asynchronous: each layer is solved from the sums of one cohort through the layers below as
  they were solved in that round; `fedbuff` is refused.
"""

from __future__ import annotations

from dataclasses import dataclass

from simfed.algorithms.base import Capabilities, ClientData, Eval, ModelNeeds, NoPrivacy
from simfed.algorithms.kit.acnnl import AnalyticFields, LayerwiseMethod, outputs_eval, predict
from simfed.algorithms.registry import register


@dataclass(frozen=True)
class FedACnnLConfig(AnalyticFields):
    """The layer-wise solve's keys (kit/acnnl.py), nothing more."""


@register
class FedACnnL(LayerwiseMethod):
    name = "fedacnnl"
    Config = FedACnnLConfig
    summary = "FedACnnL: layer-wise closed-form least squares, summed Gram matrices (Gu et al. 2025)"
    # its layer phases: one stacked Gram per chunk; the network: a chain of solvable layers
    capabilities = Capabilities(chunk_sums=True, partial="refuse", model=ModelNeeds(chain=True, own_network=True),
                                privacy=NoPrivacy(
        "its server solves least squares from summed Gram matrices; clipping each client's Gram statistics and "
        "noising them per layer (kept positive definite) is not implemented, so no guarantee is offered"))

    def evaluate(self, cfg, layers, bcast, data: ClientData, ctx) -> dict[str, Eval]:
        out = {}
        for split in ("val", "test"):
            if data.n(split) > 0:
                x, y = data.split(split)
                out[split] = outputs_eval(predict(layers, bcast["weights"], x, cfg), y)
        return out
