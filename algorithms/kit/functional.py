"""Functional parameter math on flat vectors: losses, gradients, Hessian-vector products, meta-gradients.

A model's parameters travel as one flat vector (models.flat_params); here the loss is a function
of that vector (torch.func.functional_call on an unflattened view), so gradients and second-order
products are plain autograd calls and never touch the module's own parameters.

The nu-step meta-gradient of F(w) = f(phi^nu(w); D'), phi^{k+1} = phi^k - alpha grad f(phi^k; D_k):
    dF/dw = prod_{k=0..nu-1} (I - alpha H(phi^k; D_k)) grad f(phi^nu; D')
is evaluated right to left ("backward over the unrolled steps"): only the nu+1 iterates phi^k are
stored (nu+1 parameter vectors), and the graph of one step at a time is built for its Hessian-vector
product, so memory grows linearly in nu with a per-step cost of one parameter vector (an unrolled
create_graph=True backward keeps the activations of all nu steps alive at once).
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import nn
from torch.func import functional_call
from torch.nn import functional as F

from simfed.algorithms.kit.models import param_shapes, unflatten

Batch = tuple[torch.Tensor, torch.Tensor]
LossFn = Callable[[torch.Tensor, Batch], torch.Tensor]


def loss_fn(model: nn.Module) -> LossFn:
    """f(flat, (x, y)): mean cross-entropy of `model` with parameters `flat`."""
    shapes = param_shapes(model)

    def f(flat: torch.Tensor, batch: Batch) -> torch.Tensor:
        x, y = batch
        return F.cross_entropy(functional_call(model, unflatten(flat, shapes), (x,)), y)

    return f


def grad(f: LossFn, w: torch.Tensor, batch: Batch) -> torch.Tensor:
    return value_and_grad(f, w, batch)[1]


def value_and_grad(f: LossFn, w: torch.Tensor, batch: Batch) -> tuple[float, torch.Tensor]:
    w = w.detach().requires_grad_(True)
    with torch.enable_grad():
        loss = f(w, batch)
        (g,) = torch.autograd.grad(loss, w)
    return float(loss.detach()), g


def hvp(f: LossFn, w: torch.Tensor, v: torch.Tensor, batch: Batch) -> torch.Tensor:
    """H_f(w; batch) v by double backward (reverse over reverse); the Hessian is never formed."""
    w = w.detach().requires_grad_(True)
    with torch.enable_grad():
        (g,) = torch.autograd.grad(f(w, batch), w, create_graph=True)
        (hv,) = torch.autograd.grad(g, w, grad_outputs=v.detach())
    return hv


def hvp_fd(f: LossFn, w: torch.Tensor, v: torch.Tensor, batch: Batch, delta: float) -> torch.Tensor:
    """H_f(w; batch) v by central differences of gradients, (g(w + d v) - g(w - d v)) / 2d.

    The perturbation is delta * v with v unnormalized, as in Per-FedAvg's Hessian-free variant
    (Fallah et al. 2020); the error is O(delta^2 |v|^3) for a smooth loss.
    """
    return (grad(f, w + delta * v, batch) - grad(f, w - delta * v, batch)) / (2.0 * delta)


def inner_steps(f: LossFn, w: torch.Tensor, alpha: float, batches: Sequence[Batch]) -> list[torch.Tensor]:
    """[phi^0 = w, phi^1, ..., phi^nu] of plain gradient steps of size alpha, each on its batch."""
    phis = [w.detach()]
    for b in batches:
        phis.append(phis[-1] - alpha * grad(f, phis[-1], b))
    return phis


def meta_gradient(f: LossFn, w: torch.Tensor, alpha: float, inner: Sequence[Batch], outer: Batch,
                  mode: str = "exact", hf_delta: float = 1e-3,
                  hessian: Sequence[Batch] | None = None, losses: list | None = None) -> torch.Tensor:
    """Gradient of f(phi^nu(w); outer) w.r.t. w, with nu = len(inner).

    mode "exact": Hessian-vector products by autograd; "hessian_free": by finite differences
    (step hf_delta); "first_order": the Jacobian of the inner steps is taken as the identity.
    `hessian` gives the batches the Hessians are taken on (default: the inner step's own batch,
    which makes "exact" the true derivative of the unrolled steps). The outer loss f(phi^nu; outer),
    computed on the way, is appended to `losses` when given (for logging only).
    """
    phis = inner_steps(f, w, alpha, inner)
    value, g = value_and_grad(f, phis[-1], outer)
    if losses is not None:
        losses.append(value)
    if mode == "first_order":
        return g
    hess = inner if hessian is None else hessian
    for k in range(len(inner) - 1, -1, -1):
        if mode == "exact":
            hv = hvp(f, phis[k], g, hess[k])
        elif mode == "hessian_free":
            hv = hvp_fd(f, phis[k], g, hess[k], hf_delta)
        else:
            raise ValueError(f"unknown meta-gradient mode {mode!r}")
        g = g - alpha * hv
    return g


def unrolled_meta_gradient(f: LossFn, w: torch.Tensor, alpha: float, inner: Sequence[Batch],
                           outer: Batch) -> torch.Tensor:
    """Reference: autograd through all nu steps at once (create_graph=True). For tests and benches."""
    w = w.detach().requires_grad_(True)
    with torch.enable_grad():
        phi = w
        for b in inner:
            (g,) = torch.autograd.grad(f(phi, b), phi, create_graph=True)
            phi = phi - alpha * g
        (out,) = torch.autograd.grad(f(phi, outer), w)
    return out


class BatchStream:
    """Index batches drawn without replacement from n samples, reshuffling after each full pass.

    A batch never straddles two passes (it is drawn from a fresh permutation instead), so within a
    batch the samples are distinct; a batch larger than n is cut to n samples.
    """

    def __init__(self, n: int, gen: torch.Generator):
        if n < 1:
            raise ValueError("BatchStream needs at least one sample")
        self.n, self.gen = n, gen
        self.perm, self.pos = torch.randperm(n, generator=gen), 0

    def take(self, batch_size: int) -> torch.Tensor:
        bs = min(batch_size, self.n)
        if self.pos + bs > self.n:
            self.perm, self.pos = torch.randperm(self.n, generator=self.gen), 0
        idx = self.perm[self.pos:self.pos + bs]
        self.pos += bs
        return idx
