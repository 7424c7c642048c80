"""Shared machinery of the analytic (least-squares) methods FedACnnL and pFedACnnL.

A network is a list of layer tokens that the analytic path can solve in closed form:
  "conv{k}x{c}"  k x k convolution (no padding, stride 1) with c output channels, then the
                 activation, then max-pooling (`pool`, 1 = none);
  "fc{n}"        fully connected hidden layer of width n, then the activation;
  "fc"           the head (width = number of classes, no activation), last and only last.
Every layer is linear in its weights given its inputs, so with the inputs X (im2col patches for a
convolution, the flattened activations for a fully connected layer, plus a bias column of ones)
and targets T, the layer is the ridge problem W = (X^T X + gamma I)^{-1} X^T T, whose sufficient
statistics X^T X and X^T T add up over clients. Weights are kept as float64 matrices of shape
(d_in + 1, d_out), the last row being the bias.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from torch.nn import functional as F

from simfed.algorithms.kit.gram import RowPairGram, gram_into, symmetrize
from simfed.core.errors import SimfedError

LENET = ("conv5x16", "conv5x32", "fc120", "fc84", "fc")
ACTIVATIONS = ("relu", "tanh", "identity")
_CONV = re.compile(r"^conv(\d+)x(\d+)$")
_FC = re.compile(r"^fc(\d+)$")
CHUNK = 512  # at most this many samples per forward/Gram block (bounds the forward's activations)
BLOCK_ELEMS = 1 << 22  # at most this many design-matrix elements per block (32 MiB in float64)
CACHE_BYTES = 2 << 30  # per worker: layer inputs kept from one layer phase for the next (ForwardCache);
# 2 GiB holds a 2-worker FEMNIST round's fc inputs and ~45% of its conv2 inputs, which are recomputed otherwise


@dataclass(frozen=True)
class Layer:
    """One solvable layer with its geometry on a given task."""

    index: int
    token: str
    kind: str  # "conv" or "fc"
    kernel: int  # conv only
    width: int  # output channels / units (num_classes for the head)
    in_shape: tuple[int, ...]  # (C, H, W) for conv, (features,) for fc
    out_shape: tuple[int, ...]  # after activation and pooling
    head: bool

    @property
    def d(self) -> int:
        """Rows of the weight matrix: inputs per output (patch size or features) plus the bias."""
        if self.kind == "conv":
            return self.in_shape[0] * self.kernel * self.kernel + 1
        return self.in_shape[0] + 1

    @property
    def positions(self) -> int:
        """Patches per image (conv) or 1 (fc)."""
        if self.kind == "conv":
            side = self.in_shape[1] - self.kernel + 1
            return side * side
        return 1


def check_tokens(tokens: Sequence[str]) -> None:
    """Raise ValueError naming the first layer the analytic path cannot solve."""
    if not tokens:
        raise ValueError("layers must name at least the head 'fc'")
    for i, tok in enumerate(tokens):
        last = i == len(tokens) - 1
        if tok == "fc":
            if not last:
                raise ValueError(f"layer {i} 'fc' (the head) must be the last layer")
            continue
        if last:
            raise ValueError(f"the last layer must be the head 'fc', got {tok!r}")
        m = _CONV.match(tok) or _FC.match(tok)
        if m is None:
            raise ValueError(
                f"layer {i} {tok!r} cannot be solved analytically (each layer must be linear in its weights "
                "given its inputs); supported layers: conv<k>x<channels>, fc<width>, and the head fc")
        if any(int(g) < 1 for g in m.groups()):
            raise ValueError(f"layer {i} {tok!r}: sizes must be >= 1")
        if _CONV.match(tok) and any(_FC.match(t) for t in tokens[:i]):
            raise ValueError(f"layer {i} {tok!r}: a convolution cannot follow a fully connected layer")


def build_layers(tokens: Sequence[str], input_shape: tuple[int, int, int], num_classes: int,
                 pool: int) -> list[Layer]:
    """Geometry of every layer on this task; SimfedError if the input is too small for it."""
    check_tokens(tokens)
    shape: tuple[int, ...] = tuple(input_shape)
    out: list[Layer] = []
    for i, tok in enumerate(tokens):
        conv = _CONV.match(tok)
        if conv:
            k, c = int(conv.group(1)), int(conv.group(2))
            side = shape[1] - k + 1
            if shape[1] != shape[2] or side < pool:
                raise SimfedError(f"[algorithm] layers: layer {i} {tok!r} needs square inputs of side >= "
                                  f"{k + pool - 1}, it gets {shape[1]}x{shape[2]}; use smaller kernels or fewer layers")
            new = (c, side // pool, side // pool)
            out.append(Layer(i, tok, "conv", k, c, shape, new, False))
        else:
            feats = shape[0] if len(shape) == 1 else shape[0] * shape[1] * shape[2]
            width = num_classes if tok == "fc" else int(tok[2:])
            new = (width,)
            out.append(Layer(i, tok, "fc", 0, width, (feats,), new, tok == "fc"))
        shape = new
    return out


def activate(z: torch.Tensor, activation: str) -> torch.Tensor:
    if activation == "relu":
        return torch.relu(z)
    if activation == "tanh":
        return torch.tanh(z)
    return z


def with_bias(x: torch.Tensor) -> torch.Tensor:
    return torch.cat([x, x.new_ones(x.shape[:-1] + (1,))], dim=-1)


def patch_view(layer: Layer, h: torch.Tensor) -> torch.Tensor:
    """im2col without a copy: (N, o, o, C, k, k), element [n, i, j, c, a, b] = h[n, c, i + a, j + b].

    Works on any memory layout of h (channels-last pooling output included); copying it into a
    row buffer is one gather, where unfold + transpose is two full copies."""
    n, c, side, _ = h.shape
    o, k = side - layer.kernel + 1, layer.kernel
    sn, sc, sh, sw = h.stride()
    return h.as_strided((n, o, o, c, k, k), (sn, sh, sw, sc, sh, sw), h.storage_offset())


def design(layer: Layer, h: torch.Tensor, positions: torch.Tensor | None = None,
           dtype: torch.dtype | None = None) -> torch.Tensor:
    """The layer's input rows with the bias column, contiguous: (N * patches, d) for conv, (N, d) for fc.

    Rows of one sample are contiguous (sample-major); columns are channel-major like Conv2d
    weights. `positions` keeps only those patch positions (the same ones for every image).
    `dtype` (default h's) is the rows' dtype: the cast happens inside the one copy.
    """
    dtype = dtype or h.dtype
    n = h.shape[0]
    if layer.kind == "conv":
        v = patch_view(layer, h)
        if positions is not None:
            o = v.shape[1]
            pos = positions.to(h.device)
            v = v[:, pos // o, pos % o].unsqueeze(2)  # (N, P, 1, C, k, k): one gather of the kept patches
        rows = v.shape[1] * v.shape[2]
        out = torch.empty(n, v.shape[1], v.shape[2], layer.d, dtype=dtype, device=h.device)
        out[..., :-1].view(v.shape).copy_(v)
        out[..., -1] = 1
        return out.view(n * rows, layer.d)
    out = torch.empty(n, layer.d, dtype=dtype, device=h.device)
    out[:, :-1].copy_(h.reshape(n, -1))
    out[:, -1] = 1
    return out


def conv_weight(layer: Layer, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The (d, c) matrix as Conv2d weight (c, C, k, k) and bias: unfold orders patches channel-major."""
    c_in = layer.in_shape[0]
    return w[:-1].T.reshape(layer.width, c_in, layer.kernel, layer.kernel), w[-1]


def apply(layer: Layer, w: torch.Tensor, h: torch.Tensor, activation: str, pool: int) -> torch.Tensor:
    """Forward one solved layer (including activation and pooling); the head returns raw outputs."""
    if layer.kind == "conv":
        # conv2d computes exactly the patch-times-W products of the least-squares problem, without
        # materializing the im2col matrix.
        z = F.conv2d(h, *conv_weight(layer, w))
        if pool == 1:
            return activate(z, activation)
        # Every activation is non-decreasing, so it commutes with the max: pooling first activates
        # pool^2 times fewer values. Max-pooling is ~4x faster on a channels-last copy; every
        # consumer reads the result by shape, whatever its memory layout.
        return activate(F.max_pool2d(z.contiguous(memory_format=torch.channels_last), pool), activation)
    z = torch.addmm(w[-1], h.reshape(h.shape[0], -1), w[:-1])
    return z if layer.head else activate(z, activation)


def forward(layers: Sequence[Layer], weights: Sequence[torch.Tensor], x: torch.Tensor, activation: str,
            pool: int, upto: int | None = None) -> torch.Tensor:
    """Inputs of layer `upto` (all layers when None): x through the already-solved layers below."""
    h = x
    for layer, w in zip(layers[:len(layers) if upto is None else upto], weights):
        h = apply(layer, w.to(h.dtype), h, activation, pool)
    return h


def targets(layer: Layer, y: torch.Tensor, num_classes: int, projection: torch.Tensor | None,
            activation: str) -> torch.Tensor:
    """Per-sample targets: one-hot labels for the head, act(Y P) for a hidden layer."""
    onehot = F.one_hot(y, num_classes).to(torch.float64)
    if layer.head:
        return onehot
    return activate(onehot @ projection, activation)


def block_samples(layer: Layer, positions: torch.Tensor | None, chunk: int = CHUNK) -> int:
    """Samples per block: at most `chunk`, and at most BLOCK_ELEMS elements of design rows."""
    rows = 1 if layer.kind == "fc" else (layer.positions if positions is None else int(positions.numel()))
    return max(1, min(chunk, BLOCK_ELEMS // (rows * layer.d)))


def statistics(layers: Sequence[Layer], index: int, weights: Sequence[torch.Tensor], x: torch.Tensor,
               t_of: Callable, activation: str, pool: int, positions: torch.Tensor | None = None,
               chunk: int = CHUNK, forward_dtype: torch.dtype = torch.float64,
               gram_dtype: torch.dtype = torch.float64,
               cache: "ForwardCache | None" = None) -> tuple[torch.Tensor, torch.Tensor]:
    """A = X^T X (d x d) and b = X^T T (d x k) in float64 over the samples x, block by block.

    `x` may hold one client's samples or the stacked samples of many clients (a worker's chunk):
    the blocks are then a few large GEMMs instead of many small ones. `weights` are the solved
    layers below `index`; `t_of(start, stop)` gives the per-sample targets (n, k) of samples
    start:stop (a hidden conv layer's patches share their sample's target). Blocks hold at most
    `chunk` samples and BLOCK_ELEMS design elements, so memory is bounded whatever x holds.
    Everything runs on x's device.

    In float64 (both dtypes) a sample's contribution does not depend on its block or client beyond
    summation order; what the float32 options trade is in FedACnnL's docstring. The bias column is
    a column of ones inside the rows (so the GEMM also gives the column sums and the row count),
    and all patches of a sample share one target row: X^T T = (per-sample row sums)^T T.

    A convolution with every patch position takes X^T X and the patch sums from image-row products
    (RowPairGram, ~2.5x fewer products for LeNet's second convolution); a subset of positions and
    the fully connected layers use the design rows, in blocks.

    `cache` (optional) keeps this phase's layer inputs for the next layer's phase of the same
    samples, which then applies one layer instead of the whole forward (see ForwardCache).
    """
    layer = layers[index]
    dev = x.device
    ws = [w.to(device=dev, dtype=forward_dtype) for w in weights]
    a = torch.zeros(layer.d, layer.d, dtype=torch.float64, device=dev)
    b = None
    step = chunk  # forward blocks: the same for every layer, so the ForwardCache lines up
    sub = block_samples(layer, positions, chunk)  # Gram blocks within a forward block
    below = cache.take(index - 1, step) if cache is not None and index > 0 else None
    keep = [] if cache is not None and index + 1 < len(layers) else None
    rowpair = RowPairGram(layer, gram_dtype, dev) if layer.kind == "conv" and positions is None else None
    for j, s in enumerate(range(0, x.shape[0], step)):
        if below is not None:  # the same op on the same block as the full forward: bitwise the same h
            h = apply(layers[index - 1], ws[index - 1], below[j], activation, pool)
        else:
            h = forward(layers, ws, x[s:s + step].to(forward_dtype), activation, pool, upto=index)
        if keep is not None:
            keep.append(h)
        if rowpair is not None:  # every patch position: the Gram from image-row products
            bt = rowpair.rows(h).T @ t_of(s, s + h.shape[0]).to(device=dev, dtype=torch.float64)
            b = bt if b is None else b.add_(bt)
            continue
        for r in range(0, h.shape[0], sub):
            n = min(sub, h.shape[0] - r)
            p = design(layer, h[r:r + n], positions, dtype=gram_dtype)
            gram_into(a, p)
            t = t_of(s + r, s + r + n).to(device=dev, dtype=torch.float64)
            bt = p.view(n, -1, layer.d).sum(1, dtype=torch.float64).T @ t
            b = bt if b is None else b.add_(bt)
    if b is None:
        raise ValueError("statistics of an empty sample set")
    if keep is not None:
        cache.put(index, step, keep)
    return (rowpair.gram() if rowpair is not None else symmetrize(a)), b


class ForwardCache:
    """The inputs of the layer just solved, per block, kept for the next layer's phase.

    Phase l+1 needs apply(layer l, h_l) for the same samples that phase l just pushed through the
    layers below l. Kept blocks are the very tensors phase l used, and phase l+1 cuts its blocks
    the same way (it checks the block size), so apply() on them gives bitwise what the full forward
    would: a hit and a miss give the same statistics, and the cache cannot change a result.
    One entry per sample set (`key`: the clients, the round, a digest of the weights below), kept
    while it fits a worker's `budget` bytes (activations of the later layers are small; the
    largest, the first convolution's outputs, usually do not fit and are recomputed).
    """

    def __init__(self, store: dict, key: tuple, weights: Sequence[torch.Tensor], budget: int = CACHE_BYTES):
        """`store`: a worker-lived dict; `key`: (run seed, round, sample-set id); entries of other
        rounds are dropped (a chunk never seen again must not hold memory)."""
        self.store, self.budget = store.setdefault("analytic-forward", {}), budget
        self.key, self.weights = key, weights
        for k in [k for k in self.store if k[:2] != key[:2]]:
            del self.store[k]

    def _digest(self, upto: int) -> bytes:
        h = hashlib.blake2b(digest_size=16)
        for w in self.weights[:upto]:
            h.update(w.detach().cpu().contiguous().numpy().tobytes())
        return h.digest()

    def take(self, index: int, step: int) -> list[torch.Tensor] | None:
        """The kept inputs of layer `index` for this sample set (removed), or None."""
        entry = self.store.pop(self.key, None)
        if entry is None or entry[0] != (index, step, self._digest(index)):
            return None
        return entry[1]

    def put(self, index: int, step: int, blocks: list[torch.Tensor]) -> None:
        size = sum(t.numel() * t.element_size() for t in blocks)
        used = sum(sum(t.numel() * t.element_size() for t in e[1]) for e in self.store.values())
        if used + size <= self.budget:
            self.store[self.key] = ((index, step, self._digest(index)), blocks)


def solve(a: torch.Tensor, b: torch.Tensor, gamma: float, where: str) -> torch.Tensor:
    """W = (A + gamma I)^{-1} b by Cholesky; SimfedError (naming `where`) if A + gamma I is singular."""
    d = a.shape[0]
    m = a + gamma * torch.eye(d, dtype=a.dtype, device=a.device)
    chol, info = torch.linalg.cholesky_ex(m)
    diag = chol.diagonal() if int(info) == 0 else None
    # A PSD Gram matrix with gamma = 0 may pass Cholesky with round-off pivots; a pivot this small
    # relative to the largest means the system is numerically singular, and the solve would be noise.
    eps = torch.finfo(torch.float64).eps
    if diag is None or not torch.isfinite(diag).all() or float(diag.min()) ** 2 <= d * eps * float(diag.max()) ** 2:
        raise SimfedError(
            f"{where}: the summed Gram matrix X^T X + gamma I (d={d}, gamma={gamma}) is singular or not positive "
            "definite, so the least-squares layer has no unique solution; set [algorithm] gamma > 0 "
            "(e.g. gamma = 1) or give the layer more data")
    return torch.cholesky_solve(b, chol)


def ridge_toward(a: torch.Tensor, b: torch.Tensor, lam: float, w_ref: torch.Tensor, where: str) -> torch.Tensor:
    """argmin ||X W - T||^2 + lam ||W - W_ref||^2 = (A + lam I)^{-1} (b + lam W_ref)."""
    return solve(a, b + lam * w_ref, lam, where)
