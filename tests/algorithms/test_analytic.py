"""The shared least-squares / im2col helpers, checked against slow independent constructions."""

from __future__ import annotations

import pytest
import torch

from simfed.algorithms.kit import analytic
from simfed.core.errors import SimfedError


def slow_patches(h: torch.Tensor, k: int) -> torch.Tensor:
    """im2col by slicing: rows (sample, i, j) in row-major order, columns (channel, di, dj)."""
    n, c, side, _ = h.shape
    out = side - k + 1
    rows = [h[:, :, i:i + k, j:j + k].reshape(n, c * k * k) for i in range(out) for j in range(out)]
    return torch.stack(rows, 1)  # (n, L, c*k*k)


def test_lenet_geometry():
    layers = analytic.build_layers(analytic.LENET, (1, 28, 28), 62, 2)
    assert [layer.d for layer in layers] == [26, 401, 513, 121, 85]
    assert [layer.width for layer in layers] == [16, 32, 120, 84, 62]
    assert [layer.positions for layer in layers] == [576, 64, 1, 1, 1]
    assert layers[-1].head and not any(layer.head for layer in layers[:-1])
    rgb = analytic.build_layers(analytic.LENET, (3, 32, 32), 10, 2)
    assert rgb[0].d == 76 and rgb[2].d == 801


@pytest.mark.parametrize("tokens, needle", [
    (("conv5x16", "bn", "fc"), "layer 1 'bn' cannot be solved analytically"),
    (("fc", "fc"), "must be the last layer"),
    (("conv5x16",), "the last layer must be the head"),
    (("fc10", "conv3x4", "fc"), "cannot follow a fully connected"),
    ((), "at least the head"),
])
def test_unsolvable_layers_are_rejected(tokens, needle):
    with pytest.raises(ValueError, match=needle):
        analytic.check_tokens(tokens)


def test_too_small_input_is_a_user_error():
    with pytest.raises(SimfedError, match="layer 1 'conv5x32' needs square inputs"):
        analytic.build_layers(analytic.LENET, (1, 12, 12), 10, 2)


def test_conv_forward_is_the_patch_matrix_product():
    gen = torch.Generator().manual_seed(0)
    layer = analytic.build_layers(("conv3x5", "fc"), (2, 7, 7), 3, 1)[0]
    h = torch.rand(4, 2, 7, 7, dtype=torch.float64, generator=gen)
    w = torch.randn(layer.d, 5, dtype=torch.float64, generator=gen)
    z = analytic.apply(layer, w, h, "identity", 1)  # (n, 5, 5, 5)
    ref = slow_patches(h, 3) @ w[:-1] + w[-1]  # (n, L, 5)
    assert torch.allclose(z.flatten(2).transpose(1, 2), ref, rtol=1e-12, atol=1e-12)
    assert torch.allclose(analytic.design(layer, h), analytic.with_bias(slow_patches(h, 3)).reshape(-1, layer.d))


@pytest.mark.parametrize("subsample", [False, True])
def test_statistics_equal_explicit_gram(subsample):
    gen = torch.Generator().manual_seed(1)
    layers = analytic.build_layers(("conv3x4", "conv3x6", "fc7", "fc"), (1, 12, 12), 5, 2)
    weights = [torch.randn(layer.d, layer.width, dtype=torch.float64, generator=gen) for layer in layers]
    x = torch.rand(37, 1, 12, 12, generator=gen)
    y = torch.randint(0, 5, (37,), generator=gen)
    proj = torch.randn(5, 6, dtype=torch.float64, generator=gen)
    pos = torch.tensor([0, 3, 7, 8]) if subsample else None
    layer = layers[1]
    a, b = analytic.statistics(layers, 1, weights[:1], x,
                               lambda s, e: analytic.targets(layer, y[s:e], 5, proj, "relu"), "relu", 2, pos, chunk=10)
    h = analytic.forward(layers, weights, x.double(), "relu", 2, upto=1)
    p = slow_patches(h, 3)
    if pos is not None:
        p = p[:, pos]
    xm = analytic.with_bias(p).reshape(-1, layer.d)
    t = torch.relu(torch.nn.functional.one_hot(y, 5).double() @ proj).repeat_interleave(p.shape[1], 0)
    assert a.shape == (layer.d, layer.d) and b.shape == (layer.d, 6)
    assert torch.allclose(a, xm.T @ xm, rtol=1e-12) and torch.allclose(b, xm.T @ t, rtol=1e-12)


def test_solve_matches_dense_solve_and_rejects_singular():
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(50, 6, dtype=torch.float64, generator=gen)
    t = torch.randn(50, 3, dtype=torch.float64, generator=gen)
    w = analytic.solve(x.T @ x, x.T @ t, 0.5, "here")
    assert torch.allclose(w, torch.linalg.solve(x.T @ x + 0.5 * torch.eye(6, dtype=torch.float64), x.T @ t), rtol=1e-10)
    x[:, 2] = 0.0  # a feature that is always zero: X^T X is singular
    with pytest.raises(SimfedError, match=r"layer 3: .*singular.*gamma > 0"):
        analytic.solve(x.T @ x, x.T @ t, 0.0, "layer 3")
    x[:, 2] = x[:, 0] * 2  # collinear: singular only up to round-off
    with pytest.raises(SimfedError, match="singular"):
        analytic.solve(x.T @ x, x.T @ t, 0.0, "layer 3")
    w_ref = torch.randn(6, 3, dtype=torch.float64, generator=gen)
    assert torch.allclose(analytic.ridge_toward(x.T @ x, x.T @ t, 1e12, w_ref, "x"), w_ref, atol=1e-6)
