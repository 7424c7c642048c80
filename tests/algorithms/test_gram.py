"""gram.py: the row-pair Gram of a convolution equals the im2col matrix's X^T X."""

import pytest
import torch

from simfed.algorithms.kit import analytic, gram


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_row_pair_gram_equals_the_im2col_gram(dtype):
    """All-positions convolution statistics come from image-row products (RowPairGram); they must be
    the im2col matrix's X^T X and per-sample patch sums, blocks added in any split."""
    gen = torch.Generator().manual_seed(3)
    layer = analytic.build_layers(("conv5x3", "fc"), (2, 11, 11), 4, 1)[0]
    h = torch.randn(23, 2, 11, 11, dtype=torch.float64, generator=gen)
    xm = analytic.design(layer, h)
    g = gram.RowPairGram(layer, dtype, "cpu")
    rows = torch.cat([g.rows(h[:9].to(dtype)), g.rows(h[9:].to(dtype))])
    a = g.gram()
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    assert a.dtype == torch.float64 and torch.equal(a, a.T)
    assert torch.allclose(a, xm.T @ xm, rtol=tol, atol=tol * float(a.abs().max()))
    assert torch.allclose(rows, xm.view(23, -1, layer.d).sum(1), rtol=tol, atol=tol * 50)
