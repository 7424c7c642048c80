"""Meta-FL and Per-FedAvg local meta-steps for a chunk of clients at once (torch.func.vmap).

Ours (no paper). The per-client step is `metafl.meta_client_step`: tau meta-steps
w <- w - beta g(w), g the gradient of f(phi^nu(w); D') computed by `functional.meta_gradient`.
Here the C clients' flat parameters are stacked [C, P] and every piece of one meta-step is one
vmap over the chunk of a torch.func transform of the masked loss (`vectorized.masked_loss`):

- the nu inner steps phi^{k+1} = phi^k - alpha grad f(phi^k; D_k) and the outer gradient at phi^nu:
  vmap(grad_and_value);
- gradient = "first_order": that outer gradient is the meta-gradient;
- gradient = "exact": g <- g - alpha H(phi^k; D''_k) g for k = nu-1..0, the Hessian-vector product
  as vmap over vjp(grad(f)) (reverse over reverse, the double backward of `functional.hvp`);
- gradient = "hessian_free": the same recursion with (grad f(phi^k + d g) - grad f(phi^k - d g)) / 2d,
  two more vmap(grad) calls (`functional.hvp_fd`);
- hessian_batch "inner" and "fresh" alike (D''_k is the inner batch or the fresh one).

So every training variant of both methods is vectorized, exactly: all three are compositions of
first- and second-order derivatives of the same per-client loss, which torch.func expresses
lane by lane, and float64 tests hold them to the loop at 1e-10. What makes it exact, client by client:
- batches: each client's `BatchStream` is fed by the same seeded generator and asked for the same
  batches in the same order (nu inner, outer, then nu fresh Hessian batches per meta-step), so the
  samples are the loop's. A client smaller than a batch gets min(batch, n) rows, as in the loop;
  the chunk's batch is padded to the widest and padded rows weigh 0 (mean over real rows);
- a client whose meta-gradient is not finite takes that step (as the loop does) and is frozen from
  the next one on (the loop breaks): its samples and losses stop counting, its reply stays
  non-finite and the engine drops it. vmap lanes are independent, so it cannot spoil the others.
Not vectorized: evaluation (fine-tuning then val/test), which the engine never vectorizes.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn
from torch.func import grad, grad_and_value, vjp, vmap

from simfed.algorithms.kit.functional import BatchStream
from simfed.algorithms.kit.models import param_shapes
from simfed.algorithms.kit.vectorized import gather, masked_loss, stack_data


def _draws(cfg, n: int, gen: torch.Generator) -> list[tuple[list, torch.Tensor, list | None]]:
    """A client's (inner, outer, fresh Hessian batches) of every meta-step, drawn in the loop's order."""
    stream = BatchStream(n, gen)
    fresh = cfg.gradient != "first_order" and cfg.hessian_batch == "fresh"
    out = []
    for _ in range(cfg.tau):
        inner = [stream.take(cfg.batch_size) for _ in range(cfg.nu)]
        outer = stream.take(cfg.outer_batch_size)
        out.append((inner, outer, [stream.take(cfg.batch_size) for _ in range(cfg.nu)] if fresh else None))
    return out


def meta_chunk_step(cfg, model: nn.Module, w0: torch.Tensor, xs: Sequence[torch.Tensor],
                    ys: Sequence[torch.Tensor], gens: Sequence[torch.Generator],
                    budgets: Sequence[int | None] | None = None) -> tuple[torch.Tensor, list[int], list[float]]:
    """`metafl.meta_client_step` for C clients, all from w0 [P] (the broadcast model); client c takes
    at most budgets[c] meta-steps (a straggler's budget; None: tau).

    xs must already be in w0's dtype. Returns (w_tau [C, P], samples used per client, mean outer
    loss per client over the meta-steps it took)."""
    C = len(xs)
    X, Y = stack_data(xs, ys, w0.device)
    plans = [_draws(cfg, int(y.shape[0]), g) for y, g in zip(ys, gens)]
    f = masked_loss(model, param_shapes(model))
    grad_val = vmap(grad_and_value(f))
    grad_only = vmap(grad(f))
    hvp = vmap(lambda p, x, y, m, v: vjp(lambda q: grad(f)(q, x, y, m), p)[1](v)[0])

    w = w0.expand(C, -1).clone()
    taus = torch.tensor([cfg.tau if b is None else min(cfg.tau, b) for b in (budgets or [None] * C)],
                        device=w0.device)
    active = torch.ones(C, dtype=torch.bool, device=w0.device)
    seen, losses = [0] * C, [[] for _ in range(C)]
    model.train()
    for t in range(cfg.tau):
        active &= t < taus  # a straggler stops after its budget, frozen as a non-finite client is
        if not bool(active.any()):
            break
        steps = [plan[t] for plan in plans]
        inner = [gather(X, Y, [s[0][k] for s in steps], w.dtype) for k in range(cfg.nu)]
        phis = [w]
        for xb, yb, mb in inner:
            phis.append(phis[-1] - cfg.alpha * grad_only(phis[-1], xb, yb, mb))
        g, value = grad_val(phis[-1], *gather(X, Y, [s[1] for s in steps], w.dtype))
        if cfg.gradient != "first_order":
            hess = inner if steps[0][2] is None else [gather(X, Y, [s[2][k] for s in steps], w.dtype)
                                                      for k in range(cfg.nu)]
            for k in range(cfg.nu - 1, -1, -1):
                if cfg.gradient == "exact":
                    hv = hvp(phis[k], *hess[k], g)
                else:
                    d = cfg.hf_delta
                    hv = (grad_only(phis[k] + d * g, *hess[k]) - grad_only(phis[k] - d * g, *hess[k])) / (2.0 * d)
                g = g - cfg.alpha * hv
        for c in range(C):
            if active[c]:
                inner_c, outer_c, hess_c = steps[c]
                seen[c] += sum(int(i.numel()) for i in inner_c + [outer_c] + (hess_c or []))
                losses[c].append(float(value[c]))
        w = torch.where(active[:, None], w - cfg.beta * g, w)
        active &= torch.isfinite(g).all(dim=1)
    return w, seen, [sum(v) / max(len(v), 1) for v in losses]
