"""Gram matrices X^T X of the analytic methods' layer inputs, accumulated in float64 (ours).

`gram_into` adds a block of design rows (upper block triangle only; `symmetrize` completes it).
`RowPairGram` forms a convolution's Gram over every patch position from products of image rows,
without the im2col matrix. Used by analytic.statistics; FedACnnL and pFedACnnL reach them there.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from simfed.algorithms.kit.analytic import Layer


def gram_into(a: torch.Tensor, p: torch.Tensor) -> None:
    """a += upper block triangle of p^T p (a float64; p float64 or float32, products in p's dtype).

    Two column halves: rows [:h] get p[:, :h]^T p and rows [h:] get p[:, h:]^T p[:, h:], 3/4 of
    the full product; `symmetrize` fills the lower triangle once at the end."""
    h = a.shape[0] // 2
    if p.dtype == a.dtype:
        a[:h].addmm_(p[:, :h].T, p)
        a[h:, h:].addmm_(p[:, h:].T, p[:, h:])
    else:  # float32 GEMMs, each block's result added into the float64 accumulator
        a[:h] += p[:, :h].T @ p
        a[h:, h:] += p[:, h:].T @ p[:, h:]


class RowPairGram:
    """X^T X of a convolution's im2col rows (all positions) from products of image rows.

    A patch is k rows of k pixels; two patches of one image at the same position pair image rows
    r and r + d (|d| < k). With A_r the (samples * o, C * k) matrix of the k-wide windows of image
    row r (o = output side), every Gram block of kernel rows (a, a + d) is a sum of
    S[d, r] = A_r^T A_{r+d} over r = a .. a + o - 1. So one accumulates S[d, r] for every row r
    and offset d (k * side GEMMs of (C k)^2, with the samples and the o windows of a row as the
    inner dimension) and assembles the (C k^2 + 1)^2 Gram once: ~k/2 times fewer products than
    the full (N o^2, C k^2 + 1) im2col matrix needs (2.5x for LeNet's second convolution), and a
    third of its copying. Exact: the same products, summed in another order. Ours."""

    def __init__(self, layer: Layer, dtype: torch.dtype, device):
        c, side, k = layer.in_shape[0], layer.in_shape[1], layer.kernel
        self.dtype, self.k, self.c, self.side = dtype, k, c, side
        self.o = side - k + 1
        self.s = [torch.zeros(side - d, c * k, c * k, dtype=torch.float64, device=device) for d in range(k)]
        self.count = 0  # patches seen (the bias-bias entry)
        self.colsum = torch.zeros(k, c * k, dtype=torch.float64, device=device)  # per kernel row a

    def rows(self, h: torch.Tensor) -> torch.Tensor:
        """Adds the block h (n, C, side, side); returns each sample's patch sums (n, d) in float64
        (the design rows summed over positions, bias column included), for X^T T."""
        n, (c, k, o, side) = h.shape[0], (self.c, self.k, self.o, self.side)
        sn, sc, sh, sw = h.stride()
        view = h.as_strided((side, n, o, c, k), (sh, sn, sw, sc, sw), h.storage_offset())
        win = torch.empty(side, n, o, c * k, dtype=self.dtype, device=h.device)
        win.view(side, n, o, c, k).copy_(view)  # A_r = win[r]: one copy, a third of im2col's
        flat = win.view(side, n * o, c * k)
        for d in range(k):
            prod = torch.bmm(flat[:side - d].transpose(1, 2), flat[d:])
            self.s[d] += prod if prod.dtype == torch.float64 else prod.double()
        per_row = win.sum(2, dtype=torch.float64)  # (side, n, C k): row r's windows summed over j
        box = torch.stack([per_row[a:a + o].sum(0) for a in range(k)], 1)  # (n, k, C k): rows a .. a+o-1
        self.colsum += box.sum(0)
        self.count += n * o * o
        sums = box.view(n, k, c, k).permute(0, 2, 1, 3).reshape(n, c * k * k)  # channel-major like Conv2d
        return torch.cat([sums, sums.new_full((n, 1), float(o * o))], 1)

    def gram(self) -> torch.Tensor:
        """The full (d, d) float64 Gram, bias last."""
        c, k, o = self.c, self.k, self.o
        m = torch.empty(k, k, c * k, c * k, dtype=torch.float64, device=self.colsum.device)
        for a in range(k):
            for b in range(a, k):
                m[a, b] = self.s[b - a][a:a + o].sum(0)
                if b > a:
                    m[b, a] = m[a, b].T
        # m[a, a', (c, b), (c', b')] -> G[(c, a, b), (c', a', b')]
        g = m.view(k, k, c, k, c, k).permute(2, 0, 3, 4, 1, 5).reshape(c * k * k, c * k * k)
        out = torch.empty(c * k * k + 1, c * k * k + 1, dtype=torch.float64, device=g.device)
        out[:-1, :-1] = g
        col = self.colsum.view(k, c, k).permute(1, 0, 2).reshape(-1)
        out[:-1, -1] = col
        out[-1, :-1] = col
        out[-1, -1] = float(self.count)
        return symmetrize(out)  # bmm's diagonal blocks need not be bitwise symmetric


def symmetrize(a: torch.Tensor) -> torch.Tensor:
    """The full symmetric matrix from the upper triangle (bitwise symmetric)."""
    upper = torch.triu(a)
    return upper + torch.triu(a, 1).T
